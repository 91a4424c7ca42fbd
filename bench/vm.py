"""VM engine benchmark: boot, a new root VM from the pool of booted VMs, commit pause, sleep and wake, branch
latency, disk-size independence, memory of branches.

Runs the orchestrator's engine in this process on a temporary data folder, with the same images
as the platform. Prints the figures, each goal's next to its goal with the machine's facts, and writes them
as JSON (default bench/results/vm.json).

    python bench/vm.py [--runs 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.facts import Goal, describe, machine_facts, print_goals  # noqa: E402
from services.common.db import Database  # noqa: E402
from services.common.migrations import migrate  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.orchestrator.engine import Engine  # noqa: E402
from services.orchestrator.models import CommitRow, VmRow  # noqa: E402
from services.orchestrator.store import OrchestratorStore  # noqa: E402
from services.orchestrator.vmconfig import VmConfig  # noqa: E402

ORG = "bench"
GUEST_MIB = 256


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for {pid}")


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


class Bench:
    def __init__(self, engine: Engine, runs: int) -> None:
        self.engine = engine
        self.runs = runs

    async def exec(self, vm: VmRow, script: str) -> str:
        result = await self.engine.machine(vm).agent.exec(["sh", "-c", script])
        assert result.exit_code == 0, result
        return result.stdout.decode()

    async def delete(self, *vms: VmRow) -> None:
        for vm in vms:
            await self.engine.delete_vm(vm)

    async def boot(self, **config: int) -> tuple[VmRow, float]:
        started = time.perf_counter()
        vm = await self.engine.create_root(ORG, VmConfig(mem_size_mib=GUEST_MIB, **config), wait_boot=True)
        return vm, time.perf_counter() - started

    async def branch(self, commit: CommitRow) -> tuple[VmRow, float, float]:
        """(VM, seconds to running, seconds to the first exec answered)."""
        started = time.perf_counter()
        [vm] = await self.engine.restore(ORG, commit)
        running = time.perf_counter() - started
        await self.exec(vm, "true")
        return vm, running, time.perf_counter() - started

    async def pooled_roots(self) -> list[float]:
        """Seconds from asking for a new root VM of the default shape to its first exec answered, with the pool
        of booted VMs (one VM) refilled before each: what a user who asks less often than a boot takes sees."""
        self.engine.pool.resize(1)
        samples = []
        for _ in range(self.runs):
            async with asyncio.timeout(300):
                while self.engine.pool.ready < 1:
                    await asyncio.sleep(0.1)
            started = time.perf_counter()
            vm = await self.engine.create_root(ORG, VmConfig(), wait_boot=True)
            await self.exec(vm, "true")
            samples.append(time.perf_counter() - started)
            await self.delete(vm)
        self.engine.pool.resize(0)
        return samples

    async def pooled_branches(self, commit: CommitRow) -> tuple[list[float], list[float]]:
        """(Seconds to running, to first exec answered) of branches that each find a QEMU waiting for the commit's
        state (the pool of one per commit refilled, and settled, before each)."""
        pool = self.engine.branch_pool
        pool.resize(1)
        vm, _, _ = await self.branch(commit)  # the commit is branched: its pool fills
        await self.delete(vm)
        to_running, to_exec = [], []
        for _ in range(self.runs):
            async with asyncio.timeout(120):
                while pool.ready < 1:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            vm, running, answered = await self.branch(commit)
            to_running.append(running)
            to_exec.append(answered)
            await self.delete(vm)
        pool.resize(0)
        return to_running, to_exec

    async def run(self) -> dict[str, object]:
        facts = machine_facts(self.engine.accel)
        print(f"{describe(facts)}; {GUEST_MIB} MiB guests, {self.runs} runs each")
        boots = []
        for _ in range(self.runs):
            vm, seconds = await self.boot()
            boots.append(seconds)
            await self.delete(vm)
        print(f"boot to first exec (no pool): median {median_ms(boots)} ms")
        pooled = await self.pooled_roots()
        print(f"new root VM to first exec, from the pool of booted VMs: median {median_ms(pooled)} ms")

        base, _ = await self.boot()
        await self.exec(base, "(i=0; while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.1; done) >/dev/null 2>&1 &")
        pauses, commits, commit = [], [], None
        for _ in range(self.runs):
            # the whole call: the VM's lock, the intent row, the snapshot, RAM copy, checksums, flush, the rows
            started = time.perf_counter()
            commit, paused = await self.engine.commit(base, "bench", "", keep_paused=False)
            commits.append(time.perf_counter() - started)
            base = await self.engine.store.get_vm(ORG, base.id)
            pauses.append(paused)
        assert commit is not None
        print(f"commit pause: median {median_ms(pauses)} ms (goal < 100 ms); whole commit call: median {median_ms(commits)} ms")

        sleeps, wakes, woken_exec = [], [], []
        for _ in range(self.runs):
            started = time.perf_counter()
            base = await self.engine.set_state(base, "Sleeping")
            sleeps.append(time.perf_counter() - started)
            started = time.perf_counter()
            base = await self.engine.set_state(base, "Running")
            wakes.append(time.perf_counter() - started)
            await self.exec(base, "true")
            woken_exec.append(time.perf_counter() - started)
        print(
            f"sleep (memory to disk, QEMU gone): median {median_ms(sleeps)} ms; wake to running: median "
            f"{median_ms(wakes)} ms, to first exec answered: median {median_ms(woken_exec)} ms"
        )

        to_running, to_exec = [], []
        for _ in range(self.runs):
            vm, running, answered = await self.branch(commit)
            to_running.append(running)
            to_exec.append(answered)
            await self.delete(vm)
        print(f"branch to running: median {median_ms(to_running)} ms; to first exec answered: median {median_ms(to_exec)} ms")
        pooled_running, pooled_exec = await self.pooled_branches(commit)
        print(
            f"branch with a QEMU waiting for it: to running median {median_ms(pooled_running)} ms; to first exec answered: "
            f"median {median_ms(pooled_exec)} ms"
        )

        disk_times = {}
        for size, fill in ((128, 0), (4096, 256)):
            vm, _ = await self.boot(fs_size_mib=size)
            if fill:
                await self.exec(vm, f"dd if=/dev/urandom of=/root/fill bs=1M count={fill} 2>/dev/null && sync")
            disk_commit, _ = await self.engine.commit(vm, f"{size} MiB disk", "", keep_paused=False)
            samples = []
            for _ in range(self.runs):
                branch, running, _ = await self.branch(disk_commit)
                samples.append(running)
                await self.delete(branch)
            disk_times[size] = statistics.median(samples)
            await self.delete(vm)
        ratio = disk_times[4096] / disk_times[128]
        print(
            f"branch to running, 128 MiB disk {disk_times[128] * 1000:.1f} ms, 4 GiB disk with 256 MiB written "
            f"{disk_times[4096] * 1000:.1f} ms: ratio {ratio:.2f}"
        )

        one, _, _ = await self.branch(commit)
        await asyncio.sleep(1)
        one_pss = pss_kib(self.engine.machine(one).pid)
        await self.delete(one)
        ten = await self.engine.restore(ORG, commit, 10)
        for vm in ten:
            await self.exec(vm, "true")
        await asyncio.sleep(1)
        ten_pss = sum(pss_kib(self.engine.machine(vm).pid) for vm in ten)
        await self.delete(*ten, base)
        print(f"memory (PSS): 1 branch {one_pss / 1024:.0f} MiB, 10 branches {ten_pss / 1024:.0f} MiB: {ten_pss / one_pss:.2f}x")
        goals = print_goals(
            [
                Goal("branch (from a commit) to first exec answered", median_ms(to_exec), 150, "ms"),
                Goal("branch to first exec, QEMU waiting in the pool", median_ms(pooled_exec), 60, "ms"),
                Goal("new root VM to first exec answered (pool of booted VMs)", median_ms(pooled), 1500, "ms"),
                Goal("10 branches' memory (PSS) vs 1", round(ten_pss / one_pss, 2), 3, "x"),
            ]
        )
        return {
            **facts,
            "goals": goals,
            "guest_mem_mib": GUEST_MIB,
            "runs": self.runs,
            "boot_ms_median": median_ms(boots),
            "new_root_pooled_to_first_exec_ms_median": median_ms(pooled),
            "commit_pause_ms_median": median_ms(pauses),
            "commit_call_ms_median": median_ms(commits),
            "sleep_ms_median": median_ms(sleeps),
            "wake_to_running_ms_median": median_ms(wakes),
            "wake_to_first_exec_ms_median": median_ms(woken_exec),
            "branch_to_running_ms_median": median_ms(to_running),
            "branch_to_first_exec_ms_median": median_ms(to_exec),
            "pooled_branch_to_running_ms_median": median_ms(pooled_running),
            "pooled_branch_to_first_exec_ms_median": median_ms(pooled_exec),
            "branch_ms_128mib_disk": round(disk_times[128] * 1000, 1),
            "branch_ms_4gib_disk": round(disk_times[4096] * 1000, 1),
            "branch_disk_size_ratio": round(ratio, 3),
            "pss_mib_1_branch": round(one_pss / 1024, 1),
            "pss_mib_10_branches": round(ten_pss / 1024, 1),
            "memory_ratio_10_vs_1": round(ten_pss / one_pss, 2),
        }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "vm.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vers-bench-") as data:
        settings = Settings(data_dir=Path(data), images_dir=str(Settings().image_root), root_pool_size=0, branch_pool_size=0)
        db = Database(settings.database_url("orchestrator"))
        await migrate(db, "orchestrator")
        engine = Engine(settings, OrchestratorStore(db, max_vcpus=1000, max_memory_mib=10**7))
        await engine.start()
        try:
            figures = await Bench(engine, args.runs).run()
        finally:
            for record in engine.supervisor.running():
                if record.machine is not None:
                    record.ending = True
                    await record.machine.kill()
            await engine.close()
            await db.close()
            shutil.rmtree(engine.layout.run, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
