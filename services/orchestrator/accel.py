"""Choose the accelerator: KVM where a probe boot succeeds quickly, TCG otherwise."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from services.common.files import write_atomic
from services.orchestrator.images import Image

log = logging.getLogger(__name__)
PROBE_SECONDS = 8.0


def qemu_version() -> str:
    return subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def cpu_args(accel: str, tb_size_mib: int = 0) -> list[str]:
    """The accelerator's options; under TCG `tb_size_mib` caps the cache of translated guest code (QEMU's default
    reserves 1 GiB, which a guest running ever new code fills, outside its own memory limit)."""
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi" + (f",tb-size={tb_size_mib}" if tb_size_mib else ""), "-cpu", "max"]


async def probe_kvm(image: Image) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory() as scratch:
        process = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            *cpu_args("kvm"), "-m", "128M",
            "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
            "-append", "console=ttyS0 quiet panic=-1 vers.probe",
            "-serial", f"file:{scratch}/serial.log",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), PROBE_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            log.info("KVM probe did not finish within %.0f s", PROBE_SECONDS)
            return False
        if process.returncode != 0:
            log.info("KVM probe failed: %s", stderr.decode(errors="replace").strip()[:300])
        return process.returncode == 0


async def choose_accelerator(setting: str, image: Image, cache_file: Path) -> str:
    """`setting` is kvm, tcg or auto; auto probes once per host kernel and QEMU version."""
    if setting in ("kvm", "tcg"):
        return setting
    fingerprint = f"{platform.release()} {qemu_version()} {os.path.exists('/dev/kvm')}"
    if cache_file.exists():
        cached = json.loads(cache_file.read_text())
        if cached.get("fingerprint") == fingerprint:
            return str(cached["accel"])
    accel = "kvm" if await probe_kvm(image) else "tcg"
    write_atomic(cache_file, json.dumps({"fingerprint": fingerprint, "accel": accel}))  # a torn cache would stop every start
    log.info("accelerator: %s", accel)
    return accel
