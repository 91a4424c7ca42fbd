"""Fork and branch benchmark over REST: a public tag forked into another organization, and a commit branched to
its first exec answered, end to end over REST.

The platform runs in this process (services/inprocess.py). The organization `vers` (the administrator's)
publishes a public repository `base` whose tag `latest` names a commit of a real VM with a counter running;
a second organization forks it with `POST /api/v1/repositories/fork`, each time to a new tag, and each
fork's VM is deleted after its timing. Prints the median latency next to the goal, with the machine facts,
and `vers repo fork` timed as a person runs it (the CLI's start-up included). Then the same commit is branched
(`POST /api/v1/vm/branch/by_commit/{id}`) and the new VM's first exec (`POST /api/v1/vm/{id}/exec`, `true`)
answered: with a QEMU waiting for the commit (VERS_BRANCH_POOL_SIZE=1, given the second it takes to refill
before each branch), and on a second platform without that pool. Neither platform keeps booted root VMs, whose
boots would share the cores with the figures. Writes JSON (default bench/results/fork.json).

    python bench/fork.py [--runs 10] [--cli-runs 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.facts import Goal, describe, facts_of, print_goals  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.inprocess import InProcessPlatform  # noqa: E402

GOAL_MS = 300.0
GUEST_MIB = 256
VERS = Path(sys.executable).parent / "vers"
COUNTER = "(i=0; while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.1; done) >/dev/null 2>&1 &"
FORKED_VM = re.compile(r"VM:\s+(\S+)")


def checked(answer: httpx.Response, status: int) -> dict[str, str]:
    if answer.status_code != status:
        raise SystemExit(f"{answer.request.method} {answer.request.url.path} answered {answer.status_code}: {answer.text}")
    return dict(answer.json()) if answer.content else {}


async def publish(http: httpx.AsyncClient) -> str:
    """vers/base:latest, public: a commit of a VM whose counter runs. The VM goes: forks start from the commit."""
    vm = checked(await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": GUEST_MIB}}), 201)["vm_id"]
    checked(await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["sh", "-c", f"echo upstream > /root/origin; {COUNTER}"]}), 200)
    commit = checked(await http.post(f"/api/v1/vm/{vm}/commit", json={"name": "base"}), 201)["commit_id"]
    checked(await http.delete(f"/api/v1/vm/{vm}"), 200)
    checked(await http.post("/api/v1/repositories", json={"name": "base"}), 201)
    checked(await http.patch("/api/v1/repositories/base/visibility", json={"is_public": True}), 200)  # runs the secret scan
    checked(await http.post("/api/v1/repositories/base/tags", json={"tag_name": "latest", "commit_id": commit}), 201)
    return commit


async def fork_once(http: httpx.AsyncClient, tag: str) -> tuple[float, dict[str, str]]:
    """One fork's latency in ms, from the request sent to the answer read, and the answer."""
    body = {"source_org": "vers", "source_repo": "base", "source_tag": "latest", "repo_name": "forks", "tag_name": tag}
    started = time.perf_counter()
    answer = await http.post("/api/v1/repositories/fork", json=body)
    elapsed = (time.perf_counter() - started) * 1000
    return elapsed, checked(answer, 201)


