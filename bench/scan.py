"""Secret scan benchmark: a commit with a 256 MiB memory image and a disk whose top layer holds 1 GiB of
written files (random bytes mixed with text, a few planted secrets), over an empty ext4 image disk, scanned
as publishing scans it. Every scan must find exactly the planted secrets; the figure is its time, with the
paths of the disk's findings named (the raw view and debugfs look-ups included).

The files are freshly written, so they are read from the page cache, as a commit just taken is.
Prints the figures next to their goal and writes them as JSON (default bench/results/scan.json).

    python bench/scan.py [--runs 5] [--memory-mib 256] [--disk-mib 1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.orchestrator.secrets import RULES_VERSION, scan_commit  # noqa: E402 - after the path is set

GOAL_SECONDS = 10.0
MIB = 1 << 20
FILE_MIB = 64
TEXT = (
    "INFO request served in 12 ms path=/api/v1/items?page=2 user_agent=curl/8.5\n"
    "export PATH=/usr/local/bin:/usr/bin DB_PASSWORD=$DB_PASSWORD API_KEY=<your key>\n"
    "def connect(password=None, token=None):\n    return Session(token=token or os.environ['TOKEN'])\n"
    "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBaMQswCQYDVQQGEwJJ\n"
)


def filler(size: int, seed: int) -> bytearray:
    """Random bytes and text in 64 KiB stretches, as binaries, logs and source on a real disk."""
    rng = random.Random(seed)
    text = (TEXT * (0x10000 // len(TEXT) + 1)).encode()[:0x10000]
    stretch = rng.randbytes(0x10000 * 16)
    data = bytearray()
    while len(data) < size:
        start = rng.randrange(0, 15) * 0x10000
        data += text if rng.random() < 0.4 else stretch[start : start + 0x10000]
    return data[:size]


def planted() -> dict[str, str]:
    upper = string.ascii_uppercase + "234567"
    return {
        "aws-access-key-id": "AKIA" + "".join(random.choices(upper, k=16)),
        "aws-secret-access-key": "".join(random.choices(string.ascii_letters + string.digits, k=38)) + "/7",
        "vers-api-key": "vers_" + secrets.token_urlsafe(32),
        "github-token": "ghp_" + "".join(random.choices(string.ascii_letters + string.digits, k=36)),
    }


def make_commit(folder: Path, memory_mib: int, disk_mib: int) -> tuple[Path, Path, Path, dict[str, int]]:
    keys = planted()
    files = folder / "files"
    files.mkdir()
    count = max(1, disk_mib // FILE_MIB)
    for number in range(count):
        data = filler(FILE_MIB * MIB, number)
        if number == count // 3:
            data[5 * MIB : 5 * MIB] = (
                f"\nAWS_ACCESS_KEY_ID={keys['aws-access-key-id']}\nAWS_SECRET_ACCESS_KEY={keys['aws-secret-access-key']}\n".encode()
            )
        if number == count - 1:
            data[40 * MIB : 40 * MIB] = f"\n  git remote add origin https://{keys['github-token']}@github.com/org/app\n".encode()
        (files / f"blob-{number:02d}.bin").write_bytes(data[: FILE_MIB * MIB])
    (files / "ci.env").write_text(f"VERS_API_KEY={keys['vers-api-key']}\n")
    size = f"{disk_mib + disk_mib // 8 + 64}M"
    empty, full = folder / "empty", folder / "full.raw"
    empty.mkdir()
    base, layer = folder / "base.raw", folder / "layer.qcow2"
    for disk, content in ((base, empty), (full, files)):
        subprocess.run(["truncate", "-s", size, str(disk)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(disk)], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-B", str(base), "-F", "raw", str(full), str(layer)], check=True)
    full.unlink()
    memory = folder / "ram"
    image = filler(memory_mib * MIB, 1000)
    expected = {"disk": 4, "memory": 2}
    third = memory_mib // 3 * MIB
    image[third : third + 22] = f" {keys['aws-access-key-id']}\n".encode()
    image[2 * third + 7 : 2 * third + 7 + 56] = f"Bearer {keys['vers-api-key']}\n".encode()
    memory.write_bytes(image)
    return memory, layer, base, expected


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--disk-mib", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "scan.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vers-bench-") as folder:
        started = time.perf_counter()
        memory, layer, base, expected = make_commit(Path(folder), args.memory_mib, args.disk_mib)
        layer_mib = layer.stat().st_size / MIB
        print(f"commit made in {time.perf_counter() - started:.1f} s: {args.memory_mib} MiB memory, "
              f"a layer of {layer_mib:.0f} MiB written over an empty ext4 image")  # fmt: skip
        runs = []
        for number in range(args.runs):
            started = time.perf_counter()
            findings = await scan_commit([memory], [layer], base, [])
            runs.append(time.perf_counter() - started)
            found = {where: sum(1 for f in findings if f.where == where) for where in ("disk", "memory")}
            assert found == expected, f"expected {expected}, found {findings}"
            print(f"run {number + 1}: {runs[-1]:.2f} s, {len(findings)} findings")
    for finding in findings:
        print(f"  {finding.where:6} {finding.rule:22} {finding.offset:>11} {finding.path or '-':24} {finding.excerpt}")
    median = statistics.median(runs)
    scanned = args.memory_mib + layer_mib
    print(f"scan of {args.memory_mib} MiB memory + {layer_mib:.0f} MiB written disk: median {median:.2f} s "
          f"({scanned / median:.0f} MiB/s; goal: a few seconds, < {GOAL_SECONDS:.0f} s)")  # fmt: skip
    figures = {
        "memory_mib": args.memory_mib,
        "layer_mib": round(layer_mib),
        "rules_version": RULES_VERSION,
        "findings": len(findings),
        "runs": args.runs,
        "scan_s_median": round(median, 2),
        "scan_s_runs": [round(seconds, 2) for seconds in runs],
        "mib_per_s": round(scanned / median),
        "goal_s": GOAL_SECONDS,
        "within_goal": median < GOAL_SECONDS,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
