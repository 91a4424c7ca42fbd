"""Registry benchmark: a tag get (`GET /api/v1/repositories/app/tags/latest`) through the REST gateway, against
the same tag get over gRPC (TaggingService.GetRepositoryTag) and a bare `grpc.aio` server's no-op RPC, all at 16
connections, on the whole platform started as `make run` starts it (`python -m services.platform`: the registry,
tagging, orchestrator and gateway each a process of its own, so they share the machine's cores as in use).

The load comes from outside Python, so the load generator never competes with the servers for the GIL and the
figures are the servers' own: `wrk` (Debian's `wrk`) for REST, and `h2load` (Debian's `nghttp2-client`) for gRPC,
sending a gRPC-framed request body with `content-type: application/grpc` and `te: trailers` over HTTP/2, one
call at a time per connection as wrk does. h2load does not read gRPC trailers, so each run checks that every
answer carried the expected message: the bytes of data it received must be those of as many full responses as
it counted (an error answers with trailers only, no data). The no-op server is the reference for what grpc.aio
can do on this machine: a process of its own with one unary method that answers an empty message, on asyncio's
default event loop and no options (bare), measured in the same run as the platform.

The gateway's rate limit is turned off (VERS_RATE_LIMIT_PER_SECOND=0): this measures throughput, not the limit.
Each figure is the median of --runs runs of --seconds seconds, the three loads taking turns. Afterwards, unless
--no-python-clients, the earlier in-Python measurements (tag get and tag move over gRPC and REST at 1, 16 and 64
asyncio clients, one pass): those clients share the machine's cores with the servers, so they understate both
paths. Figures go to JSON (default bench/results/registry.json).

    python bench/registry.py [--runs 10] [--seconds 3] [--json PATH] [--no-python-clients]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.facts import Goal, describe, facts_of, print_goals  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.inprocess import free_ports  # noqa: E402
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc  # noqa: E402

CONNECTIONS = 16
REST_GOAL_RPS = 1000.0
REST_GOAL_OF_NOOP = 0.40
REST_GOAL_OF_GRPC = 0.80
TAG_PATH = "/api/v1/repositories/app/tags/latest"
GRPC_TAG_METHOD = "/vers.tagging.v1.TaggingService/GetRepositoryTag"
NOOP_METHOD = "/bench.Noop/Call"
PYTHON_CLIENTS = (1, 16, 64)


def grpc_frame(message: bytes) -> bytes:
    """A gRPC message on the wire: not compressed (0), its length (4 bytes, big-endian), the bytes."""
    return struct.pack(">BI", 0, len(message)) + message


def serve_noop(port: int) -> None:
    """The bare grpc.aio server (run as `registry.py --serve-noop PORT`, a process of its own)."""

    async def call(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return b""

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler("bench.Noop", {"Call": grpc.unary_unary_rpc_method_handler(call)})
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


async def start_noop() -> tuple[subprocess.Popen[bytes], str]:
    (port,) = free_ports(1)
    process = subprocess.Popen([sys.executable, __file__, "--serve-noop", str(port)], stdout=subprocess.PIPE)
    assert process.stdout is not None
    if await asyncio.to_thread(process.stdout.readline) != b"ready\n":
        raise RuntimeError("the no-op gRPC server did not start")
    return process, f"127.0.0.1:{port}"


async def command(*argv: str) -> str:
    """Run a load generator without blocking the event loop that serves the platform."""
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output = (await process.communicate())[0].decode()
    if process.returncode:
        raise RuntimeError(f"{argv[0]} failed ({process.returncode}):\n{output}")
    return output


def figure(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"no {pattern!r} in the load generator's output:\n{text}")
    return float(found.group(1))


class Launched:
    """The platform as `make run` starts it, on free ports, its data in `data`: its URL, its settings (as its
    processes read them), the CPU time its processes have used, and a stop."""

    def __init__(self, data: Path, **variables: str) -> None:
        registry, tagging, orchestrator, http = free_ports(4)
        self.env = {
            **os.environ, "VERS_DATA_DIR": str(data), "REGISTRY_ADDR": f"127.0.0.1:{registry}",
            "TAGGING_ADDR": f"127.0.0.1:{tagging}", "ORCHESTRATOR_ADDR": f"127.0.0.1:{orchestrator}",
            "VERS_HTTP_PORT": str(http), "VERS_LOG_LEVEL": "WARNING", "VERS_IMAGES_DIR": str(Settings().image_root), **variables,
        }  # fmt: skip
        self.url = f"http://127.0.0.1:{http}"
        self.settings = Settings(data_dir=data, tagging_addr=self.env["TAGGING_ADDR"], images_dir=str(Settings().image_root))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.platform"], cwd=ROOT, env=self.env, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 120
        while not (line := self.process.stdout.readline()).startswith("Ctrl-C"):
            if not line or time.monotonic() > deadline:
                raise SystemExit("the platform did not start (python -m services.platform)")

    def pids(self) -> list[int]:
        """The launcher and the service processes it started."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [self.process.pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        """CPU time the platform's processes have used so far, all threads, user and system."""
        ticks = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


