"""The platform as `make run` starts it: `python -m services.platform`, in a subprocess, on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import IMAGES, ROOT, free_ports

VERS = Path(sys.executable).parent / "vers"


def launcher_env(folder: Path) -> dict[str, str]:
    """The environment of a platform on free ports with its data under `folder`, and of `vers` to reach it."""
    registry, tagging, orchestrator, http = free_ports(4)
    inherited = {name: value for name, value in os.environ.items() if name != "VERS_API_KEY"}
    return {
        **inherited,
        "VERS_CONFIG_DIR": str(folder / "config"),
        "VERS_DATA_DIR": str(folder / "data"),
        "REGISTRY_ADDR": f"127.0.0.1:{registry}",
        "TAGGING_ADDR": f"127.0.0.1:{tagging}",
        "ORCHESTRATOR_ADDR": f"127.0.0.1:{orchestrator}",
        "VERS_HTTP_PORT": str(http),
        "VERS_URL": f"http://127.0.0.1:{http}",
        "VERS_LOG_LEVEL": "WARNING",
        "VERS_IMAGES_DIR": str(IMAGES),
    }


class Launched:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.platform"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        self.banner = self._read_banner()

    def _read_banner(self) -> str:
        lines = []
        assert self.process.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"launcher exited early: {''.join(lines)}")
            lines.append(line)
            if line.startswith("Ctrl-C"):
                return "".join(lines)
        raise AssertionError("no banner within 60 s")

    @property
    def api_key(self) -> str:
        return self.banner.split("export VERS_API_KEY=")[1].split()[0]

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.process.wait(30)