async def cli_fork(env: dict[str, str], tag: str) -> tuple[float, str]:
    """`vers repo fork` as a person runs it: the process's whole run in ms, and the VM it made."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        str(VERS), "repo", "fork", "vers/base:latest", "--repo-name", "cli-forks", "--tag-name", tag,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    elapsed = (time.perf_counter() - started) * 1000
    found = FORKED_VM.search(out.decode())
    if process.returncode != 0 or found is None:
        raise SystemExit(f"vers repo fork exited {process.returncode}:\n{out.decode()}\n{err.decode()}")
    return elapsed, found.group(1)


async def branches(platform: InProcessPlatform, commit: str, runs: int, settle: float) -> list[float]:
    """Each branch of `commit` to its first exec answered, in ms, over REST (as the administrator's org, which
    owns it); `settle` seconds before each, outside the timed part."""
    admin_key = platform.settings.admin_key_file.read_text().strip()
    samples = []
    async with httpx.AsyncClient(base_url=platform.url, timeout=300, headers={"Authorization": f"Bearer {admin_key}"}) as http:
        for number in range(runs + 1):  # the first opens the connection and notes the commit as branched
            await asyncio.sleep(settle)
            started = time.perf_counter()
            [vm] = checked(await http.post(f"/api/v1/vm/branch/by_commit/{commit}"), 201)["vms"]
            checked(await http.post(f"/api/v1/vm/{vm['vm_id']}/exec", json={"command": ["true"]}), 200)
            elapsed = (time.perf_counter() - started) * 1000
            if number:
                samples.append(elapsed)
            checked(await http.delete(f"/api/v1/vm/{vm['vm_id']}"), 200)
    return samples


async def unpooled_branches(data: Path, runs: int) -> list[float]:
    """Branches on a platform without QEMU processes waiting for them, of a commit of its own."""
    settings = Settings(data_dir=data, images_dir=str(Settings().image_root), log_level="WARNING", root_pool_size=0, branch_pool_size=0)
    platform = await InProcessPlatform.start(settings)
    try:
        admin_key = platform.settings.admin_key_file.read_text().strip()
        async with httpx.AsyncClient(base_url=platform.url, timeout=300, headers={"Authorization": f"Bearer {admin_key}"}) as vers:
            commit = await publish(vers)
        return await branches(platform, commit, runs, 0.5)
    finally:
        await platform.stop()
        shutil.rmtree(platform.settings.vm_run_dir, ignore_errors=True)


async def run(platform: InProcessPlatform, runs: int, cli_runs: int, config: Path) -> dict[str, object]:
    admin_key = platform.settings.admin_key_file.read_text().strip()
    async with httpx.AsyncClient(base_url=platform.url, timeout=300, headers={"Authorization": f"Bearer {admin_key}"}) as vers:
        commit = await publish(vers)
        forker_key = checked(await vers.post("/api/v1/admin/orgs", json={"name": "forker"}), 201)["token"]
    async with httpx.AsyncClient(base_url=platform.url, timeout=300, headers={"Authorization": f"Bearer {forker_key}"}) as http:
        first, fork = await fork_once(http, "warm-up")  # the connection opened, the source's files in the page cache
        checked(await http.delete(f"/api/v1/vm/{fork['vm_id']}"), 200)
        latencies = []
        for number in range(runs):
            elapsed, fork = await fork_once(http, f"t{number:02}")
            latencies.append(elapsed)
            print(f"  fork {number + 1:>2}: {elapsed:7.1f} ms")
            checked(await http.delete(f"/api/v1/vm/{fork['vm_id']}"), 200)  # outside the timed part
        env = {**os.environ, "VERS_URL": platform.url, "VERS_API_KEY": forker_key, "VERS_CONFIG_DIR": str(config)}
        cli = []
        for number in range(cli_runs):
            elapsed, vm = await cli_fork(env, f"c{number:02}")
            cli.append(elapsed)
            print(f"  vers repo fork {number + 1}: {elapsed:7.1f} ms")
            checked(await http.delete(f"/api/v1/vm/{vm}"), 200)
    pooled = await branches(platform, commit, runs, 2.0)
    print(f"  branch to first exec over REST, a QEMU waiting: {', '.join(f'{value:.0f}' for value in pooled)} ms")
    return {
        "branch_rest_pooled_ms_median": round(statistics.median(pooled), 1),
        "branch_rest_pooled_ms_all": [round(value, 1) for value in pooled],
        "runs": runs,
        "guest_mem_mib": GUEST_MIB,
        "fork_rest_ms_median": round(statistics.median(latencies), 1),
        "fork_rest_ms_min": round(min(latencies), 1),
        "fork_rest_ms_max": round(max(latencies), 1),
        "fork_rest_ms_first": round(first, 1),
        "fork_rest_ms_all": [round(value, 1) for value in latencies],
        "fork_cli_ms_median": round(statistics.median(cli), 1) if cli else None,
        "fork_cli_ms_all": [round(value, 1) for value in cli],
        "goal_ms": GOAL_MS,
    }


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="vers-bench-") as data, tempfile.TemporaryDirectory(prefix="vers-bench-cli-") as config:
        settings = Settings(data_dir=Path(data), images_dir=str(Settings().image_root), log_level="WARNING", root_pool_size=0)
        facts = facts_of(settings)
        platform = await InProcessPlatform.start(settings)
        try:
            print(f"fork of a public tag over REST, {args.runs} runs ({GUEST_MIB} MiB guest)")
            figures = await run(platform, args.runs, args.cli_runs, Path(config))
        finally:
            await platform.stop()
            shutil.rmtree(platform.settings.vm_run_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="vers-bench-") as data:
        unpooled = await unpooled_branches(Path(data), args.runs)
    print(f"  branch to first exec over REST, no pool: {', '.join(f'{value:.0f}' for value in unpooled)} ms")
    figures["branch_rest_ms_median"] = round(statistics.median(unpooled), 1)
    figures["branch_rest_ms_all"] = [round(value, 1) for value in unpooled]
    figures = {**facts, **figures}
    median, cli = figures["fork_rest_ms_median"], figures["fork_cli_ms_median"]
    print(f"\nfork end to end over REST, median of {args.runs}: {median} ms   goal < {GOAL_MS:.0f} ms ({describe(facts)})")
    if cli is not None:
        print(f"`vers repo fork` (CLI start-up included), median of {args.cli_runs}: {cli} ms")
    figures["goals"] = print_goals(
        [
            Goal("fork of a public tag, end to end over REST", float(str(median)), GOAL_MS, "ms"),
            Goal("branch to first exec answered, over REST", float(str(figures["branch_rest_ms_median"])), 150, "ms"),
            Goal("branch to first exec over REST, QEMU waiting in the pool", float(str(figures["branch_rest_pooled_ms_median"])), 60, "ms"),
        ]
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cli-runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fork.json")
    asyncio.run(main(parser.parse_args()))
