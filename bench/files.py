"""File transfer benchmark: a tar stream into and out of a VM through the REST path, and each part of the
way on its own, so the figures say where the time goes.

Runs the whole platform in this process (as the test suite does) on a temporary data folder, with one VM.
For each direction it times, with a payload of random bytes (--mib, 256 MiB by default):
  - the guest alone: writing to /root (ext4 on the qcow2 disk), /tmp (tmpfs) and /dev/null, reading back;
    `tar` packing and unpacking in the guest;
  - the transport alone: SSH (`cat` at the far end) with asyncssh's default window and packet size and
    with larger ones, and a raw TCP connection to a one-shot `nc -l -e cat` in the guest over the same host
    forward (what the transfers use when the guest has busybox). Not measured here any more: nc copying
    the data itself (`... | nc -l`) writes 1 KiB at a time, 3.3 MB/s out of the guest;
  - DownloadFiles / UploadFiles over gRPC, then GET / PUT /api/v1/vm/{id}/files/tar over HTTP (the gateway).
Prints medians of --runs runs next to the goal and writes JSON (default bench/results/files.json).

    python bench/files.py [--runs 3] [--mib 256] [--only ssh,raw,...] [--over-ssh] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform as host
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402
from google.api import httpbody_pb2  # noqa: E402

from services.common.settings import Settings  # noqa: E402
from services.inprocess import InProcessPlatform  # noqa: E402
from services.orchestrator import files  # noqa: E402
from services.orchestrator.engine import Engine  # noqa: E402
from services.orchestrator.guestssh import guest_ssh  # noqa: E402
from services.orchestrator.models import VmRow  # noqa: E402
from tests.conftest import kill_vms_under  # noqa: E402
from vers.orchestrator.v1 import orchestrator_pb2 as pb  # noqa: E402
from vers.orchestrator.v1 import orchestrator_pb2_grpc  # noqa: E402

MIB = 1 << 20
CHUNK = 256 * 1024
# The goal: 1 GiB each way in well under a minute, on a 2-core host running guests under TCG.
GOAL_MB_S = 1024 * MIB / 60 / 1e6
RAW_PORT = 7999
PARTS = ("guest", "tar", "ssh", "raw", "grpc", "rest")


def engine_of(platform: InProcessPlatform) -> Engine:
    closers = platform.running["orchestrator"].service.on_close
    return next(close.__self__ for close in closers if isinstance(getattr(close, "__self__", None), Engine))  # type: ignore[attr-defined]


def rate(size: int, seconds: float) -> float:
    return round(size / seconds / 1e6, 1)


class Bench:
    def __init__(self, platform: InProcessPlatform, key: str, runs: int, size: int, payload: Path) -> None:
        self.platform = platform
        self.key = key
        self.runs = runs
        self.size = size
        self.payload = payload
        self.engine = engine_of(platform)
        self.http = httpx.AsyncClient(base_url=platform.url, headers={"Authorization": f"Bearer {key}"}, timeout=1800)
        self.figures: dict[str, float] = {}

    async def sh(self, vm_id: str, script: str) -> str:
        answer = (await self.http.post(f"/api/v1/vm/{vm_id}/exec", json={"command": ["sh", "-c", script], "timeout_secs": 600})).json()
        assert answer["exit_code"] == 0, answer
        return str(answer["stdout"])

    async def median(self, name: str, once: Callable[[], Awaitable[float]], before: Callable[[], Awaitable[object]] | None = None) -> float:
        """The median MB/s of `once` (which returns seconds) over the runs, printed and kept."""
        samples = []
        for _ in range(self.runs):
            if before is not None:
                await before()
            samples.append(await once())
        figure = rate(self.size, statistics.median(samples))
        self.figures[name] = figure
        print(f"  {name:<44} {figure:>7.1f} MB/s  ({statistics.median(samples):.1f} s)", flush=True)
        return figure

    def chunks(self) -> AsyncIterator[bytes]:
        async def read() -> AsyncIterator[bytes]:
            with self.payload.open("rb") as file:
                while data := file.read(CHUNK):
                    yield data

        return read()

    async def timed_sh(self, vm_id: str, script: str) -> float:
        started = time.perf_counter()
        await self.sh(vm_id, script)
        return time.perf_counter() - started

    async def guest(self, vm_id: str) -> None:
        print("guest alone (no transfer):")
        drop = "sync; echo 3 > /proc/sys/vm/drop_caches"
        await self.sh(vm_id, f"head -c {self.size} /dev/urandom > /tmp/src")
        await self.median(
            "guest write /root (ext4 on qcow2), synced",
            lambda: self.timed_sh(vm_id, "dd if=/tmp/src of=/root/dst bs=1M 2>/dev/null && sync"),
            lambda: self.sh(vm_id, f"rm -f /root/dst; {drop}"),
        )
        await self.median(
            "guest write /tmp (tmpfs, zeros)",
            lambda: self.timed_sh(vm_id, f"dd if=/dev/zero of=/tmp/dst bs=1M count={self.size // MIB} 2>/dev/null"),
            lambda: self.sh(vm_id, "rm -f /tmp/dst"),
        )
        await self.sh(vm_id, "rm -f /tmp/dst")
        await self.median("guest write /dev/null", lambda: self.timed_sh(vm_id, "dd if=/tmp/src of=/dev/null bs=1M 2>/dev/null"))
        await self.median(
            "guest read /root, page cache dropped",
            lambda: self.timed_sh(vm_id, "dd if=/root/dst of=/dev/null bs=1M 2>/dev/null"),
            lambda: self.sh(vm_id, drop),
        )

    async def tar(self, vm_id: str) -> None:
        print("tar in the guest (no transfer):")
        await self.median(
            "guest tar -c of a file in /tmp > /dev/null", lambda: self.timed_sh(vm_id, "cd /tmp && tar -c -f - src | cat > /dev/null")
        )
        await self.sh(vm_id, "cd /tmp && tar -c -f /tmp/src.tar src && rm /tmp/src")
        await self.median(
            "guest tar -x from /tmp into /root, synced",
            lambda: self.timed_sh(vm_id, "mkdir -p /root/x && cd /root/x && tar -x -o -f /tmp/src.tar && sync"),
            lambda: self.sh(vm_id, "rm -rf /root/x; sync"),
        )
        await self.sh(vm_id, "rm -rf /root/x /tmp/src.tar /root/dst")

    async def ssh(self, vm_id: str) -> None:
        vm = await self._vm_row(vm_id)
        for label, options in (("default window", {}), ("16 MiB window, 256 KiB packets", {"window": 16 * MIB, "max_pktsize": 256 * 1024})):
            print(f"SSH alone ({label}):")

            async def into(options: dict[str, int] = options) -> float:
                async with (
                    guest_ssh(self.engine, vm) as ssh,
                    ssh.create_process("cat > /dev/null", encoding=None, **options) as process,
                ):
                    started = time.perf_counter()
                    async for data in self.chunks():
                        process.stdin.write(data)
                        await process.stdin.drain()
                    process.stdin.write_eof()
                    await process.wait()
                    return time.perf_counter() - started

            async def out(options: dict[str, int] = options) -> float:
                async with (
                    guest_ssh(self.engine, vm) as ssh,
                    ssh.create_process(f"head -c {self.size} /dev/urandom > /tmp/src; cat /tmp/src", encoding=None, **options) as process,
                ):
                    first = await process.stdout.read(CHUNK)
                    started = time.perf_counter()
                    got = len(first)
                    while data := await process.stdout.read(CHUNK):
                        got += len(data)
                    await process.wait()
                    assert got == self.size, got
                    return time.perf_counter() - started

            await self.median(f"ssh into the VM ({label})", into)
            await self.median(f"ssh out of the VM ({label})", out)
        await self.sh(vm_id, "rm -f /tmp/src")

    async def _vm_row(self, vm_id: str) -> VmRow:
        vm = await self.engine.store.vm(vm_id)
        assert vm is not None
        return vm

    async def raw(self, vm_id: str) -> None:
        print("raw TCP to a one-shot nc -l -e cat in the guest:")
        vm = await self._vm_row(vm_id)

        async def connected(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, contextlib.AsyncExitStack]:
            for _ in range(200):
                stack = contextlib.AsyncExitStack()
                reader, writer = await stack.enter_async_context(self.engine.connect_port(vm, port))
                first = await reader.read(1)
                if first:
                    return reader, writer, stack
                await stack.aclose()
                await asyncio.sleep(0.05)
            raise RuntimeError("nc never listened")

        async def into() -> float:
            listening = asyncio.create_task(self.sh(vm_id, f"nc -l -p {RAW_PORT} -e sh -c 'printf R; exec cat > /dev/null'"))
            reader, writer, stack = await connected(RAW_PORT)
            started = time.perf_counter()
            async for data in self.chunks():
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await reader.read()
            await listening
            await stack.aclose()
            return time.perf_counter() - started

        async def out() -> float:
            await self.sh(vm_id, f"head -c {self.size} /dev/urandom > /tmp/src")
            listening = asyncio.create_task(self.sh(vm_id, f"nc -l -p {RAW_PORT} -e sh -c 'printf R; exec cat /tmp/src'"))
            reader, writer, stack = await connected(RAW_PORT)
            started = time.perf_counter()
            got = 0
            while data := await reader.read(CHUNK):
                got += len(data)
            assert got == self.size, got
            writer.close()  # nc ends when both sides have
            await listening
            await stack.aclose()
            return time.perf_counter() - started

        await self.median("raw TCP into the VM (cat > /dev/null)", into)
        await self.median("raw TCP out of the VM (cat /tmp file)", out)
        await self.sh(vm_id, "rm -f /tmp/src")

    def tar_of_payload(self) -> Path:
        tar_path = self.payload.with_suffix(".tar")
        if not tar_path.exists():
            with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(self.payload, arcname="payload.bin")
        return tar_path

    async def grpc(self, vm_id: str) -> None:
        print("gRPC UploadFiles / DownloadFiles (the orchestrator, no gateway):")
        tar_path = self.tar_of_payload()
        metadata = (("authorization", f"Bearer {self.key}"),)
        async with grpc.aio.insecure_channel(self.platform.settings.orchestrator_addr) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

            async def into() -> float:
                async def messages() -> AsyncIterator[pb.UploadFilesRequest]:
                    yield pb.UploadFilesRequest(vm_id=vm_id, path="/root/in")
                    with tar_path.open("rb") as file:
                        while data := file.read(64 * 1024):
                            yield pb.UploadFilesRequest(data=httpbody_pb2.HttpBody(data=data))

                started = time.perf_counter()
                await stub.UploadFiles(messages(), metadata=metadata, timeout=1800)
                return time.perf_counter() - started

            async def out() -> float:
                started = time.perf_counter()
                got = 0
                async for message in stub.DownloadFiles(
                    pb.DownloadFilesRequest(vm_id=vm_id, path="/root/in/payload.bin"), metadata=metadata, timeout=1800
                ):
                    got += len(message.data.data)
                assert got >= self.size, got
                return time.perf_counter() - started

            await self.median("gRPC into the VM (/root)", into, lambda: self.sh(vm_id, "rm -rf /root/in; sync"))
            await self.median("gRPC out of the VM (/root)", out, lambda: self.sh(vm_id, "sync; echo 3 > /proc/sys/vm/drop_caches"))

    async def rest(self, vm_id: str) -> None:
        print("REST PUT / GET /api/v1/vm/{id}/files/tar (gateway, then gRPC, then the guest):")
        tar_path = self.tar_of_payload()

        async def into() -> float:
            async def body() -> AsyncIterator[bytes]:
                with tar_path.open("rb") as file:
                    while data := file.read(CHUNK):
                        yield data

            started = time.perf_counter()
            answer = await self.http.put(f"/api/v1/vm/{vm_id}/files/tar", params={"path": "/root/in"}, content=body())
            assert answer.status_code == 200, answer.text
            return time.perf_counter() - started

        async def out() -> float:
            started = time.perf_counter()
            got = 0
            async with self.http.stream("GET", f"/api/v1/vm/{vm_id}/files/tar", params={"path": "/root/in/payload.bin"}) as answer:
                assert answer.status_code == 200
                async for data in answer.aiter_raw(CHUNK):
                    got += len(data)
            assert got >= self.size, got
            return time.perf_counter() - started

        await self.median("REST into the VM (/root)", into, lambda: self.sh(vm_id, "rm -rf /root/in; sync"))
        await self.median("REST out of the VM (/root)", out, lambda: self.sh(vm_id, "sync; echo 3 > /proc/sys/vm/drop_caches"))

    async def run(self, parts: list[str]) -> dict[str, object]:
        print(
            f"host: {os.cpu_count()} cores, {host.machine()}, load {os.getloadavg()[0]:.1f}; accelerator: {self.engine.accel}; "
            f"{self.size // MIB} MiB of random bytes, median of {self.runs} runs; goal: 1 GiB each way well under a minute "
            f"(> {GOAL_MB_S:.0f} MB/s)",
            flush=True,
        )
        answer = await self.http.post(
            "/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 1024, "fs_size_mib": 3 * self.size // MIB + 1024}}
        )
        assert answer.status_code == 201, answer.text
        vm_id = answer.json()["vm_id"]
        try:
            for part in parts:
                await getattr(self, part)(vm_id)
        finally:
            await self.http.delete(f"/api/v1/vm/{vm_id}")
        return {
            "host_cores": os.cpu_count(),
            "accelerator": self.engine.accel,
            "mib": self.size // MIB,
            "runs": self.runs,
            "goal_mb_s": round(GOAL_MB_S, 1),
            "load_average": round(os.getloadavg()[0], 1),
            "mb_s": self.figures,
        }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of {','.join(PARTS)}")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "files.json")
    parser.add_argument("--over-ssh", action="store_true", help="gRPC and REST carry the tar over SSH, as for a guest without busybox")
    args = parser.parse_args()
    if args.over_ssh:

        @contextlib.asynccontextmanager
        async def no_port(vm: VmRow) -> AsyncIterator[str]:
            yield ""

        files._raw_port = no_port  # type: ignore[assignment]
    parts = [part for part in args.only.split(",") if part]
    assert set(parts) <= set(PARTS), f"--only takes {PARTS}"
    with tempfile.TemporaryDirectory(prefix="vers-bench-files-") as scratch:
        payload = Path(scratch) / "payload.bin"
        with payload.open("wb") as file:
            for _ in range(args.mib):
                file.write(os.urandom(MIB))
        settings = Settings(data_dir=Path(scratch) / "data", images_dir=str(Settings().image_root))
        platform = await InProcessPlatform.start(settings)
        try:
            key = settings.admin_key_file.read_text().strip()
            async with httpx.AsyncClient(base_url=platform.url, headers={"Authorization": f"Bearer {key}"}) as admin:
                token = (await admin.post("/api/v1/admin/orgs", json={"name": "bench-files"})).json()["token"]
            figures = await Bench(platform, token, args.runs, args.mib * MIB, payload).run(parts)
        finally:
            kill_vms_under(platform.settings.vm_run_dir)
            await asyncio.sleep(0.3)
            await platform.stop()
            shutil.rmtree(platform.settings.vm_run_dir, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
