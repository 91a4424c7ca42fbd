"""The suite sets its own environment (tests/conftest.py): with a caller's settings exported, as a user of
`make run` may have them (VERS_DATA_DIR, a key, a peer's address, a limit), part of the suite runs in a
subprocess and passes as it does without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.common.settings import Settings, get_settings
from tests.conftest import BACKENDS, IMAGES, ROOT, SUITE_ENVIRONMENT

# What a caller's shell may hold; each would change what a test sees if it reached the suite.
CALLER = {
    "VERS_DATA_DIR": "/nonexistent/callers-data",
    "VERS_IMAGES_DIR": "/nonexistent/callers-images",
    "VERS_URL": "http://127.0.0.1:9",
    "VERS_API_KEY": "vers_callers_key",
    "VERS_CONFIG_DIR": "/nonexistent/callers-config",
    "REGISTRY_ADDR": "127.0.0.1:9",
    "REGISTRY_DATABASE_URL": "sqlite+aiosqlite:////nonexistent/registry.db",
    "VERS_ORG_MAX_REPOSITORIES": "0",
    "VERS_HOST_RESERVE_DISK_MIB": "999999999",
    "VERS_GUEST_DNS": "192.0.2.1",
}


def test_a_test_sees_the_suites_settings_and_none_of_the_callers() -> None:
    assert not {name: value for name, value in CALLER.items() if os.environ.get(name) == value}
    assert {name: os.environ.get(name) for name in SUITE_ENVIRONMENT} == SUITE_ENVIRONMENT
    assert os.environ.get("VERS_IMAGES_DIR") in (None, str(IMAGES))  # set once a VM test asked for the images
    assert get_settings() == Settings()
    assert Settings().data_dir == Path(".vers") and Settings().org_max_repositories == 100


def test_the_suite_runs_the_same_with_a_callers_settings_exported(tmp_path: Path) -> None:
    part = [
        f"{__file__}::test_a_test_sees_the_suites_settings_and_none_of_the_callers",
        # an in-process platform: its databases, addresses, limits and disk reserve are the suite's
        "tests/test_repositories_rest.py::test_create_answers_201_with_id_and_name",
        "tests/test_repositories_rest.py::test_get_list_and_defaults",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'run'}", *part],
        env={**os.environ, **CALLER},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    # the two of test_repositories_rest.py (marked both_backends) run once per backend
    assert f"{1 + 2 * len(BACKENDS)} passed" in run.stdout, run.stdout[-2000:]
