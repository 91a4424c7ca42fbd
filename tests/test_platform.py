"""`make run` as a user meets it: every process started by the launcher, stopped by a signal, restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.settings import Settings
from tests.conftest import kill_vms_under
from tests.launcher import VERS, Launched, launcher_env

pytestmark = pytest.mark.vm


@pytest.fixture
def platform_env(tmp_path: Path) -> dict[str, str]:
    return launcher_env(tmp_path)


@pytest.fixture
def launch(platform_env: dict[str, str]) -> Iterator[type[Launched]]:
    started: list[Launched] = []

    def start(env: dict[str, str] = platform_env) -> Launched:
        launched = Launched(env)
        started.append(launched)
        return launched

    yield start  # type: ignore[misc]
    for launched in started:
        if launched.process.poll() is None:
            launched.stop()  # SIGTERM, so the launcher stops its services too (a SIGKILL would leave them)
    kill_vms_under(Settings(data_dir=Path(platform_env["VERS_DATA_DIR"])).vm_run_dir)


def ports_closed(env: dict[str, str]) -> bool:
    addresses = [env[k] for k in ("REGISTRY_ADDR", "TAGGING_ADDR", "ORCHESTRATOR_ADDR")]
    addresses.append(f"127.0.0.1:{env['VERS_HTTP_PORT']}")
    for address in addresses:
        host, port = address.rsplit(":", 1)
        with socket.socket() as sock:
            if sock.connect_ex((host, int(port))) == 0:
                return False
    return True


def test_run_prints_url_and_key_and_survives_a_restart(launch, platform_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    first = launch()
    url = platform_env["VERS_URL"]
    assert f"export VERS_URL={url}" in first.banner
    headers = {"Authorization": f"Bearer {first.api_key}"}
    created = httpx.post(f"{url}/api/v1/repositories", json={"name": "my-app"}, headers=headers)
    assert created.status_code == 201
    httpx.patch(f"{url}/api/v1/repositories/my-app/visibility", json={"is_public": True}, headers=headers)

    assert first.stop(signal.SIGTERM) == 0
    assert ports_closed(platform_env)

    second = launch()
    assert second.api_key == first.api_key
    repo = httpx.get(f"{url}/api/v1/repositories/my-app", headers=headers).json()
    assert (repo["repo_id"], repo["is_public"]) == (created.json()["repo_id"], True)
    assert second.stop(signal.SIGINT) == 0
    assert ports_closed(platform_env)


def test_admin_org_create_prints_the_key_last(launch, platform_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    launched = launch()
    result = subprocess.run([VERS, "admin", "org", "create", "acme"], env=platform_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("vers_")
    me = httpx.get(f"{platform_env['VERS_URL']}/api/v1/whoami", headers={"Authorization": f"Bearer {key}"})
    assert me.json()["org"]["name"] == "acme"

    again = subprocess.run([VERS, "admin", "org", "create", "acme"], env=platform_env, capture_output=True, text=True)
    assert again.returncode == 1
    assert "organization 'acme' already exists" in again.stderr
    assert "Traceback" not in again.stderr
    launched.stop()


def test_admin_without_the_data_folder_says_so(platform_env: dict[str, str], tmp_path: Path) -> None:
    env = {**platform_env, "VERS_DATA_DIR": str(tmp_path / "elsewhere")}
    result = subprocess.run([VERS, "admin", "org", "create", "acme"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "no administrator key" in result.stderr


def test_unreachable_platform_is_said_plainly(launch, platform_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    launch().stop()
    result = subprocess.run([VERS, "admin", "org", "list"], env=platform_env, capture_output=True, text=True)
    assert result.returncode == 1
    assert f"cannot reach the Vers API at {platform_env['VERS_URL']}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_crashed_service_stops_the_platform(launch, platform_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    launched = launch()
    tagging_port = int(platform_env["TAGGING_ADDR"].rsplit(":", 1)[1])
    pid = _pid_listening_on(tagging_port)
    os.kill(pid, signal.SIGKILL)
    assert launched.process.wait(30) == 1
    assert ports_closed(platform_env)


def _pid_listening_on(port: int) -> int:
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inode = fields[9]
    assert inode, f"nothing listens on {port}"
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return int(fd.parts[2])
        except OSError:
            continue
    raise AssertionError(f"no process owns port {port}")


def test_ctrl_c_puts_vms_to_sleep_and_the_next_start_wakes_them(launch, platform_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """`make run`, Ctrl-C, `make run`: no QEMU runs while the platform is stopped, and afterwards the VM's
    files and its counter are where they were (the counter goes on, it does not start again)."""
    from services.orchestrator.machine import find_processes
    from tests.test_faults import counter, sh
    from tests.test_vms import COUNTER

    first = launch()
    http = httpx.Client(base_url=platform_env["VERS_URL"], headers={"Authorization": f"Bearer {first.api_key}"}, timeout=180)
    answer = http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 128}})
    assert answer.status_code == 201, answer.text
    vm = answer.json()["vm_id"]
    sh(http, vm, "echo kept > /root/file && " + COUNTER)
    while (before := counter(http, vm)) < 5:
        pass
    assert first.stop(signal.SIGINT) == 0
    run_dir = Settings(data_dir=Path(platform_env["VERS_DATA_DIR"])).vm_run_dir
    assert find_processes(run_dir) == {}, "a VM kept running with nothing to manage it"

    second = launch()
    assert http.get(f"/api/v1/vm/{vm}/status").json()["state"] == "running"
    assert sh(http, vm, "cat /root/file") == "kept\n"
    woken = counter(http, vm)
    assert before <= woken < before + 50, (before, woken)
    assert second.stop(signal.SIGINT) == 0
