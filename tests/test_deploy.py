"""deploy/ stays true to the code: every setting is listed with its default, every process has a unit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from services.common.settings import Settings
from services.platform import PROCESSES

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def env_file() -> dict[str, str]:
    lines = (DEPLOY / "vers.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_env_file_lists_every_setting_with_its_default() -> None:
    listed = env_file()
    defaults = Settings.model_construct()
    for name, field in Settings.model_fields.items():
        alias = str(field.validation_alias)
        assert alias in listed, f"{alias} is missing from deploy/vers.env"
        assert listed[alias] == str(getattr(defaults, name)), f"{alias}: deploy/vers.env says {listed[alias]!r}"


def test_env_file_values_parse() -> None:
    assert Settings(**env_file())


def test_a_unit_per_process() -> None:
    for process in PROCESSES:
        unit = (DEPLOY / "systemd" / f"vers-{process}.service").read_text()
        assert f"-m services.{process}" in unit
        assert "EnvironmentFile=/etc/vers/vers.env" in unit


def unit(process: str) -> dict[str, list[str]]:
    """A unit's [Service] directives: name -> every value given."""
    directives: dict[str, list[str]] = {}
    section = ""
    for line in (DEPLOY / "systemd" / f"vers-{process}.service").read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            directives.setdefault(name, []).append(value)
    return directives


def test_units_grant_the_data_folder_the_processes_use() -> None:
    for process in PROCESSES:
        service = unit(process)
        data_dir = Path(service["WorkingDirectory"][0]) / env_file()["VERS_DATA_DIR"]
        assert service["ReadWritePaths"][0].split() == [f"-{data_dir}"], process
        assert f"/usr/bin/install -d -m 0700 -o vers -g vers {data_dir}" in service["ExecStartPre"][0], process
        assert "StateDirectory" not in service, process


HARDENING = {
    "UMask": "0077", "NoNewPrivileges": "true", "ProtectSystem": "strict", "ProtectHome": "true",
    "PrivateTmp": "true", "ProtectKernelModules": "true", "ProtectControlGroups": "true",
    "RestrictSUIDSGID": "true", "LockPersonality": "true",
}  # fmt: skip


def test_units_are_hardened() -> None:
    for process in PROCESSES:
        service = unit(process)
        for name, value in HARDENING.items():
            assert service.get(name) == [value], f"vers-{process}.service: {name}={service.get(name)}"
        capabilities = service["CapabilityBoundingSet"][0].split()
        if process == "orchestrator":
            # it makes the guests' network namespace and writes /proc/sys (a root orchestrator, for "nat")
            assert service["RestrictNamespaces"] == ["net mnt"]
            assert "ProtectKernelTunables" not in service
            assert set(capabilities) <= {
                "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SETPCAP", "CAP_DAC_OVERRIDE", "CAP_SETUID", "CAP_SETGID",
                "CAP_KILL", "CAP_CHOWN", "CAP_FOWNER",
            }  # fmt: skip
        else:
            assert capabilities == [], process
            assert service["RestrictNamespaces"] == ["true"]
            assert service["ProtectKernelTunables"] == ["true"]
            assert service["PrivateDevices"] == ["true"]


def test_units_verify_where_systemd_analyze_is_installed() -> None:
    """systemd's own check (part of Debian's systemd package): every directive known and well-formed. Only
    the installed checkout (/opt/vers) may be missing here."""
    if shutil.which("systemd-analyze") is None:
        return
    units = sorted(str(path) for path in (DEPLOY / "systemd").iterdir())
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, check=False)
    problems = [
        line for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "/opt/vers/.venv/bin/python is not executable" not in line
    ]  # fmt: skip
    assert not problems, problems
