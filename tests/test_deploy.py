"""deploy/ stays true to the code: every setting is listed with its default, every process has a unit."""

from __future__ import annotations

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
