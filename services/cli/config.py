"""Where `vers` finds its server and key, and what it remembers between runs (VM aliases, the VM used last).

The config file holds the URL and API key that `vers login` checked; `VERS_URL` and `VERS_API_KEY`
override it. Local state is kept per server URL, so aliases for one platform never name VMs on another.
Both files live in `$VERS_CONFIG_DIR`, else `$XDG_CONFIG_HOME/vers`, else `~/.config/vers`, mode 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.client import DEFAULT_URL
from services.common.files import write_atomic
from services.common.ids import is_uuid

ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ConfigError(Exception):
    """The configuration cannot be used; the message says what to do."""


def config_dir() -> Path:
    if explicit := os.environ.get("VERS_CONFIG_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vers"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path}: {error}; fix or delete it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object; fix or delete it")
    return data


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all, readable by the owner only from the first byte: the file may hold an API key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o600)


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str


def credentials() -> Credentials:
    saved = _read(config_dir() / "config.json")
    url = os.environ.get("VERS_URL") or saved.get("url") or DEFAULT_URL
    return Credentials(url=url.rstrip("/"), api_key=os.environ.get("VERS_API_KEY") or saved.get("api_key") or "")


def save_credentials(url: str, api_key: str) -> Path:
    path = config_dir() / "config.json"
    _write_private(path, {**_read(path), "url": url.rstrip("/"), "api_key": api_key})
    return path


class LocalState:
    """VM aliases and the VM used last, for one server. Changes re-read the file under a lock, so
    several `vers` processes at once (a script running branches in parallel) lose nothing."""

    def __init__(self, url: str) -> None:
        self.path = config_dir() / "state.json"
        self.url = url
        self._mine = self._server(_read(self.path))

    def _server(self, everything: dict[str, Any]) -> dict[str, Any]:
        mine: dict[str, Any] = everything.setdefault("servers", {}).setdefault(self.url, {})
        mine.setdefault("aliases", {})
        return mine

    @contextlib.contextmanager
    def _change(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_name(".state.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            everything = _read(self.path)
            self._mine = self._server(everything)
            yield self._mine
            _write_private(self.path, everything)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._mine["aliases"])

    @property
    def last_vm(self) -> str:
        return str(self._mine.get("last_vm", ""))

    def alias_of(self, vm_id: str) -> str:
        return next((name for name, target in self._mine["aliases"].items() if target == vm_id), "")

    def remember(self, vm_id: str, alias: str = "") -> str:
        """Record the VM as the one used last, under `alias` if given; answers the VM the alias named before."""
        with self._change() as mine:
            previous = mine["aliases"].get(alias, "") if alias else ""
            if alias:
                mine["aliases"][alias] = vm_id
            mine["last_vm"] = vm_id
        return previous if previous != vm_id else ""

    def name(self, vm_id: str, alias: str) -> str:
        """Give the VM the alias, leaving the current VM as it is; answers the VM the alias named before."""
        with self._change() as mine:
            previous = str(mine["aliases"].get(alias, ""))
            mine["aliases"][alias] = vm_id
        return previous if previous != vm_id else ""

    def forget(self, vm_id: str) -> None:
        with self._change() as mine:
            mine["aliases"] = {name: target for name, target in mine["aliases"].items() if target != vm_id}
            if mine.get("last_vm") == vm_id:
                mine["last_vm"] = ""


def check_alias(alias: str) -> str:
    if not ALIAS.fullmatch(alias) or is_uuid(alias):
        raise ConfigError(
            f"alias {alias!r} is not valid: 1-64 letters, digits, dots, hyphens or underscores, starting with a letter or digit"
        )
    return alias
