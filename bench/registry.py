"""Registry benchmark: tag get and tag move through gRPC and through the REST gateway,
at 1, 16 and 64 concurrent clients. Prints requests per second, p50 and p99 latency, and the
gateway/gRPC ratio; writes JSON (default bench/results/registry.json).

    python bench/registry.py [--seconds 3] [--json PATH]
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
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.settings import Settings  # noqa: E402
from services.inprocess import InProcessPlatform  # noqa: E402
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc  # noqa: E402

CONCURRENCY = (1, 16, 64)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(call: Callable[[int], Awaitable[None]], clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(number: int) -> None:
        step = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call(number + step)
            latencies.append(time.perf_counter() - started)
            step += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "requests": len(latencies),
    }


async def setup(platform: InProcessPlatform) -> tuple[str, list[str]]:
    """An org with a repository `app`, a tag `latest` and two commits of a real VM to move it between."""
    admin = {"Authorization": f"Bearer {platform.settings.admin_key_file.read_text().strip()}"}
    async with httpx.AsyncClient(base_url=platform.url, timeout=120) as http:
        key = (await http.post("/api/v1/admin/orgs", json={"name": "bench"}, headers=admin)).json()["token"]
        http.headers["Authorization"] = f"Bearer {key}"
        vm = (await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {}})).json()["vm_id"]
        commits = [(await http.post(f"/api/v1/vm/{vm}/commit", json={})).json()["commit_id"] for _ in range(2)]
        await http.delete(f"/api/v1/vm/{vm}")
        await http.post("/api/v1/repositories", json={"name": "app"})
        await http.post("/api/v1/repositories/app/tags", json={"tag_name": "latest", "commit_id": commits[0]})
    return key, commits


async def run(platform: InProcessPlatform, seconds: float) -> dict[str, object]:
    key, commits = await setup(platform)
    metadata = (("authorization", f"Bearer {key}"),)
    channel = grpc.aio.insecure_channel(platform.settings.tagging_addr)
    stub = tagging_pb2_grpc.TaggingServiceStub(channel)
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    http = httpx.AsyncClient(base_url=platform.url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=60)

    async def grpc_get(_: int) -> None:
        await stub.GetRepositoryTag(tagging_pb2.GetRepositoryTagRequest(repo_name="app", tag_name="latest"), metadata=metadata)

    async def grpc_move(n: int) -> None:
        await stub.UpdateRepositoryTag(
            tagging_pb2.UpdateRepositoryTagRequest(repo_name="app", tag_name="latest", commit_id=commits[n % 2]), metadata=metadata
        )

    async def rest_get(_: int) -> None:
        (await http.get("/api/v1/repositories/app/tags/latest")).raise_for_status()

    async def rest_move(n: int) -> None:
        (await http.patch("/api/v1/repositories/app/tags/latest", json={"commit_id": commits[n % 2]})).raise_for_status()

    operations = {
        "tag_get": (grpc_get, rest_get),
        "tag_move": (grpc_move, rest_move),
    }
    results: dict[str, object] = {}
    print(
        f"{'operation':<12} {'clients':>7} {'gRPC rps':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'REST rps':>9} {'p50 ms':>7} {'p99 ms':>7} {'REST/gRPC':>9}"
    )
    for name, (direct, gateway) in operations.items():
        for clients in CONCURRENCY:
            via_grpc = await measure(direct, clients, seconds)
            via_rest = await measure(gateway, clients, seconds)
            ratio = round(via_rest["rps"] / via_grpc["rps"], 2)
            results[f"{name}_c{clients}"] = {"grpc": via_grpc, "rest": via_rest, "rest_to_grpc_rps": ratio}
            print(
                f"{name:<12} {clients:>7} {via_grpc['rps']:>9} {via_grpc['p50_ms']:>7} {via_grpc['p99_ms']:>7} "
                f"{via_rest['rps']:>9} {via_rest['p50_ms']:>7} {via_rest['p99_ms']:>7} {ratio:>9}"
            )
    await http.aclose()
    await channel.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "registry.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vers-bench-") as data:
        settings = Settings(data_dir=Path(data), images_dir=str(Settings().image_root), log_level="WARNING")
        platform = await InProcessPlatform.start(settings)
        try:
            figures = await run(platform, args.seconds)
        finally:
            await platform.stop()
            shutil.rmtree(platform.settings.vm_run_dir, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
