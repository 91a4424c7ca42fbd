"""Baking a supported image: build its root file system here, upload it as an image through the platform's
images API and wait for its disk, boot it as a VM, check its toolchain answers, commit the running VM, and
publish it as `vers/<name>` with a dated tag, then move `latest`.

Everything after the root file system goes through the REST API with the caller's key (the `vers`
organization's, for the supported images), as any publisher would; nothing is written on the platform's
machine, which may be another one. The dated tag is created before `latest` moves, so a bake that fails
anywhere leaves `latest` where it was.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.bake.disk import Built, Sources, build_image
from services.bake.errors import BakeError, Log
from services.bake.recipes import Recipe
from services.client import ApiClient, ApiError, Unreachable

# The images API's smallest disk; a root that needs less gets this much.
MIN_DISK_MIB = 512
# How long the platform may take to make the disk of an upload (it has VERS_IMAGE_BUILD_TIMEOUT_SECONDS).
DISK_WAIT_SECONDS = 3600


@dataclass(frozen=True)
class Baked:
    name: str
    commit_id: str
    dated_tag: str
    versions: dict[str, str]


def _versions(client: ApiClient, vm_id: str, recipe: Recipe) -> dict[str, str]:
    found = {}
    for label, command in recipe.versions.items():
        result = client.request("POST", f"/api/v1/vm/{vm_id}/exec", json={"command": ["sh", "-c", command], "timeout_secs": 120})
        if result["exit_code"] != 0:
            raise BakeError(f"`{command}` exited {result['exit_code']} in the baked VM: {(result['stderr'] or result['stdout']).strip()}")
        printed = (result["stdout"].strip() or result["stderr"].strip()).splitlines()  # some tools print it on stderr
        found[label] = printed[0] if printed else ""
    return found


def describe(recipe: Recipe, manifest: dict[str, Any], versions: dict[str, str], day: str) -> str:
    debian = manifest.get("debian", {})
    npm = manifest.get("npm", {})
    assert isinstance(debian, dict) and isinstance(npm, dict)
    parts = [f"vers/{recipe.name} baked {day} from Debian {manifest['suite']}: {recipe.summary}."]
    parts.append("Versions: " + "; ".join(f"{label}: {text}" for label, text in versions.items()) + ".")
    parts.append("Debian packages: " + ", ".join(f"{name} {version}" for name, version in sorted(debian.items())) + ".")
    if npm:
        parts.append("npm packages: " + ", ".join(f"{name}@{version}" for name, version in sorted(npm.items())) + ".")
    return " ".join(parts)


def _status(client: ApiClient, name: str) -> dict[str, Any] | None:
    try:
        answer: dict[str, Any] = client.request("GET", f"/api/v1/images/{name}/status")
    except ApiError as error:
        if error.status == 404:
            return None
        raise
    return answer


def upload(client: ApiClient, built: Built, log: Log) -> bool:
    """The image `built.name` on the platform, uploaded unless it is there; whether this bake uploaded it."""
    status = _status(client, built.name)
    if status is not None and status["status"] != "failed":
        log(f"image {built.name} is on the platform: reused")
        uploaded = False
    else:
        if status is not None:  # a failed earlier upload holds the name: make room for this one
            _delete_image(client, built.name)
        if built.tarball is None:
            raise BakeError(
                f"the root file system {built.name} is no longer in the bake's cache: remove {built.name}.json there and bake again"
            )
        size = max(built.disk_mib, MIN_DISK_MIB)
        log(f"uploading {built.name} ({built.tarball.stat().st_size // 2**20} MiB of tar) for a disk of {size} MiB")
        with built.tarball.open("rb") as tar:
            client.request(
                "POST",
                "/api/v1/images/upload",
                params={"image_name": built.name, "size_mib": size, "description": built.manifest["contents"]},
                headers={"Content-Type": "application/x-tar"},
                content=tar,
            )
        uploaded = True
    deadline = time.monotonic() + DISK_WAIT_SECONDS
    while (status := _status(client, built.name)) is not None and status["status"] == "creating" and time.monotonic() < deadline:
        time.sleep(2)
    if status is None or status["status"] != "completed":
        reason = status.get("error_message") or status["status"] if status else "it is gone"
        raise BakeError(f"the platform did not make the disk of image {built.name}: {reason}")
    return uploaded


def _delete_image(client: ApiClient, name: str) -> None:
    """Delete the caller's image of that name; one a VM or commit stands on stays."""
    images = client.request("GET", "/api/v1/images")["images"]
    for image in images:
        if image["image_name"] == name:
            with contextlib.suppress(ApiError):
                client.request("DELETE", f"/api/v1/images/images/{image['base_image_id']}")


