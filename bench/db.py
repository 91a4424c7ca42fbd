"""Database benchmark: tag moves per second on SQLite and on PostgreSQL. The platform runs in this process on
each backend in turn (PostgreSQL from Debian's binaries in a temporary folder, with its default durability:
fsync and synchronous_commit on; SQLite as `make run` has it: WAL, synchronous=NORMAL), and clients move one
tag between commits through gRPC (TaggingService.UpdateRepositoryTag): each move is a write transaction
that locks the tag's row, updates it and adds its history event and audit entry. A run is a fixed number of
moves shared by the clients; the figure is the median of the runs. Prints moves per second and writes JSON
(default bench/results/db.json).

    python bench/db.py [--runs 10] [--moves 300] [--clients 1 4 16] [--json PATH]
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
import uuid
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.db import Database  # noqa: E402
from services.common.settings import SERVICES, Settings  # noqa: E402
from services.inprocess import InProcessPlatform  # noqa: E402
from services.orchestrator.models import CommitRow  # noqa: E402
from tests.postgres import TempPostgres  # noqa: E402
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc  # noqa: E402

SHAPE = {"vcpu_count": 1, "mem_size_mib": 128, "fs_size_mib": 1024, "image_name": "default", "kernel_path": "k", "initramfs_path": "i"}


async def setup(platform: InProcessPlatform) -> tuple[str, list[str]]:
    """An org with a repository `app`, a tag `latest`, and two commits (rows: no VM runs) to move it between."""
    admin = {"Authorization": f"Bearer {platform.settings.admin_key_file.read_text().strip()}"}
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        created = (await http.post("/api/v1/admin/orgs", json={"name": "bench"}, headers=admin)).json()
        key, org_id = created["token"], created["org"]["id"]
        commits = [str(uuid.uuid4()) for _ in range(2)]
        db = Database(platform.settings.database_url("orchestrator"))
        async with db.write() as session:
            for commit_id in commits:
                session.add(CommitRow(id=commit_id, org_id=org_id, layer_id=f"layer-{commit_id}", ram_format="file", **SHAPE))
        await db.close()
        http.headers["Authorization"] = f"Bearer {key}"
        (await http.post("/api/v1/repositories", json={"name": "app"})).raise_for_status()
        (await http.post("/api/v1/repositories/app/tags", json={"tag_name": "latest", "commit_id": commits[0]})).raise_for_status()
    return key, commits


async def moves_per_second(platform: InProcessPlatform, runs: int, moves: int, clients: int) -> dict[str, float]:
    key, commits = await setup(platform)
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(platform.settings.tagging_addr) as channel:
        stub = tagging_pb2_grpc.TaggingServiceStub(channel)

        async def client(first: int) -> None:
            for n in range(first, moves, clients):
                request = tagging_pb2.UpdateRepositoryTagRequest(repo_name="app", tag_name="latest", commit_id=commits[n % 2])
                await stub.UpdateRepositoryTag(request, metadata=metadata)

        figures = []
        for _ in range(runs):
            started = time.perf_counter()
            await asyncio.gather(*(client(first) for first in range(clients)))
            figures.append(moves / (time.perf_counter() - started))
    return {"median": round(statistics.median(figures), 1), "min": round(min(figures), 1), "max": round(max(figures), 1)}


async def on_backend(backend: str, runs: int, moves: int, concurrency: list[int]) -> dict[str, dict[str, float]]:
    results = {}
    for clients in concurrency:
        with tempfile.TemporaryDirectory(prefix="vers-bench-") as data:
            settings = Settings(data_dir=Path(data), log_level="WARNING", tag_history_max_events=1000)
            server = TempPostgres(durable=True) if backend == "postgresql" else None
            if server is not None:
                prefix = f"bench_{clients}"
                settings = settings.model_copy(
                    update={f"{service}_database_url": server.create_database(f"{prefix}_{service}") for service in SERVICES}
                )
            platform = await InProcessPlatform.start(settings)
            try:
                results[f"c{clients}"] = await moves_per_second(platform, runs, moves, clients)
            finally:
                await platform.stop()
                shutil.rmtree(platform.settings.vm_run_dir, ignore_errors=True)
                if server is not None:
                    server.stop()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--moves", type=int, default=300, help="moves per run, shared by the clients")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "db.json")
    args = parser.parse_args()
    backends = {backend: await on_backend(backend, args.runs, args.moves, args.clients) for backend in ("sqlite", "postgresql")}
    print(f"median of {args.runs} runs of {args.moves} moves")
    print(f"{'clients':>7} {'SQLite moves/s':>15} {'PostgreSQL moves/s':>19} {'PG/SQLite':>9}")
    for clients in args.clients:
        sqlite, postgres = (backends[backend][f"c{clients}"]["median"] for backend in ("sqlite", "postgresql"))
        print(f"{clients:>7} {sqlite:>15} {postgres:>19} {round(postgres / sqlite, 2):>9}")
    figures = {"runs": args.runs, "moves_per_run": args.moves, **backends}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
