"""Several VM hosts: branch to first exec of a commit made on another host (its files not yet in this host's
cache, then cached) against one made on the same host, and the commit call with the commit written to the
shared store.

Starts the platform in this process with its orchestrator as the API of several hosts, and two host agents
(processes of their own, separate data and run folders, one shared commit-store folder, all on this
machine). Each round commits the VM on host A (a new commit, so host B has none of it cached), then branches
it on B (cold), on B again (warm) and on A, each timed from the call to the first exec answered, each
deleted after. The administrator's `vers-placement-host` metadata chooses the host. Prints medians and writes
JSON (default bench/results/hosts.json).

    python bench/hosts.py [--runs 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.fernet import Fernet  # noqa: E402

from services.common.settings import Settings  # noqa: E402
from services.inprocess import HostAgentProcess, InProcessPlatform  # noqa: E402
from services.orchestrator.router import PLACEMENT_HINT  # noqa: E402
from vers.orchestrator.v1 import hosts_pb2, hosts_pb2_grpc  # noqa: E402
from vers.orchestrator.v1 import orchestrator_pb2 as pb  # noqa: E402
from vers.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc  # noqa: E402

GUEST_MIB = 256


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


class Bench:
    def __init__(self, platform: InProcessPlatform, runs: int) -> None:
        self.platform = platform
        self.runs = runs
        self.key = platform.settings.admin_key_file.read_text().strip()
        self.channel = grpc.aio.insecure_channel(platform.settings.orchestrator_addr)
        self.vms = pb_grpc.OrchestratorServiceStub(self.channel)

    def on(self, host: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"), (PLACEMENT_HINT, host))

    async def wait_hosts(self, *names: str) -> list[hosts_pb2.HostStatus]:
        registry = hosts_pb2_grpc.HostsServiceStub(self.channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            hosts = (await registry.ListHosts(hosts_pb2.ListHostsRequest(), metadata=self.on(""), timeout=10)).hosts
            up = [host for host in hosts if host.state == "up"]
            if {host.host_id for host in up} >= set(names):
                return up
            await asyncio.sleep(0.2)
        raise RuntimeError(f"host agents {names} did not register within 120 s")

    async def exec(self, vm_id: str, host: str) -> None:
        answer = await self.vms.ExecVm(pb.ExecVmRequest(vm_id=vm_id, command=["true"]), metadata=self.on(host), timeout=120)
        assert answer.exit_code == 0, answer

    async def branch(self, commit_id: str, host: str) -> float:
        """Seconds from the branch call to the first exec answered in the new VM on `host`; the VM is deleted."""
        started = time.perf_counter()
        answer = await self.vms.BranchByCommit(pb.BranchByCommitRequest(commit_id=commit_id, count=1), metadata=self.on(host), timeout=120)
        vm_id = answer.vms[0].vm_id
        await self.exec(vm_id, host)
        seconds = time.perf_counter() - started
        await self.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), metadata=self.on(host), timeout=120)
        return seconds

    async def run(self) -> dict[str, object]:
        hosts = await self.wait_hosts("a", "b")
        accelerator = hosts[0].accelerator
        print(f"accelerator: {accelerator}, {os.cpu_count()} cores, {GUEST_MIB} MiB guests, {self.runs} runs each")
        config = pb.VmConfig(mem_size_mib=GUEST_MIB)
        root = await self.vms.CreateRootVm(pb.CreateRootVmRequest(vm_config=config, wait_boot=True), metadata=self.on("a"), timeout=300)
        await self.exec(root.vm_id, "a")
        commits: list[float] = []
        cold: list[float] = []
        warm: list[float] = []
        same: list[float] = []
        for _ in range(self.runs):
            started = time.perf_counter()
            commit = await self.vms.CommitVm(pb.CommitVmRequest(vm_id=root.vm_id), metadata=self.on("a"), timeout=300)
            commits.append(time.perf_counter() - started)
            cold.append(await self.branch(commit.commit_id, "b"))
            warm.append(await self.branch(commit.commit_id, "b"))
            same.append(await self.branch(commit.commit_id, "a"))
        await self.vms.DeleteVm(pb.DeleteVmRequest(vm_id=root.vm_id), metadata=self.on("a"), timeout=120)
        print(f"commit call, written to the shared store: median {median_ms(commits)} ms")
        print("branch to first exec answered (no goal set; the same host is the reference):")
        print(f"  same host:                    median {median_ms(same)} ms")
        print(f"  other host, cold cache:       median {median_ms(cold)} ms")
        print(f"  other host, warm cache:       median {median_ms(warm)} ms")
        return {
            "accelerator": accelerator,
            "cores": os.cpu_count(),
            "guest_mib": GUEST_MIB,
            "runs": self.runs,
            "commit_to_shared_store_ms": median_ms(commits),
            "branch_to_first_exec_same_host_ms": median_ms(same),
            "branch_to_first_exec_other_host_cold_ms": median_ms(cold),
            "branch_to_first_exec_other_host_warm_ms": median_ms(warm),
            "samples_ms": {
                "commit": [round(s * 1000, 1) for s in commits],
                "same_host": [round(s * 1000, 1) for s in same],
                "other_host_cold": [round(s * 1000, 1) for s in cold],
                "other_host_warm": [round(s * 1000, 1) for s in warm],
            },
        }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "hosts.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vers-bench-hosts-") as folder:
        store = Path(folder) / "commit-store"
        store.mkdir()
        settings = Settings(
            data_dir=Path(folder) / "api",
            images_dir=str(Settings().image_root),
            log_level="WARNING",
            orchestrator_role="api",
            orchestrator_database_url=f"sqlite+aiosqlite:///{Path(folder) / 'orchestrator.db'}",
            service_secret=secrets.token_hex(32),
            env_vars_key=Fernet.generate_key().decode(),
            commit_store=str(store),
            host_heartbeat_seconds=0.5,
        )
        platform = await InProcessPlatform.start(settings)
        agents = [HostAgentProcess.beside(platform.settings, name, Path(folder) / f"host-{name}") for name in ("a", "b")]
        for agent in agents:
            agent.start()
        bench = Bench(platform, args.runs)
        try:
            figures = await bench.run()
        finally:
            await bench.channel.close()
            for agent in agents:
                agent.stop()
                shutil.rmtree(agent.run_dir, ignore_errors=True)
            await platform.stop()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
