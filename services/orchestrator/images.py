"""Guest images, built from Debian packages: a kernel (the uncompressed ELF, which boots twice as fast
under TCG), a busybox initramfs with the virtio and ext4 drivers, and a root disk per image (qcow2).

`python -m services.orchestrator.images build` (`make images`) builds what is missing or out of date
into VERS_DATA_DIR/images; a second call with nothing changed is a no-op. `python -m
services.orchestrator.images build-image SPEC` builds one image of the images API (see `build_image`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from services.common.files import fsync_dir, fsync_tree, write_atomic
from services.common.settings import get_settings

GUEST_FILES = Path(__file__).resolve().parent / "guest"
# Drivers the guest needs; their dependencies are found from each module's modinfo.
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_rng", "virtio_net", "ext4", "crc32c_generic")
BASE_DISK_MIB = 96
# Host programs the default image carries (with their libraries), and the links to them: an SSH server
# (dropbear, which finds its SFTP server at /usr/lib/sftp-server, so scp and sftp work), rsync, and git
# with its HTTP(S) transport.
GUEST_PROGRAMS = {
    "/usr/sbin/dropbear": (),
    "/usr/lib/openssh/sftp-server": ("/usr/lib/sftp-server",),
    "/usr/bin/git": ("/usr/lib/git-core/git", "/usr/bin/git-upload-pack", "/usr/bin/git-receive-pack"),
    "/usr/lib/git-core/git-remote-http": ("/usr/lib/git-core/git-remote-https",),
    "/usr/bin/rsync": (),
}
DEFAULT_IMAGE = "default"
KERNEL_NAME = "default.bin"


@dataclass(frozen=True)
class Image:
    """A built image: the files a VM boots from. Folders are named by the hash of what went into them
    and never change, so disks layered on an image keep their backing file when images are rebuilt."""

    name: str
    folder: Path
    kernel_folder: Path

    @property
    def kernel(self) -> Path:
        return self.kernel_folder / "vmlinux"

    @property
    def initramfs(self) -> Path:
        return self.kernel_folder / "initramfs.cpio"

    @property
    def disk(self) -> Path:
        return self.folder / "rootfs.qcow2"

    @property
    def disk_mib(self) -> int:
        return int(json.loads((self.folder / "manifest.json").read_text())["disk_mib"])


def images_dir() -> Path:
    return get_settings().image_root


def find_image(root: Path, name: str) -> Image | None:
    index_file = root / "index.json"
    if not index_file.exists():
        return None
    index = json.loads(index_file.read_text())
    folder = index["images"].get(name)
    return Image(name, root / folder, root / index["kernel"]) if folder else None


def list_images(root: Path) -> list[str]:
    index_file = root / "index.json"
    return sorted(json.loads(index_file.read_text())["images"]) if index_file.exists() else []


def _run(*args: str | Path, **kwargs: Any) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, **kwargs).stdout


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def kernel_package() -> str:
    """The Debian package of the current kernel that linux-image-amd64 points at."""
    for attempt in range(2):
        for line in _run("apt-cache", "depends", "linux-image-amd64").splitlines():
            match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
            if match:
                return match.group(1)
        if attempt == 0 and os.geteuid() == 0:
            _run("apt-get", "update", "-q")  # a machine whose package lists were never fetched
    raise RuntimeError("apt-cache cannot say which kernel linux-image-amd64 depends on: run apt-get update")


def _download(package: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        _run("apt-get", "download", package, cwd=cache)
        found = sorted(cache.glob(f"{package}_*.deb"))
    return found[-1]


def uncompressed_kernel(vmlinuz: bytes) -> bytes:
    """The ELF inside a bzImage: the xz stream after the decompressor stub."""
    start = vmlinuz.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise RuntimeError("no xz stream found in vmlinuz")
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(vmlinuz[start:])


def _modinfo_depends(ko: bytes) -> list[str]:
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)", ko)
    return [d for d in match.group(1).decode().split(",") if d] if match else []


def module_load_order(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files in an order where every module comes after its dependencies."""
    files = {p.stem.replace("-", "_"): p for p in modules_root.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in files:
            return  # built into the kernel
        for dependency in _modinfo_depends(files[name].read_bytes()):
            visit(dependency)
        order.append(files[name])

    for name in wanted:
        visit(name)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (the initramfs format) of (path, mode, data) entries."""
    out = io.BytesIO()
    for inode, (path, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        name = path.encode() + b"\x00"
        header = "070701" + "".join(f"{value:08X}" for value in (inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0))
        out.write(header.encode() + name)
        out.write(b"\x00" * (-(110 + len(name)) % 4))
        out.write(data)
        out.write(b"\x00" * (-len(data) % 4))
    return out.getvalue()


def build_kernel(root: Path, cache: Path) -> Path:
    """vmlinux + initramfs shared by every image, rebuilt when the kernel package or the init change."""
    package = kernel_package()
    busybox = Path("/bin/busybox")
    init = (GUEST_FILES / "initramfs-init").read_bytes()
    key = _digest(package.encode(), init, busybox.read_bytes(), repr(MODULES).encode())
    target = root / f"kernel-{key}"
    if (target / "manifest.json").exists():
        return target
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        extracted = Path(scratch) / "deb"
        _run("dpkg-deb", "-x", _download(package, cache), extracted)
        vmlinuz = next((extracted / "boot").glob("vmlinuz-*"))
        modules_root = next((extracted / "lib" / "modules").iterdir())
        order = module_load_order(modules_root, MODULES)
        entries = [
            ("bin", 0o40755, b""),
            ("bin/busybox", 0o100755, busybox.read_bytes()),
            ("init", 0o100755, init),
            ("lib", 0o40755, b""),
            ("lib/modules", 0o40755, b""),
            ("lib/modules/load-order", 0o100644, "".join(f"{p.name}\n" for p in order).encode()),
            *((f"lib/modules/{p.name}", 0o100644, p.read_bytes()) for p in order),
        ]
        staged = Path(scratch) / "kernel"
        staged.mkdir()
        (staged / "vmlinux").write_bytes(uncompressed_kernel(vmlinuz.read_bytes()))
        (staged / "initramfs.cpio").write_bytes(_cpio_newc(entries))
        manifest = {"key": key, "package": package, "kernel": modules_root.name, "modules": [p.name for p in order]}
        install_folder(staged, target, manifest)
    return target


def _copy_with_libraries(binary: Path, rootfs: Path) -> None:
    """Copy a dynamically linked host binary and the shared libraries it loads into the root disk."""
    (rootfs / binary.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, rootfs / binary.relative_to("/"))
    for line in _run("ldd", binary).splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            library = Path(match.group(1))
            target = rootfs / library.resolve().relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(library.resolve(), target)
            link = rootfs / library.relative_to("/")
            if link != target and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(library.resolve())


def populate_default_rootfs(rootfs: Path) -> None:
    """A small root: static busybox with every applet, resize2fs, the Vers init."""
    for folder in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "home",
        "var/log",
        "lib",
        "lib64",
    ):
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in _run("/bin/busybox", "--list-full").split():
        link = rootfs / applet
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    _copy_with_libraries(Path("/sbin/resize2fs"), rootfs)
    for program, links in GUEST_PROGRAMS.items():
        _copy_with_libraries(Path(program), rootfs)
        for alias in links:
            (rootfs / alias.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (rootfs / alias.lstrip("/")).symlink_to(program)
    (rootfs / "usr/share/git-core/templates").mkdir(parents=True, exist_ok=True)
    certificates = Path("/etc/ssl/certs/ca-certificates.crt")
    if certificates.exists():  # for https (git, wget) from the guest
        (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy2(certificates, rootfs / "etc/ssl/certs/ca-certificates.crt")
    (rootfs / "etc" / "hostname").write_text("vers\n")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "shells").write_text("/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (rootfs / "etc" / "profile").write_text('export PS1="\\u@\\h:\\w# "\n')
    (rootfs / "etc" / "os-release").write_text('NAME="Vers default (busybox)"\nID=vers\n')


def inside_root(rootfs: Path, relative: str) -> Path:
    """Where `relative` is inside `rootfs`, its links followed as the guest would follow them (an absolute
    link points into the root, `..` stops at it), so nothing written there lands outside the root."""
    current, parts, hops = rootfs, list(Path(relative.lstrip("/")).parts), 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != rootfs else rootfs
            continue
        candidate = current / part
        if not candidate.is_symlink():
            current = candidate
            continue
        hops += 1
        if hops > 40:
            raise DiskError(f"/{relative} in the image is a loop of links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = rootfs
        parts = [*Path(target.lstrip("/")).parts, *parts]
    return current


def install_vers_init(rootfs: Path) -> str:
    """The Vers init at /sbin/vers-init (where the initramfs hands over), replacing whatever is there; its
    path inside the root (a merged /usr puts it in /usr/sbin)."""
    sbin = inside_root(rootfs, "sbin")
    sbin.mkdir(parents=True, exist_ok=True)
    target = sbin / "vers-init"
    target.unlink(missing_ok=True)
    shutil.copy2(GUEST_FILES / "vers-init", target)
    target.chmod(0o755)
    return "/" + target.relative_to(rootfs).as_posix()


# 4 KiB blocks whatever the disk's size (mkfs picks 1 KiB for a small one): a block the guest deletes is one
# whole 4 KiB cluster of its layer, which the discard then empties (see machine.LAYER_OPTIONS).
FILESYSTEM_OPTIONS = ("-b", "4096")


def build_disk(rootfs: Path, target: Path, size_mib: int) -> None:
    raw = target.with_suffix(".raw")
    with raw.open("wb") as out:
        out.truncate(size_mib * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", *FILESYSTEM_OPTIONS, "-L", "vers-root", "-d", rootfs, raw)
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, target)
    raw.unlink()


class DiskError(Exception):
    """A root disk could not be made from what was given; the message says why and what to change."""


# At most this many members in an uploaded root (a Debian root with a desktop has about 150 000 files).
MAX_MEMBERS = 500_000
# The first bytes of compressed files: an upload is a plain tar, so that what it unpacks to is bounded by
# what was uploaded (and by size_mib).
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
# tarfile reads a pax header or a GNU long name whole into memory: larger ones are refused.
HEADER_MAX_BYTES = 1024 * 1024
S_IFMT = {tarfile.REGTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK}


@dataclass(frozen=True)
class Member:
    """A member of an uploaded root that is unpacked: `path` relative to the root, normalized; for a hard
    link, `link` is the path of the earlier regular file it names."""

    path: str
    info: tarfile.TarInfo
    link: str = ""


# What the disk build sets inside the image (debugfs), where the unpacked file cannot carry it: (path in
# the image, uid, gid, mode with its file type bits).
Fix = tuple[str, int, int, int]


def _member_path(member: tarfile.TarInfo, name: str, what: str = "") -> str:
    """`name` (a member's name, or the target of a hard link) relative to the root, or DiskError when it
    would be outside it."""
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts:
        raise DiskError(
            f"member {member.name!r} of the upload {what}names {name!r}, a path outside the root: a root's tar holds "
            "relative paths without '..' (make it with `tar -C ROOT -cf root.tar .`)"
        )
    return "/".join(parts)


def _vetted(archive: tarfile.TarFile, size_mib: int) -> list[Member]:
    """Every member of `archive` to unpack, in order, read before anything is written: refused (DiskError naming
    the member) are paths outside the root, a name given twice, anything below a name that is not a folder
    (nothing is written through a link), hard links to anything but an earlier regular file, members other
    than files, folders, links, devices and FIFOs, more than MAX_MEMBERS members and files adding up to more
    than the disk. Devices and FIFOs are left out (the guest's /dev is a devtmpfs)."""
    members: list[Member] = []
    kinds: dict[str, bytes] = {}  # path -> member type; folders implied by deeper names are DIRTYPE
    named: set[str] = set()
    total = 0
    for count, info in enumerate(archive, start=1):
        if count > MAX_MEMBERS:
            raise DiskError(f"the upload has more than {MAX_MEMBERS} members, the most a root may have")
        path = _member_path(info, info.name)
        if not path or info.isdev():
            continue  # the root folder itself ("./"); devices and FIFOs
        if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
            raise DiskError(
                f"member {info.name!r} of the upload is of tar type {info.type!r}: a root holds files, folders, links and devices"
            )
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if kinds.setdefault(folder, tarfile.DIRTYPE) != tarfile.DIRTYPE:
                raise DiskError(
                    f"member {info.name!r} of the upload is below {folder!r}, which is not a folder: nothing is unpacked through a link"
                )
        kind = tarfile.REGTYPE if info.isreg() else info.type
        if path in named or (path in kinds and kind != tarfile.DIRTYPE):
            raise DiskError(f"member {info.name!r} of the upload names {path!r} a second time: each path may be given once")
        named.add(path)
        kinds[path] = kind
        link = ""
        if info.islnk():
            link = _member_path(info, info.linkname, "is a hard link that ")
            if kinds.get(link) != tarfile.REGTYPE or link == path:
                raise DiskError(
                    f"member {info.name!r} of the upload is a hard link to {info.linkname!r}, which is not an earlier regular file of "
                    "the upload: a hard link may only name a file given before it"
                )
            kinds[path] = tarfile.LNKTYPE  # a link to a link is to the same file, but is refused: tar never makes one
        elif info.isreg():
            total += info.size
            if total > size_mib * 1024 * 1024:
                raise DiskError(
                    f"the files of the upload add up to more than the disk's {size_mib} MiB (at {info.name!r}): give a larger size_mib"
                )
        members.append(Member(path, info, link))
    return members


class _Header(tarfile.TarInfo):
    """A member header whose extended headers (pax records, GNU long names) are at most HEADER_MAX_BYTES."""

    def _bounded(self) -> None:
        if self.size > HEADER_MAX_BYTES:
            raise DiskError(f"the upload has an extended tar header of {self.size} bytes, more than the {HEADER_MAX_BYTES} a root needs")

    def _proc_pax(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        self._bounded()
        return super()._proc_pax(tarfile)  # type: ignore[misc]  # a private method, not in typeshed

    def _proc_gnulong(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        self._bounded()
        return super()._proc_gnulong(tarfile)  # type: ignore[misc]  # a private method, not in typeshed


def _open_tar(tarball: Path) -> tarfile.TarFile:
    with tarball.open("rb") as head:
        start = head.read(8)
    for magic, kind in COMPRESSED.items():
        if start.startswith(magic):
            raise DiskError(f"the upload is {kind}-compressed: send a plain (uncompressed) tar of the root file system")
    return tarfile.open(tarball, mode="r:", tarinfo=_Header)


def _not_a_root(error: Exception) -> DiskError:
    return DiskError(f"the upload is not a tar of a root file system that can be unpacked: {error}")


def check_root(tarball: Path, size_mib: int) -> None:
    """DiskError, naming what to change, unless `tarball` is a plain tar that `unpack_root` unpacks."""
    try:
        with _open_tar(tarball) as archive:
            _vetted(archive, size_mib)
    except (tarfile.TarError, OSError) as error:
        raise _not_a_root(error) from None


def _folder(root: int, parts: Sequence[str], member: Member) -> int:
    """A descriptor of the folder `parts` below the root descriptor, made (0755) where missing, each step
    opened without following links: a link or a file on the way is DiskError, so nothing lands outside."""
    fd = os.dup(root)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
                made = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.fchmod(made, 0o755)  # as tar makes them, whatever this process's umask
                os.close(made)
            try:
                below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                raise DiskError(f"member {member.info.name!r} of the upload is below {part!r}, which is not a folder") from None
            os.close(fd)
            fd = below
        return fd
    except BaseException:
        os.close(fd)
        raise


def _unpack_member(archive: tarfile.TarFile, root: int, member: Member) -> None:
    """Make one vetted member below the root descriptor: never opening what exists, never following a link."""
    *folders, name = member.path.split("/")
    parent = _folder(root, folders, member)
    try:
        info = member.info
        if info.isdir():
            with contextlib.suppress(FileExistsError):  # a folder an earlier member's path made
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            os.fchmod(fd, (info.mode & 0o777) | 0o700)  # the owner may still write in it; debugfs sets the mode
            os.close(fd)
        elif info.issym():
            os.symlink(info.linkname, name, dir_fd=parent)
        elif info.islnk():
            *link_folders, link_name = member.link.split("/")
            source = _folder(root, link_folders, member)
            try:
                os.link(link_name, name, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(source)
        else:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
            with os.fdopen(fd, "wb") as out:
                data = archive.extractfile(info)
                if data is not None:
                    shutil.copyfileobj(data, out, 1024 * 1024)
                os.fchmod(out.fileno(), info.mode & 0o777)
    finally:
        os.close(parent)


def _fix(member: Member) -> Fix | None:
    """What the unpacked member lacks that debugfs gives it in the image: an owner other than this process's
    (files are not chowned on the host), setuid/setgid/sticky bits (a hardened service may not set them), a
    folder's own mode (unpacked with the owner's rwx); None when it has it all. Hard links share the file's."""
    info = member.info
    if info.islnk():
        return None
    kind = S_IFMT[tarfile.REGTYPE if info.isreg() else info.type]
    mode = 0o777 if info.issym() else info.mode & 0o7777
    written = mode if info.issym() else (mode & 0o777) | (0o700 if info.isdir() else 0)
    if (info.uid, info.gid) == (os.geteuid(), os.getegid()) and mode == written:
        return None
    return ("/" + member.path, info.uid, info.gid, kind | mode)


def unpack_root(tarball: Path, rootfs: Path, size_mib: int) -> list[Fix]:
    """Unpack a plain tar of a root file system into `rootfs` (see `_vetted` for what is refused, before
    anything is written); the owners and modes the disk build sets inside the image, for `fix_files`."""
    rootfs.mkdir(parents=True, exist_ok=True)
    try:
        with _open_tar(tarball) as archive:
            members = _vetted(archive, size_mib)
            root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for member in members:
                    _unpack_member(archive, root, member)
            finally:
                os.close(root)
    except (tarfile.TarError, OSError) as error:
        raise _not_a_root(error) from None
    return [fix for fix in map(_fix, members) if fix is not None]


def fix_files(raw: Path, fixes: Sequence[Fix], timeout: float | None = None) -> None:
    """Give files inside an unmounted ext4 image their owners and modes (debugfs, no root needed)."""
    commands = []
    for path, uid, gid, mode in fixes:
        if any(c in path for c in '"\n\\'):
            raise DiskError(
                f"the upload names a file {path!r} with a quote, backslash or newline, whose owner or mode the disk build cannot set"
            )
        commands += [f'sif "{path}" uid {uid}', f'sif "{path}" gid {gid}', f'sif "{path}" mode 0{mode:o}']
    if not commands:
        return
    script = raw.with_suffix(".fixes")
    script.write_text("\n".join(commands) + "\n")
    _run("debugfs", "-w", "-f", script, raw, timeout=timeout)
    script.unlink()


def _mib(size: int) -> int:
    return -(-size // (1024 * 1024))


def files_mib(rootfs: Path) -> int:
    """What the files of a folder take, in MiB (apparent sizes, each file at least one 4 KiB block)."""
    total = 0
    for folder, _dirs, names in os.walk(rootfs):
        for name in (*names, *_dirs):
            total += max(os.lstat(os.path.join(folder, name)).st_size, 4096)
    return _mib(total)


def build_disk_from_root(rootfs: Path, target: Path, size_mib: int, fixes: Sequence[Fix] = (), timeout: float | None = None) -> None:
    """An ext4 qcow2 of `size_mib` holding `rootfs` with the Vers init as its PID 1 (the image's own init is
    not used: VMs are driven through the platform's agent); each program run at most `timeout` seconds."""
    init = install_vers_init(rootfs)
    raw = target.with_suffix(".raw")
    with raw.open("wb") as out:
        out.truncate(size_mib * 1024 * 1024)
    try:
        _run("mkfs.ext4", "-q", "-F", *FILESYSTEM_OPTIONS, "-L", "vers-root", "-d", rootfs, raw, timeout=timeout)
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or "").strip().splitlines()
        raise DiskError(
            f"the files (about {files_mib(rootfs)} MiB) do not fit a disk of {size_mib} MiB, or cannot be read: "
            f"{detail[-1] if detail else error}; give a larger size_mib"
        ) from None
    fix_files(raw, [fix for fix in fixes if fix[0] != init], timeout)
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, target, timeout=timeout)
    raw.unlink()


def install_folder(staged: Path, target: Path, manifest: Mapping[str, object]) -> None:
    """Move a built folder into place whole: a folder with a manifest counts as built, so its files reach the
    disk before the rename, and the rename before anything registers the folder."""
    write_atomic(staged / "manifest.json", json.dumps(manifest, indent=2))
    fsync_tree(staged)
    staged.rename(target)
    fsync_dir(target.parent)


def build_default_image(root: Path) -> Path:
    init = (GUEST_FILES / "vers-init").read_bytes()
    programs = [Path(program).read_bytes() for program in GUEST_PROGRAMS]
    key = _digest(init, Path("/bin/busybox").read_bytes(), Path(__file__).read_bytes(), str(BASE_DISK_MIB).encode(), *programs)
    target = root / f"{DEFAULT_IMAGE}-{key}"
    if (target / "manifest.json").exists():
        return target
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        rootfs = Path(scratch) / "rootfs"
        populate_default_rootfs(rootfs)
        install_vers_init(rootfs)
        staged = Path(scratch) / "image"
        staged.mkdir()
        build_disk(rootfs, staged / "rootfs.qcow2", BASE_DISK_MIB)
        manifest = {"key": key, "name": DEFAULT_IMAGE, "disk_mib": BASE_DISK_MIB, "contents": "busybox, dropbear, git"}
        install_folder(staged, target, manifest)
    return target


def register(root: Path, images: dict[str, Path], kernel: Path | None = None, remove: tuple[str, ...] = ()) -> None:
    """Point image names at built folders in index.json: under a lock, replaced atomically, so a bake and
    `make images` at once both land and a reader never sees half a file."""
    index_file = root / "index.json"
    with open(root / ".index.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = json.loads(index_file.read_text()) if index_file.exists() else {"images": {}}
        if kernel is not None:
            index["kernel"] = kernel.name
        index["images"].update({name: folder.name for name, folder in images.items()})
        for name in remove:
            index["images"].pop(name, None)
        write_atomic(index_file, json.dumps(index, indent=2))


def build_all(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    kernel = build_kernel(root, root / "cache")
    register(root, {DEFAULT_IMAGE: build_default_image(root)}, kernel)


# The recipes the orchestrator builds itself, offline (the images API's "recipe" source): name -> what fills the root.
RECIPES: dict[str, Callable[[Path], None]] = {DEFAULT_IMAGE: populate_default_rootfs}
# The exit status of `build-image` when the source cannot make a disk (its stderr says why).
BUILD_REFUSED = 3


def build_image(spec: Mapping[str, Any]) -> int:
    """One image of the images API, built in a process of its own that the orchestrator kills on timeout (with
    its process group: mkfs, debugfs, qemu-img), apart from the orchestrator's threads. `spec`: the `scratch`
    folder to work in, the `target` folder to install, the `source` ("upload": `tarball` on a disk of
    `size_mib`; "recipe": `recipe` with `size_mib` MiB of room), the `manifest`, and `timeout` in seconds.
    Prints {"size_mib": ...}, the disk's size."""
    deadline = time.monotonic() + float(spec["timeout"])
    scratch = Path(spec["scratch"])
    rootfs = scratch / "rootfs"
    fixes: list[Fix] = []
    if spec["source"] == "upload":
        size = int(spec["size_mib"])
        fixes = unpack_root(Path(spec["tarball"]), rootfs, size)
    else:
        RECIPES[spec["recipe"]](rootfs)
        size = files_mib(rootfs) * 5 // 4 + 16 + int(spec["size_mib"])
    staged = scratch / "image"
    staged.mkdir()
    build_disk_from_root(rootfs, staged / "rootfs.qcow2", size, fixes, timeout=max(deadline - time.monotonic(), 1))
    install_folder(staged, Path(spec["target"]), {**spec["manifest"], "disk_mib": size})
    print(json.dumps({"size_mib": size}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.orchestrator.images")
    parser.add_argument("command", choices=["build", "build-image"])
    parser.add_argument("spec", nargs="?", default="{}", help="build-image: what to build, as JSON")
    arguments = parser.parse_args()
    if arguments.command == "build-image":
        try:
            return build_image(json.loads(arguments.spec))
        except DiskError as refused:
            print(refused, file=sys.stderr)
            return BUILD_REFUSED
    os.umask(0o022)  # the images folder is shared by every data folder on the machine
    root = images_dir()
    build_all(root)
    print(f"images ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
