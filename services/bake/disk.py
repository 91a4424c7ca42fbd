"""A supported image's root file system, from Debian's archive (debootstrap, then apt with -updates and
-security) and the npm registry (Node.js LTS, npm, and tools that ship there), built on this machine as a tar
for the platform's images API (which makes the root disk, with the Vers init as its PID 1).

A build is named by the hash of its recipe and of what is current upstream (the archive's index dates, the
npm versions): the platform's image of that name is reused when it exists, so a rebake with nothing changed
only makes a new commit. The bake's cache folder keeps the Debian packages and each build's manifest.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import shutil
import ssl
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.bake.errors import BakeError, Log
from services.bake.recipes import COMMON_PACKAGES, Recipe
from services.bake.upstream import NODE_BINARY_PACKAGE, NpmPackage, debian_index_dates, fetch_verified, node_lts_major, npm_resolve
from services.common.files import write_atomic

# What the Node.js build from the npm registry links against, beyond libc.
NODE_RUNTIME_PACKAGES = ("libatomic1", "libstdc++6")
# Inside the root during the build only: the host's trusted certificates, so npm reaches the registry
# through whatever the host's network needs (a TLS-inspecting proxy's CA, say).
HOST_CA = "/tmp/vers-build-host-ca.pem"
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "LANG": "C.UTF-8",
    "NODE_EXTRA_CA_CERTS": HOST_CA,
}


def _host_ca_bundle() -> Path | None:
    candidates = (os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt")
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@dataclass(frozen=True)
class Sources:
    suite: str
    mirror: str
    security_mirror: str
    npm_registry: str


@dataclass(frozen=True)
class Upstream:
    """What a bake installs, resolved before it starts."""

    debian_dates: dict[str, str]
    node: NpmPackage | None = None
    npm: NpmPackage | None = None
    tools: tuple[NpmPackage, ...] = field(default=())

    @classmethod
    def resolve(cls, recipe: Recipe, sources: Sources, day: datetime.date, log: Log) -> Upstream:
        log(f"asking {sources.mirror} and {sources.npm_registry} what is current")
        dates = debian_index_dates(sources.mirror, sources.security_mirror, sources.suite)
        tools = tuple(npm_resolve(sources.npm_registry, name) for name in recipe.npm)
        if not recipe.node:
            return cls(dates, tools=tools)
        node = npm_resolve(sources.npm_registry, NODE_BINARY_PACKAGE, node_lts_major(day))
        return cls(dates, node, npm_resolve(sources.npm_registry, "npm"), tools)

    def facts(self) -> list[object]:
        return [self.debian_dates, *(p.spec for p in (self.node, self.npm, *self.tools) if p is not None)]


def _key(recipe: Recipe, sources: Sources, upstream: Upstream) -> str:
    digest = hashlib.sha256()
    spec = [
        recipe.packages,
        recipe.backports,
        recipe.npm,
        recipe.node,
        sorted(recipe.files.items()),
        COMMON_PACKAGES,
        sources.suite,
        sources.mirror,
    ]
    for part in (json.dumps([spec, upstream.facts()]).encode(), Path(__file__).read_bytes()):
        digest.update(part)
    return digest.hexdigest()[:16]


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _step(what: str, detail: str, args: list[str], log: Log, **kwargs: Any) -> str:
    log(f"{what} {detail}".rstrip())
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("E:", "npm error", "ERR"))]
        raise BakeError(f"{what} failed: {_tail(chr(10).join(errors) or result.stderr or result.stdout)}")
    return result.stdout


@contextlib.contextmanager
def _chroot_ready(rootfs: Path, debs: Path) -> Iterator[None]:
    """/proc, the host's DNS and certificates and the shared .deb cache inside the root, and no service
    started by a package's postinst (policy-rc.d); all undone afterwards, so nothing of the host stays."""
    mounts = [(["-t", "proc", "proc"], rootfs / "proc"), (["--bind", str(debs)], rootfs / "var" / "cache" / "apt" / "archives")]
    policy = rootfs / "usr" / "sbin" / "policy-rc.d"
    host_ca = rootfs / HOST_CA.lstrip("/")
    if (bundle := _host_ca_bundle()) is not None:
        shutil.copy2(bundle, host_ca)
    shutil.copy2("/etc/resolv.conf", rootfs / "etc" / "resolv.conf")
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    mounted: list[Path] = []
    try:
        for options, point in mounts:
            point.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *options, str(point)], check=True)
            mounted.append(point)
        yield
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)
        policy.unlink()
        host_ca.unlink(missing_ok=True)
        (rootfs / "etc" / "resolv.conf").unlink()


