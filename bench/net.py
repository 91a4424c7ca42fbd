"""Guest networking benchmark: download throughput from a server outside the VM, tunnel round trip and
throughput through the gateway's WebSocket, and what the NIC adds to branch-to-first-exec.

Runs the whole platform in this process (as the test suite does) on a temporary data folder. "Outside"
is a network namespace this bench makes on this machine (tests/outside.py), the only address its
guests may reach. Prints the figures next to their goals and writes JSON (default bench/results/net.json).

    python bench/net.py [--runs 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import websockets  # noqa: E402

from services.common.settings import Settings  # noqa: E402
from services.inprocess import InProcessPlatform  # noqa: E402
from services.orchestrator.engine import Engine  # noqa: E402
from services.orchestrator.vmconfig import VmConfig  # noqa: E402
from tests.conftest import kill_vms_under  # noqa: E402
from tests.outside import outside_world  # noqa: E402

DOWNLOAD_MIB = 64
ROUND_TRIPS = 200


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def engine_of(platform: InProcessPlatform) -> Engine:
    closers = platform.running["orchestrator"].service.on_close
    return next(close.__self__ for close in closers if isinstance(getattr(close, "__self__", None), Engine))  # type: ignore[attr-defined]


class Bench:
    def __init__(self, platform: InProcessPlatform, key: str, outside: str, runs: int) -> None:
        self.platform = platform
        self.http = httpx.AsyncClient(base_url=platform.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        self.key = key
        self.outside = outside
        self.runs = runs
        self.engine = engine_of(platform)

    async def sh(self, vm_id: str, script: str) -> str:
        answer = (await self.http.post(f"/api/v1/vm/{vm_id}/exec", json={"command": ["sh", "-c", script]})).json()
        assert answer["exit_code"] == 0, answer
        return str(answer["stdout"])

    async def new_vm(self, network: str) -> str:
        answer = await self.http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 256, "network": network}})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["vm_id"])

    async def nicless_vm(self) -> str:
        """A VM as made before VMs had a NIC (its commits and branches have none): the baseline."""
        engine = self.engine
        original = engine._spec

        def without_nic(vm, incoming, ram_file):  # type: ignore[no-untyped-def]
            return dataclasses.replace(original(vm, incoming, ram_file), network="", prefix=())

        engine._spec = without_nic  # type: ignore[method-assign]
        try:
            vm = await engine.create_root(self.org_id, VmConfig(mem_size_mib=256), wait_boot=True)
        finally:
            engine._spec = original  # type: ignore[method-assign]
        await engine.store.update_vm(vm.id, network="")
        return vm.id

    async def branch_to_exec(self, commit: str) -> float:
        started = time.perf_counter()
        branch = (await self.http.post(f"/api/v1/vm/branch/by_commit/{commit}")).json()["vms"][0]["vm_id"]
        await self.sh(branch, "true")
        took = time.perf_counter() - started
        await self.http.delete(f"/api/v1/vm/{branch}")
        return took

    def tunnel_url(self, vm_id: str, port: int) -> str:
        return self.platform.url.replace("http://", "ws://") + f"/api/v1/vm/{vm_id}/tunnel?port={port}"

    async def run(self) -> dict[str, object]:
        self.org_id = (await self.http.get("/api/v1/whoami")).json()["org"]["id"]
        print(f"accelerator: {self.engine.accel}, 256 MiB guests, {self.runs} runs each")
        vm = await self.new_vm("nat")

        # download from outside: the exec's own cost (an exec of `true`) is taken off each sample
        downloads = []
        for _ in range(self.runs):
            started = time.perf_counter()
            await self.sh(vm, "true")
            base = time.perf_counter() - started
            started = time.perf_counter()
            await self.sh(vm, f"wget -q -O /dev/null http://{self.outside}:8080/blob")
            downloads.append(DOWNLOAD_MIB / (time.perf_counter() - started - base))
        download = round(statistics.median(downloads), 1)
        print(f"guest download from outside (NAT): median {download} MiB/s ({DOWNLOAD_MIB} MiB file)")

        # tunnel: an echo server and a file server in the guest
        await self.sh(vm, f"mkdir -p /www && dd if=/dev/zero of=/www/blob bs=1M count={DOWNLOAD_MIB} 2>/dev/null && httpd -p 80 -h /www")
        await self.sh(vm, "(while :; do nc -l -p 7 -e cat; done) >/dev/null 2>&1 &")
        await asyncio.sleep(0.5)
        headers = {"Authorization": f"Bearer {self.key}"}
        async with websockets.connect(self.tunnel_url(vm, 7), additional_headers=headers) as tunnel:
            trips = []
            for _ in range(ROUND_TRIPS):
                started = time.perf_counter()
                await tunnel.send(b"x")
                await tunnel.recv()
                trips.append(time.perf_counter() - started)
        rtt = median_ms(trips)
        print(f"tunnel round trip (1 byte, {ROUND_TRIPS} trips): median {rtt} ms")
        rates = []
        for _ in range(self.runs):
            async with websockets.connect(self.tunnel_url(vm, 80), additional_headers=headers, max_size=None) as tunnel:
                started = time.perf_counter()
                await tunnel.send(b"GET /blob HTTP/1.0\r\n\r\n")
                received = 0
                try:
                    async for frame in tunnel:
                        received += len(frame)
                except websockets.ConnectionClosedOK:
                    pass
                rates.append(received / 2**20 / (time.perf_counter() - started))
            assert received > DOWNLOAD_MIB * 2**20
        tunnel_rate = round(statistics.median(rates), 1)
        print(f"tunnel throughput (guest -> client, {DOWNLOAD_MIB} MiB over HTTP): median {tunnel_rate} MiB/s")

        # what the NIC costs a branch: a VM without one, one with network "none", one with "nat"; the three
        # take turns in every round, so the machine's drift over the run falls on each alike
        sources = {"no NIC": await self.nicless_vm(), "none": await self.new_vm("none"), "nat": await self.new_vm("nat")}
        commits = {
            name: (await self.http.post(f"/api/v1/vm/{vm_id}/commit", json={})).json()["commit_id"] for name, vm_id in sources.items()
        }
        samples: dict[str, list[float]] = {name: [] for name in sources}
        for _ in range(self.runs):
            for name, commit in commits.items():
                samples[name].append(await self.branch_to_exec(commit))
        branch_ms = {name: median_ms(values) for name, values in samples.items()}
        for vm_id in sources.values():
            await self.http.delete(f"/api/v1/vm/{vm_id}")
        added = round(branch_ms["nat"] - branch_ms["no NIC"], 2)
        print(
            f"branch to first exec over REST: no NIC {branch_ms['no NIC']} ms, network none {branch_ms['none']} ms, "
            f"nat {branch_ms['nat']} ms: the network adds {added} ms (goal < 10 ms)"
        )
        await self.http.delete(f"/api/v1/vm/{vm}")
        await self.http.aclose()
        return {
            "accelerator": self.engine.accel,
            "runs": self.runs,
            "download_mib_per_s_median": download,
            "tunnel_round_trip_ms_median": rtt,
            "tunnel_mib_per_s_median": tunnel_rate,
            "branch_to_first_exec_ms_median": branch_ms,
            "network_adds_to_branch_ms": added,
        }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "net.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vers-bench-net-") as scratch, outside_world(Path(scratch) / "www") as outside:
        with (outside.folder / "blob").open("wb") as blob:
            blob.truncate(DOWNLOAD_MIB * 2**20)
        settings = Settings(
            data_dir=Path(scratch) / "data", images_dir=str(Settings().image_root), guest_allow=outside.address, guest_dns="none"
        )  # fmt: skip
        platform = await InProcessPlatform.start(settings)
        try:
            key = settings.admin_key_file.read_text().strip()
            async with httpx.AsyncClient(base_url=platform.url, headers={"Authorization": f"Bearer {key}"}) as admin:
                token = (await admin.post("/api/v1/admin/orgs", json={"name": "bench-net"})).json()["token"]
            figures = await Bench(platform, token, outside.address, args.runs).run()
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