def _commit_image(client: ApiClient, recipe: Recipe, built: Built, day: str, log: Log) -> tuple[str, dict[str, str]]:
    manifest = built.manifest
    log(f"booting {recipe.name}")
    vm_id = client.request(
        "POST",
        "/api/v1/vm/new_root",
        params={"wait_boot": "true"},
        json={"vm_config": {"image_name": built.name, "mem_size_mib": recipe.mem_size_mib}},
    )["vm_id"]
    try:
        versions = _versions(client, vm_id, recipe)
        log("committing: " + "; ".join(versions.values()))
        # what the guest wrote, on its disk: the commit's disk alone is then a complete file system
        client.request("POST", f"/api/v1/vm/{vm_id}/exec", json={"command": ["sync"], "timeout_secs": 120})
        body = {"name": f"{recipe.name} {day}", "description": describe(recipe, manifest, versions, day)}
        commit_id = client.request("POST", f"/api/v1/vm/{vm_id}/commit", json=body)["commit_id"]
    finally:
        with contextlib.suppress(ApiError, Unreachable):
            client.request("DELETE", f"/api/v1/vm/{vm_id}")
    return commit_id, versions


def _publish(client: ApiClient, recipe: Recipe, commit_id: str, day: str, summary: str) -> str:
    """`vers/<name>` public, a new dated tag on the commit, then `latest` moved to it; the dated tag's name."""
    try:
        client.request("GET", f"/api/v1/repositories/{recipe.name}")
    except ApiError as error:
        if error.status != 404:
            raise
        try:
            client.request("POST", "/api/v1/repositories", json={"name": recipe.name, "description": recipe.summary})
        except ApiError as race:
            if race.status != 409:
                raise
    client.request("PATCH", f"/api/v1/repositories/{recipe.name}/visibility", json={"is_public": True})
    existing = {tag["tag_name"] for tag in client.request("GET", f"/api/v1/repositories/{recipe.name}/tags")["tags"]}
    counter = 1
    while True:
        dated = day if counter == 1 else f"{day}.{counter}"
        counter += 1
        if dated in existing:
            continue
        try:
            body = {"tag_name": dated, "commit_id": commit_id, "description": summary}
            client.request("POST", f"/api/v1/repositories/{recipe.name}/tags", json=body)
            break
        except ApiError as error:
            if error.status != 409:  # another bake took this name meanwhile: take the next
                raise
    _scan(client, recipe, dated)
    if "latest" in existing:
        client.request("PATCH", f"/api/v1/repositories/{recipe.name}/tags/latest", json={"commit_id": commit_id})
    else:
        client.request("POST", f"/api/v1/repositories/{recipe.name}/tags", json={"tag_name": "latest", "commit_id": commit_id})
    return dated


def _scan(client: ApiClient, recipe: Recipe, dated: str) -> None:
    """Published again, so the secret scan reads the new commit now, not at someone's first fork; with findings
    the dated tag goes again (nobody could fork it meanwhile: a fork of an unscanned commit scans it first) and
    the bake fails, saying what was found where."""
    try:
        client.request("PATCH", f"/api/v1/repositories/{recipe.name}/visibility", json={"is_public": True})
    except ApiError as error:
        findings = error.body.get("findings")
        if not findings:
            raise
        with contextlib.suppress(ApiError, Unreachable):
            client.request("DELETE", f"/api/v1/repositories/{recipe.name}/tags/{dated}")
        where = "; ".join(f"{f['rule']} in {f['where']} {f.get('path') or f.get('offset')}" for f in findings[:10])
        raise BakeError(f"vers/{recipe.name}: the secret scan found {len(findings)} secret(s) in the new commit: {where}") from None


def bake(client: ApiClient, recipe: Recipe, cache: Path, sources: Sources, log: Log, day: datetime.date | None = None) -> Baked:
    day = day or datetime.datetime.now(datetime.UTC).date()
    built = build_image(recipe, cache, sources, log, day)
    uploaded = upload(client, built, log)
    try:
        commit_id, versions = _commit_image(client, recipe, built, day.isoformat(), log)
        dated = _publish(client, recipe, commit_id, day.isoformat(), "; ".join(f"{tool} {text}" for tool, text in versions.items()))
    except BaseException:
        if uploaded:  # nothing was published from it: the platform need not keep it
            with contextlib.suppress(ApiError, Unreachable):
                _delete_image(client, built.name)
        raise
    return Baked(recipe.name, commit_id, dated, versions)