def _mounts_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve()) + "/"
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if line.split()[1].startswith(prefix)]


@contextlib.contextmanager
def _scratch(root: Path) -> Iterator[Path]:
    """A scratch folder removed afterwards, but never while anything is mounted inside it: the .deb
    cache is bind-mounted there, and removing through the mount would empty the cache."""
    folder = Path(tempfile.mkdtemp(dir=root, prefix=".bake-"))
    try:
        yield folder
    finally:
        for point in sorted(_mounts_under(folder), reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        if _mounts_under(folder):
            raise BakeError(f"{folder} still has mounts inside; unmount them and remove it by hand")
        shutil.rmtree(folder, ignore_errors=True)


def _debootstrap(rootfs: Path, debs: Path, sources: Sources, log: Log) -> None:
    """Debian's minimal base plus what every image has; the recipe's packages come after, through apt,
    which resolves alternatives and virtual packages that debootstrap's --include does not."""
    if shutil.which("debootstrap") is None:
        raise BakeError("debootstrap is not installed: apt-get install debootstrap (make install does it)")
    if os.geteuid() != 0:
        raise BakeError("building a Debian root disk needs root (debootstrap): run the bake as root")
    packages = ",".join(COMMON_PACKAGES)
    command = [
        "debootstrap",
        "--variant=minbase",
        f"--include={packages}",
        f"--cache-dir={debs}",
        sources.suite,
        str(rootfs),
        sources.mirror,
    ]
    try:
        _step(f"debootstrap {sources.suite}", f"with {packages}", command, log)
    except BakeError as error:
        details = rootfs / "debootstrap" / "debootstrap.log"  # gone with the scratch folder: quote it now
        if details.exists():
            raise BakeError(f"{error}; debootstrap.log ends: {_tail(details.read_text(errors='replace'))}") from None
        raise
    (rootfs / "etc" / "apt" / "sources.list").write_text(
        f"deb {sources.mirror} {sources.suite} main\n"
        f"deb {sources.mirror} {sources.suite}-updates main\n"
        f"deb {sources.mirror} {sources.suite}-backports main\n"
        f"deb {sources.security_mirror} {sources.suite}-security main\n"
    )


def _apt(recipe: Recipe, rootfs: Path, suite: str, log: Log) -> None:
    chroot = ["chroot", str(rootfs)]
    _step("apt-get update", "", [*chroot, "apt-get", "update", "-q"], log, env=CHROOT_ENV)
    _step("apt-get upgrade", "(-updates, -security)", [*chroot, "apt-get", "upgrade", "-y", "-q"], log, env=CHROOT_ENV)
    packages = [*recipe.packages, *(NODE_RUNTIME_PACKAGES if recipe.node else ())]
    install = [*chroot, "apt-get", "install", "-y", "-q", "--no-install-recommends"]
    if packages:
        _step("apt-get install", " ".join(packages), [*install, *packages], log, env=CHROOT_ENV)
    if recipe.backports:
        backports = f"{suite}-backports"
        _step(
            f"apt-get install -t {backports}",
            " ".join(recipe.backports),
            [*install, "-t", backports, *recipe.backports],
            log,
            env=CHROOT_ENV,
        )


def _unpack(package: NpmPackage, target: Path, members: str = "package/") -> None:
    """An npm tarball's `package/` tree (or one file of it) into `target`."""
    with tarfile.open(fileobj=io.BytesIO(fetch_verified(package))) as archive:
        for member in archive.getmembers():
            if not member.name.startswith(members) or not (member.isfile() or member.isdir() or member.issym()):
                continue
            member.name = member.name.removeprefix("package/")
            archive.extract(member, target, filter="data")


def _node(upstream: Upstream, rootfs: Path, log: Log) -> None:
    """Node.js and npm laid out as the official tarballs do, under /usr/local."""
    if upstream.node is None or upstream.npm is None:
        return
    local = rootfs / "usr" / "local"
    log(f"Node.js {upstream.node.version} and npm {upstream.npm.version} from the npm registry")
    _unpack(upstream.node, local, "package/bin/node")
    npm_home = local / "lib" / "node_modules" / "npm"
    npm_home.mkdir(parents=True, exist_ok=True)
    _unpack(upstream.npm, npm_home)
    for command, script in (("npm", "npm-cli.js"), ("npx", "npx-cli.js")):
        link = local / "bin" / command
        link.unlink(missing_ok=True)
        link.symlink_to(f"../lib/node_modules/npm/bin/{script}")
    _step("node --version", "", ["chroot", str(rootfs), "node", "--version"], log, env=CHROOT_ENV)


def _tools(upstream: Upstream, rootfs: Path, log: Log) -> None:
    if not upstream.tools:
        return
    specs = [tool.spec for tool in upstream.tools]
    # npm 12 runs no install script unless allowed; the recipe's own tools need theirs (Claude Code's
    # postinstall puts its native binary in place), their dependencies still get none.
    allowed = ",".join(tool.name for tool in upstream.tools)
    command = ["chroot", str(rootfs), "npm", "install", "--global", "--no-fund", "--no-audit", "--no-update-notifier"]
    command += [f"--allow-scripts={allowed}", *specs]
    _step("npm install", " ".join(specs), command, log, env=CHROOT_ENV)


def _contents(recipe: Recipe, rootfs: Path, upstream: Upstream) -> dict[str, object]:
    """Package versions as installed, for the manifest and the commit's description."""
    names = dict.fromkeys((*COMMON_PACKAGES, *recipe.packages, *recipe.backports))
    listed = subprocess.run(
        ["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package}\t${Version}\n", *names],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    debian = dict(line.split("\t", 1) for line in listed.splitlines() if "\t" in line)
    npm = {("node" if p.name == NODE_BINARY_PACKAGE else p.name): p.version for p in (upstream.node, upstream.npm) if p}
    for tool in upstream.tools:
        manifest = rootfs / "usr" / "local" / "lib" / "node_modules" / tool.name / "package.json"
        npm[tool.name] = json.loads(manifest.read_text())["version"]
    return {"debian": debian, "npm": npm, "debian_indexes": upstream.debian_dates}


def _finish(recipe: Recipe, rootfs: Path) -> None:
    for path, (mode, content) in recipe.files.items():
        target = rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(mode)
    (rootfs / "etc" / "hostname").write_text("vers\n")
    for host_key in (rootfs / "etc" / "ssh").glob("ssh_host_*"):
        host_key.unlink()  # made when the disk boots (vers-init): each bake's commit gets keys of its own
    # What a running VM never needs: package lists (apt-get update fetches them again) and npm's cache.
    for folder in ("var/lib/apt/lists", "root/.npm"):
        shutil.rmtree(rootfs / folder, ignore_errors=True)
    (rootfs / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True, exist_ok=True)


def _size_mib(rootfs: Path) -> int:
    used = int(subprocess.run(["du", "-sm", "--apparent-size", str(rootfs)], capture_output=True, text=True, check=True).stdout.split()[0])
    # room for ext4's own tables and for what the image's first users install; VMs grow it with fs_size_mib
    return int(math.ceil((used * 1.3 + 256) / 64) * 64)


@dataclass(frozen=True)
class Built:
    """A recipe's root file system as the platform's image `name`: the tar to upload (kept, for a platform
    that does not have the image yet; None when someone removed it), its disk's size and what it holds."""

    name: str
    tarball: Path | None
    manifest: dict[str, Any]

    @property
    def disk_mib(self) -> int:
        return int(self.manifest["disk_mib"])


def build_image(recipe: Recipe, cache: Path, sources: Sources, log: Log, day: datetime.date) -> Built:
    """The recipe's root file system under the name of what went into it; built unless this cache has it."""
    upstream = Upstream.resolve(recipe, sources, day, log)
    name = f"{recipe.name}-{_key(recipe, sources, upstream)}"
    cache.mkdir(parents=True, exist_ok=True)
    manifest_file, tarball = cache / f"{name}.json", cache / f"{name}.tar"
    if manifest_file.exists():
        log(f"root file system {name} was built here before: reused")
        return Built(name, tarball if tarball.exists() else None, json.loads(manifest_file.read_text()))
    with _scratch(cache) as scratch:
        rootfs = scratch / "rootfs"
        debs = cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        _debootstrap(rootfs, debs, sources, log)
        with _chroot_ready(rootfs, debs):
            _apt(recipe, rootfs, sources.suite, log)
            _node(upstream, rootfs, log)
            _tools(upstream, rootfs, log)
        contents = _contents(recipe, rootfs, upstream)
        _finish(recipe, rootfs)
        size = _size_mib(rootfs)
        log(f"root file system for a disk of {size} MiB")
        staged = scratch / "root.tar"
        _step("tar", "of the root", ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(staged), "."], log)
        staged.rename(tarball)
    manifest = {"name": recipe.name, "disk_mib": size, "suite": sources.suite, "contents": recipe.summary, **contents}
    write_atomic(manifest_file, json.dumps(manifest, indent=2))
    return Built(name, tarball, manifest)
