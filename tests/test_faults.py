"""kill -9 at every step: the orchestrator is made to exit at a named point of commit, branch, sleep, wake,
create and delete (VERS_FAULT_POINT), the platform is started again, `vers admin fsck` finds nothing wrong,
and the VM runs on: its next commit restores exactly its state at that time (a marker file and a counter).
The platform runs as `make run` starts it, one process per service, its VMs kept running across restarts."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.common.settings import Settings
from tests.conftest import discard, kill_vms_under
from tests.launcher import VERS, Launched, launcher_env
from tests.test_vms import COUNTER

pytestmark = pytest.mark.vm


@dataclass
class Site:
    env: dict[str, str]
    launched: Launched
    key: str
    vm: str

    @property
    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.env["VERS_URL"], headers={"Authorization": f"Bearer {self.key}"}, timeout=180)

    def restart(self, fault: str = "") -> None:
        if self.launched.process.poll() is None:
            assert self.launched.stop() == 0
        self.launched = Launched({**self.env, "VERS_FAULT_POINT": fault} if fault else self.env)

    def crashed(self) -> None:
        """The platform stops once the faulted service exits; that service's exit is the fault's."""
        assert self.launched.process.wait(120) == 1


def sh(http: httpx.Client, vm: str, script: str) -> str:
    answer = http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["sh", "-c", script]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["exit_code"] == 0, answer.json()
    return str(answer.json()["stdout"])


def counter(http: httpx.Client, vm: str) -> int:
    for _ in range(20):
        if text := sh(http, vm, "cat /run/counter").strip():
            return int(text)
    raise AssertionError("/run/counter stayed empty")


def fsck(env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run([VERS, "admin", "fsck", "--json"], env=env, capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["clean"], f"fsck found problems:\n{result.stdout}\n{result.stderr}"
    return dict(report)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    env = {**launcher_env(tmp_path_factory.mktemp("faults")), "VERS_KEEP_VMS_RUNNING": "true"}
    launched = Launched(env)
    site = Site(env, launched, launched.api_key, "")
    try:
        http = httpx.Client(base_url=env["VERS_URL"], headers={"Authorization": f"Bearer {launched.api_key}"}, timeout=180)
        answer = http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 128}})
        assert answer.status_code == 201, answer.text
        site.vm = answer.json()["vm_id"]
        sh(http, site.vm, COUNTER)
        yield site
    finally:
        if site.launched.process.poll() is None:  # the platform as the last restart left it
            site.launched.stop()
        kill_vms_under(Settings(data_dir=Path(env["VERS_DATA_DIR"])).vm_run_dir)
        discard(Path(env["VERS_DATA_DIR"]).parent)


def org_vms(http: httpx.Client) -> dict[str, str]:
    return {vm["vm_id"]: vm["state"] for vm in http.get("/api/v1/vm").json()}


def org_commits(http: httpx.Client) -> set[str]:
    return {c["commit_id"] for c in http.get("/api/v1/commits?limit=500").json()["commits"]}


def attempt(call) -> None:  # type: ignore[no-untyped-def]
    """A call whose server dies under it: an error answer or a dropped connection, never a success."""
    try:
        answer = call()
    except httpx.TransportError:
        return
    assert answer.status_code >= 500, answer.text


def committed_state_restores(site: Site) -> None:
    """The VM runs, and a commit made now restores its marker and a counter that went on from where it was."""
    http = site.http
    stamp = str(time.time_ns())
    sh(http, site.vm, f"echo {stamp} > /root/marker && sync")
    before = counter(http, site.vm)
    answer = http.post(f"/api/v1/vm/{site.vm}/commit", json={})
    assert answer.status_code == 201, answer.text
    after = counter(http, site.vm)
    restored = http.post("/api/v1/vm/from_commit", json={"commit_id": answer.json()["commit_id"]})
    assert restored.status_code == 201, restored.text
    copy = restored.json()["vm_id"]
    assert sh(http, copy, "cat /root/marker").strip() == stamp
    assert before <= counter(http, copy) <= after + 50
    assert http.delete(f"/api/v1/vm/{copy}").status_code == 200


POINTS = [
    "commit.after_intent",
    "commit.after_snapshot",
    "commit.after_state",
    "commit.before_record",
    "restore.after_launch",
    "restore.after_start",
    "sleep.after_intent",
    "sleep.after_save",
    "sleep.after_quit",
    "wake.after_launch",
    "wake.after_record",
    "create.after_launch",
    "delete.after_intent",
    "delete.after_kill",
    "commit_delete.after_mark",
    "commit_delete.after_reserve",
]


@pytest.mark.parametrize("point", POINTS)
def test_orchestrator_killed_at(point: str, site: Site) -> None:
    kind = point.split(".")[0]
    http = site.http
    vms_before, commits_before = org_vms(http), org_commits(http)
    scratch = ""
    if kind == "wake":
        assert http.patch(f"/api/v1/vm/{site.vm}/state", json={"state": "Sleeping"}).status_code == 200
    if kind == "delete":
        scratch = http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 128}}).json()["vm_id"]
    if kind == "commit_delete":
        scratch = http.post(f"/api/v1/vm/{site.vm}/commit", json={}).json()["commit_id"]

    site.restart(fault=point)
    http = site.http
    vm = site.vm
    calls = {
        "commit": lambda: http.post(f"/api/v1/vm/{vm}/commit", json={}),
        "restore": lambda: http.post(f"/api/v1/vm/{vm}/branch?count=2"),
        "sleep": lambda: http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Sleeping"}),
        "wake": lambda: http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Running"}),
        "create": lambda: http.post("/api/v1/vm/new_root", json={"vm_config": {"mem_size_mib": 128}}),
        "delete": lambda: http.delete(f"/api/v1/vm/{scratch}"),
        "commit_delete": lambda: http.delete(f"/api/v1/commits/{scratch}"),
    }
    attempt(calls[kind])
    site.crashed()
    site.restart()
    http = site.http
    fsck(site.env)

    vms, commits = org_vms(http), org_commits(http)
    if kind in ("sleep", "wake") and vms[vm] == "sleeping":  # finished (sleep) or undone (wake): both whole
        assert http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Running"}).status_code == 200
    else:
        assert vms[vm] == "running", vms
    if kind == "restore":  # the branches' caller never heard of them: undone (the branch's commit may stay)
        assert set(vms) - set(vms_before) == set()
    if kind == "create":  # the new VM boots on, as it would after any restart
        new = set(vms) - set(vms_before)
        assert len(new) == 1 and vms[new.pop()] in ("booting", "running")
    if kind == "delete":  # a delete, once begun, is finished
        assert scratch not in vms
    if kind == "commit_delete":
        assert scratch not in commits
    if kind == "commit":  # an interrupted commit is undone: no commit half-recorded
        assert commits == commits_before
    committed_state_restores(site)
    for extra in set(org_vms(http)) - {vm}:
        assert http.delete(f"/api/v1/vm/{extra}").status_code == 200
    fsck(site.env)
