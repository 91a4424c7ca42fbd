"""fsck benchmark: `vers admin fsck` on a data folder with 1,000 commits, each tagged.

The commits are made without booting VMs: rows written through the services' models, files of the sizes
a small VM's commit has (its device state as QEMU saves it; its RAM file kept small, since fsck hashes
every byte of it and a guest's full memory would only measure the disk), qcow2 layers chained as commits
of a VM chain them, checksums as the orchestrator records them. Each run is the command an operator
types, timed from start to exit. Prints the figures and writes them as JSON (default
bench/results/fsck.json).

    python bench/fsck.py [--commits 1000] [--runs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.db import Database  # noqa: E402
from services.common.migrations import migrate  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.common.timestamps import utcnow  # noqa: E402
from services.orchestrator import models as orchestrator  # noqa: E402
from services.orchestrator.integrity import Verifier  # noqa: E402
from services.orchestrator.layout import Layout  # noqa: E402
from services.registry import models as registry  # noqa: E402
from services.tagging import models as tagging  # noqa: E402

VERS = Path(sys.executable).parent / "vers"
GOAL_SECONDS = 10.0
COMMITS_PER_VM = 50
STATE_KIB = 448  # the device state of a 256 MiB guest with its RAM in its own file, as measured
RAM_KIB = 1024


async def qemu_img_create(layer: Path, backing: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(layer), stderr=subprocess.PIPE
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"qemu-img create failed: {stderr.decode().strip()}")


async def populate(settings: Settings, commits: int) -> dict[str, int]:
    """VMs committed COMMITS_PER_VM times each (then deleted), every commit tagged in its VM's repository."""
    layout = Layout.of(settings)
    for folder in (layout.layers, layout.commits, layout.sleeping, layout.images):
        folder.mkdir(parents=True, exist_ok=True)
    base = layout.images / "rootfs.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    shape = {"vcpu_count": 1, "mem_size_mib": 256, "fs_size_mib": 1024, "image_name": "default",
             "kernel_path": "/nonexistent/vmlinux", "initramfs_path": "/nonexistent/initramfs.cpio"}  # fmt: skip
    org = registry.OrgRow(id=str(uuid.uuid4()), name="bench")
    repos, layers, vms, rows, tags = [], [], [], [], []
    limit = asyncio.Semaphore(2 * (os.cpu_count() or 1))
    verifier = Verifier(layout)
    started = utcnow() - timedelta(days=1)

    async def make_layer(layer: Path, backing: Path) -> None:
        async with limit:
            await qemu_img_create(layer, backing)

    chains: list[list[str]] = []
    for first in range(0, commits, COMMITS_PER_VM):
        chain = [str(uuid.uuid4()) for _ in range(min(COMMITS_PER_VM, commits - first))]
        chains.append(chain)
        for depth, layer_id in enumerate(chain):
            parent = chain[depth - 1] if depth else None
            layers.append(orchestrator.LayerRow(id=layer_id, parent_id=parent, base_path="" if parent else str(base), created_at=started))
    # parents before children: a qcow2 file is created over the file it is backed by
    for depth in range(COMMITS_PER_VM):
        await asyncio.gather(*(
            make_layer(layout.layer_file(chain[depth]), layout.layer_file(chain[depth - 1]) if depth else base)
            for chain in chains if depth < len(chain)
        ))  # fmt: skip
    for number, chain in enumerate(chains):
        vm_id = str(uuid.uuid4())
        # the VM was deleted after its last commit: its working layer went with it
        vms.append(orchestrator.VmRow(id=vm_id, org_id=org.id, state=orchestrator.VmState.DEAD, created_at=started, deleted_at=started,
                                      layer_id=str(uuid.uuid4()), ram_mode="shared", **shape))  # fmt: skip
        repo = registry.RepositoryRow(id=str(uuid.uuid4()), org_id=org.id, name=f"app-{number}")
        repos.append(repo)
        for depth, layer_id in enumerate(chain):
            commit_id = str(uuid.uuid4())
            folder = layout.commit_folder(commit_id)
            folder.mkdir()
            (folder / "state").write_bytes(os.urandom(STATE_KIB * 1024))
            (folder / "ram").write_bytes(os.urandom(RAM_KIB * 1024))
            layer = layout.layer_file(layer_id)
            for path in (*folder.iterdir(), layer):
                path.chmod(0o444)
            checksums = verifier.checksums(commit_id, layer_id)
            rows.append(orchestrator.CommitRow(
                id=commit_id, org_id=org.id, name=f"commit {depth} of {vm_id}", created_at=started, parent_vm_id=vm_id,
                grandparent_commit_id=rows[-1].id if depth else None, layer_id=layer_id, ram_format="file",
                checksums=json.dumps(checksums), **shape,
            ))  # fmt: skip
            tags.append(tagging.RepoTagRow(id=str(uuid.uuid4()), repo_id=repo.id, repo_name=repo.name, org_id=org.id,
                                           name=f"v{depth}", commit_id=commit_id))  # fmt: skip
    for service, batch in (
        ("registry", [org, *repos]),
        ("tagging", tags),
        ("orchestrator", [*layers, *vms, *rows]),
    ):
        db = Database(settings.database_url(service))
        await migrate(db, service)
        async with db.write() as session:
            for row in batch:
                session.add(row)
                if isinstance(row, orchestrator.LayerRow | registry.OrgRow):
                    await session.flush()  # parents before children, for the foreign keys
        await db.close()
    hashed = sum(path.stat().st_size for path in layout.commits.glob("*/*"))
    return {"commits": len(rows), "tags": len(tags), "layers": len(layers), "hashed_mib": round(hashed / 2**20)}


def run_fsck(settings: Settings) -> float:
    env = {**os.environ, "VERS_DATA_DIR": str(settings.data_dir), "VERS_RUN_DIR": settings.run_dir, "VERS_LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    result = subprocess.run([VERS, "admin", "fsck", "--json"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    report = json.loads(result.stdout)
    if result.returncode != 0 or not report["clean"]:
        raise SystemExit(f"fsck found problems in the benchmark's data folder:\n{json.dumps(report['problems'], indent=2)}")
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fsck.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vers-bench-") as folder:
        run_dir = Path(folder) / "run"
        run_dir.mkdir()
        settings = Settings(data_dir=Path(folder) / "data", run_dir=str(run_dir))
        started = time.perf_counter()
        made = await populate(settings, args.commits)
        print(f"{made['commits']} commits ({STATE_KIB} KiB state, {RAM_KIB} KiB RAM each: {made['hashed_mib']} MiB to hash), "
              f"{made['layers']} layers, {made['tags']} tags, made in {time.perf_counter() - started:.1f} s")  # fmt: skip
        runs = []
        for number in range(args.runs):
            runs.append(run_fsck(settings))
            print(f"run {number + 1}: {runs[-1]:.2f} s")
        shutil.rmtree(run_dir, ignore_errors=True)
    median = statistics.median(runs)
    print(f"fsck of {made['commits']:,} commits: median {median:.2f} s (goal < {GOAL_SECONDS:.0f} s)")
    figures = {
        **made,
        "state_kib": STATE_KIB,
        "ram_kib": RAM_KIB,
        "runs": args.runs,
        "fsck_s_median": round(median, 2),
        "fsck_s_runs": [round(seconds, 2) for seconds in runs],
        "goal_s": GOAL_SECONDS,
        "within_goal": median < GOAL_SECONDS,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
