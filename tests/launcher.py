"""The platform as `make run` starts it: `python -m services.platform`, in a subprocess, on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pexpect  # type: ignore[import-untyped]  # pexpect ships no type hints
from click_default_group import DefaultGroup

from services.cli.main import cli
from services.common.settings import Settings
from tests.conftest import ROOT, discard, free_ports, kill_vms_under

VERS = Path(sys.executable).parent / "vers"


def launcher_env(folder: Path) -> dict[str, str]:
    """The environment of a platform on free ports with its data under `folder`, and of `vers` to reach it;
    the suite's own (tests/conftest.py), with VERS_IMAGES_DIR in a session with VM tests."""
    registry, tagging, orchestrator, http = free_ports(4)
    return {
        **os.environ,
        "VERS_CONFIG_DIR": str(folder / "config"),
        "VERS_DATA_DIR": str(folder / "data"),
        "REGISTRY_ADDR": f"127.0.0.1:{registry}",
        "TAGGING_ADDR": f"127.0.0.1:{tagging}",
        "ORCHESTRATOR_ADDR": f"127.0.0.1:{orchestrator}",
        "VERS_HTTP_PORT": str(http),
        "VERS_URL": f"http://127.0.0.1:{http}",
        "VERS_LOG_LEVEL": "WARNING",
    }


class Launched:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process = subprocess.Popen([sys.executable, "-m", "services.platform"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        self.banner = self._read_banner()

    def _read_banner(self) -> str:
        lines: list[str] = []
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


FORKED = re.compile(r"\A✓ Forked → (?P<reference>\S+)\n  VM:     (?P<vm>\S+)\n  Commit: (?P<commit>\S+)\n\Z")
COMMITTED = re.compile(r"^→ commit (?P<commit>\S+)$", re.MULTILINE)
STARTED = re.compile(r"^✓ VM (?P<vm>\S+) is running", re.MULTILINE)


@dataclass
class User:
    """Someone at a terminal: their own config folder, the platform's URL, no key in the environment."""

    env: dict[str, str]
    ran: list[tuple[str, ...]] = field(default_factory=list)

    def vers(self, *args: str, expect: int = 0, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        self.ran.append(args)
        result = subprocess.run([VERS, *args], env=self.env, capture_output=True, text=True, input=stdin, timeout=300)
        assert result.returncode == expect, f"vers {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def json(self, *args: str, expect: int = 0) -> Any:
        """With `--format json` right after the command's name, where `vers exec` reads its options."""
        at = len([name for name in command_path(args) if name in args])
        return json.loads(self.vers(*args[:at], "--format", "json", *args[at:], expect=expect).stdout)

    def console(self, *args: str) -> pexpect.spawn:
        return pexpect.spawn(str(VERS), ["connect", *args], env=self.env, encoding="utf-8", timeout=60, dimensions=(40, 120))


@dataclass
class Site:
    launched: Launched
    folder: Path
    users: list[User] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return self.launched.env

    def vers_org(self) -> User:
        """The `vers` organization, which publishes the supported images, through the administrator's key."""
        key = Settings(data_dir=Path(self.env["VERS_DATA_DIR"])).admin_key_file.read_text().strip()
        return User({**self.env, "VERS_API_KEY": key, "VERS_CONFIG_DIR": str(self.folder / "config-vers")})

    def user(self, name: str) -> User:
        """A new organization, and a person logged in to it with `vers login`."""
        created = subprocess.run([VERS, "admin", "org", "create", name], env=self.env, capture_output=True, text=True, check=True)
        key = created.stdout.strip().splitlines()[-1]
        config = self.folder / f"config-{name}"
        user = User({**self.env, "VERS_CONFIG_DIR": str(config)})
        assert user.vers("login", "--api-key", key).stdout == f"✓ Logged in to {self.env['VERS_URL']} as organization {name}\n"
        assert stat.S_IMODE((config / "config.json").stat().st_mode) == 0o600
        self.users.append(user)
        return user


def command_path(args: tuple[str, ...]) -> tuple[str, ...]:
    """The command the arguments run, e.g. ("repo", "tag", "list"); `vers commit VM` is ("commit", "create")."""
    command: click.Command = cli
    path: list[str] = []
    for arg in args:
        if not isinstance(command, click.Group) or arg not in command.commands:
            break
        path.append(arg)
        command = command.commands[arg]
    if isinstance(command, DefaultGroup):
        path.append(command.default_cmd_name)
    return tuple(path)


@contextlib.contextmanager
def running_site(folder: Path, **settings: str) -> Iterator[Site]:
    """A platform launched as `make run` does (with these VERS_* settings besides), stopped afterwards with
    every VM it left."""
    launched = Launched({**launcher_env(folder), **settings})
    try:
        yield Site(launched, folder)
    finally:
        launched.stop()
        kill_vms_under(Settings(data_dir=Path(launched.env["VERS_DATA_DIR"])).vm_run_dir)
        discard(folder)
