"""`vers ssh-config` and `vers connect --ssh`: OpenSSH reaching a VM's SSH server through `vers tunnel
--stdio` as its ProxyCommand, logging in with the VM's own key (a branch has its own, so the key of the
VM it came from does not open it). Branches share their source's host keys, so known_hosts is not used.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from services.cli.config import config_dir
from services.common.files import write_atomic


@dataclass(frozen=True)
class HostBlock:
    host: str
    vm_id: str
    identity_file: Path
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"host": self.host, "vm_id": self.vm_id, "identity_file": str(self.identity_file), "config": self.text}


def vers_command() -> list[str]:
    """This `vers` by absolute path, for ssh to run later from wherever it runs."""
    invoked = Path(sys.argv[0])
    if invoked.suffix != ".py" and invoked.is_file() and os.access(invoked, os.X_OK):
        return [str(invoked.resolve())]
    if found := shutil.which("vers"):
        return [str(Path(found).resolve())]
    return [sys.executable, "-m", "services.cli.main"]


def _environment() -> list[str]:
    """What made this `vers` reach its server, so the ProxyCommand reaches the same one from another shell."""
    pinned = []
    if "VERS_CONFIG_DIR" in os.environ or "XDG_CONFIG_HOME" in os.environ:
        pinned.append(f"VERS_CONFIG_DIR={config_dir().absolute()}")
    if url := os.environ.get("VERS_URL"):
        pinned.append(f"VERS_URL={url}")
    return ["env", *pinned] if pinned else []


def _ssh_value(text: str) -> str:
    """A value as ssh_config reads it: `%` starts a token, and a value with spaces needs quotes."""
    text = text.replace("%", "%%")
    return f'"{text}"' if " " in text else text


def save_key(vm_id: str, private_key: str) -> Path:
    path = config_dir() / "keys" / vm_id
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, private_key if private_key.endswith("\n") else private_key + "\n", 0o600)
    return path


def host_block(host: str, vm_id: str, identity_file: Path, ssh_port: int) -> HostBlock:
    proxy = shlex.join([*_environment(), *vers_command(), "tunnel", "--stdio"]).replace("%", "%%") + f" %h {ssh_port}"
    lines = [
        f"Host {host}",
        f"  HostName {vm_id}",
        "  User root",
        f"  IdentityFile {_ssh_value(str(identity_file.absolute()))}",
        "  IdentitiesOnly yes",
        "  PreferredAuthentications publickey",
        f"  ProxyCommand {proxy}",
        "  StrictHostKeyChecking no",
        "  UserKnownHostsFile /dev/null",
        "  LogLevel ERROR",
    ]
    return HostBlock(host, vm_id, identity_file.absolute(), "\n".join(lines) + "\n")


def write_config(block: HostBlock) -> Path:
    """The block alone in a file of its own, for `ssh -F`."""
    path = config_dir() / "ssh" / f"{block.vm_id}.config"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, block.text, 0o600)
    return path


def forget(vm_id: str) -> None:
    """A deleted VM's key and config file: nothing they open is left."""
    for path in (config_dir() / "keys" / vm_id, config_dir() / "ssh" / f"{vm_id}.config"):
        path.unlink(missing_ok=True)