async def wrk(url: str, key: str, seconds: int) -> float:
    """Requests a second that wrk had answered 200 (any other status fails the run)."""
    output = await command(
        "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "-H", f"Authorization: Bearer {key}", "--latency", url
    )  # fmt: skip
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw failed requests:\n{output}")
    return figure(r"Requests/sec:\s+([\d.]+)", output)


async def h2load(address: str, method: str, body: Path, response_bytes: int, seconds: int, token: str = "") -> float:
    """Calls a second that h2load had answered, each with a whole response message of `response_bytes`."""
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    if token:
        headers += ["-H", f"authorization: Bearer {token}"]
    output = await command(
        "h2load", "-t1", f"-c{CONNECTIONS}", "-m1", f"-D{seconds}", "--warm-up-time=300ms", "-d", str(body), *headers,
        f"http://{address}{method}",
    )  # fmt: skip
    succeeded = int(figure(r"requests: .*?(\d+) succeeded", output))
    data = int(figure(r"\((\d+)\) data", output))
    if not succeeded or data < succeeded * len(grpc_frame(b"\0" * response_bytes)):
        raise RuntimeError(f"h2load's calls were not all answered with a {response_bytes}-byte message:\n{output}")
    return figure(r"finished in [\d.]+s, ([\d.]+) req/s", output)


async def setup(platform: Launched) -> tuple[str, list[str]]:
    """An org with a repository `app`, a tag `latest` and two commits of a real VM to move it between."""
    admin = {"Authorization": f"Bearer {platform.settings.admin_key_file.read_text().strip()}"}
    async with httpx.AsyncClient(base_url=platform.url, timeout=120) as http:
        key = (await http.post("/api/v1/admin/orgs", json={"name": "bench"}, headers=admin)).json()["token"]
        http.headers["Authorization"] = f"Bearer {key}"
        answer = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {}})
        answer.raise_for_status()
        vm = answer.json()["vm_id"]
        commits = [(await http.post(f"/api/v1/vm/{vm}/commit", json={})).json()["commit_id"] for _ in range(2)]
        await http.delete(f"/api/v1/vm/{vm}")
        await http.post("/api/v1/repositories", json={"name": "app"})
        await http.post("/api/v1/repositories/app/tags", json={"tag_name": "latest", "commit_id": commits[0]})
    return key, commits


async def external_loads(platform: Launched, key: str, runs: int, seconds: int, work: Path) -> dict[str, object]:
    """The goal figures: REST by wrk, the tag get and the no-op over gRPC by h2load, taking turns."""
    request = tagging_pb2.GetRepositoryTagRequest(repo_name="app", tag_name="latest")
    async with grpc.aio.insecure_channel(platform.settings.tagging_addr) as channel:
        answer = await tagging_pb2_grpc.TaggingServiceStub(channel).GetRepositoryTag(
            request, metadata=(("authorization", f"Bearer {key}"),)
        )
    tag_body, noop_body = work / "tag.grpc", work / "noop.grpc"
    tag_body.write_bytes(grpc_frame(request.SerializeToString()))
    noop_body.write_bytes(grpc_frame(b""))
    noop, noop_address = await start_noop()
    samples: dict[str, list[float]] = {"rest": [], "grpc": [], "noop": [], "rest_cpu_ms": [], "grpc_cpu_ms": []}
    try:
        for run in range(runs + 1):  # the first run warms every path up and is not counted
            cpu = platform.cpu_seconds()
            rest = await wrk(platform.url + TAG_PATH, key, seconds)
            rest_cpu_ms = (platform.cpu_seconds() - cpu) * 1000 / (rest * seconds)
            cpu = platform.cpu_seconds()
            via_grpc = await h2load(platform.settings.tagging_addr, GRPC_TAG_METHOD, tag_body, answer.ByteSize(), seconds, key)
            grpc_cpu_ms = (platform.cpu_seconds() - cpu) * 1000 / (via_grpc * seconds)
            bare = await h2load(noop_address, NOOP_METHOD, noop_body, 0, seconds)
            measured = {"rest": rest, "grpc": via_grpc, "noop": bare, "rest_cpu_ms": rest_cpu_ms, "grpc_cpu_ms": grpc_cpu_ms}
            for name, value in measured.items() if run else ():
                samples[name].append(value)
            print(
                f"  run {run or 'warm-up'}: REST {rest:.0f} req/s ({rest_cpu_ms:.2f} ms of CPU each), "
                f"gRPC {via_grpc:.0f} ({grpc_cpu_ms:.2f} ms), no-op {bare:.0f}",
                flush=True,
            )
    finally:
        noop.terminate()
        noop.wait(10)
    medians = {name: round(statistics.median(values), 2) for name, values in samples.items()}
    return {
        # the platform process's CPU time per answered request (the warm-up's is not counted, nor is wrk's or
        # h2load's): a figure that other work on the machine sways less than requests a second
        "rest_cpu_ms_per_request": medians["rest_cpu_ms"],
        "grpc_cpu_ms_per_request": medians["grpc_cpu_ms"],
        "rest_rps": medians["rest"],
        "grpc_rps": medians["grpc"],
        "noop_grpc_rps": medians["noop"],
        "rest_of_noop": round(medians["rest"] / medians["noop"], 3),
        "rest_to_grpc": round(medians["rest"] / medians["grpc"], 3),
        "samples": samples,
    }


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


async def python_clients(platform: Launched, key: str, commits: list[str], seconds: float) -> dict[str, object]:
    """Tag get and tag move from asyncio clients in this process (one pass; they share its event loop)."""
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
        (await http.get(TAG_PATH)).raise_for_status()

    async def rest_move(n: int) -> None:
        (await http.patch(TAG_PATH, json={"commit_id": commits[n % 2]})).raise_for_status()

    operations = {"tag_get": (grpc_get, rest_get), "tag_move": (grpc_move, rest_move)}
    results: dict[str, object] = {}
    print(
        f"\nin-Python clients (one pass of {seconds:g} s each)\n"
        f"{'operation':<12} {'clients':>7} {'gRPC rps':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'REST rps':>9} {'p50 ms':>7} {'p99 ms':>7} {'REST/gRPC':>9}"
    )
    for name, (direct, gateway) in operations.items():
        for clients in PYTHON_CLIENTS:
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


def report(figures: dict[str, object], facts: dict[str, object], runs: int, seconds: float) -> None:
    print(f"\nREST tag get, {CONNECTIONS} connections, medians of {runs} runs of {seconds:g} s ({describe(facts)})")
    rest, noop, ratio = figures["rest_rps"], figures["noop_grpc_rps"], figures["rest_to_grpc"]
    print(f"  REST (wrk):                       {rest:>8} req/s   goal >= {REST_GOAL_RPS:.0f}")
    print(f"  bare grpc.aio no-op (h2load):     {noop:>8} req/s")
    print(f"  REST / no-op:                     {figures['rest_of_noop']:>8}         goal >= {REST_GOAL_OF_NOOP}")
    print(f"  gRPC GetRepositoryTag (h2load):   {figures['grpc_rps']:>8} req/s")
    print(f"  platform CPU per request:         REST {figures['rest_cpu_ms_per_request']} ms, gRPC {figures['grpc_cpu_ms_per_request']} ms")
    print(f"  REST / gRPC:                      {ratio:>8}         goal >= {REST_GOAL_OF_GRPC}")
    figures["goals"] = print_goals(
        [
            Goal("REST tag get, 16 connections (wrk)", float(str(rest)), REST_GOAL_RPS, "req/s", lower_is_better=False),
            Goal("REST tag get / bare grpc.aio no-op", float(str(figures["rest_of_noop"])), REST_GOAL_OF_NOOP, "", lower_is_better=False),
            Goal("REST / gRPC tag get throughput", float(str(ratio)), REST_GOAL_OF_GRPC, "", lower_is_better=False),
        ]
    )


async def main(args: argparse.Namespace) -> None:
    for tool in ("wrk", "h2load"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: install the Debian packages wrk and nghttp2-client (scripts/bootstrap.sh does)")
    with tempfile.TemporaryDirectory(prefix="vers-bench-") as data:
        platform = Launched(Path(data) / "data", VERS_RATE_LIMIT_PER_SECOND="0", VERS_ROOT_POOL_SIZE="0", VERS_BRANCH_POOL_SIZE="0")
        facts = facts_of(platform.settings)
        try:
            key, commits = await setup(platform)
            print(f"tag get at {CONNECTIONS} connections, {args.runs} runs of {args.seconds:g} s (and a warm-up run)")
            figures = await external_loads(platform, key, args.runs, args.seconds, Path(data))
            report(figures, facts, args.runs, args.seconds)
            if args.python_clients:
                figures["python_clients"] = await python_clients(platform, key, commits, 1.0)
        finally:
            platform.stop()
    result = {**facts, "connections": CONNECTIONS, "runs": args.runs, "seconds": args.seconds, **figures}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "registry.json")
    parser.add_argument("--no-python-clients", dest="python_clients", action="store_false")
    parser.add_argument("--serve-noop", type=int, metavar="PORT", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve_noop:
        serve_noop(arguments.serve_noop)
    else:
        asyncio.run(main(arguments))
