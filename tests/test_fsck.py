"""`vers admin fsck` against the platform of the suite: clean on real state (a VM, a commit, a tag), then
damage made one kind at a time behind the platform's back, each reported with its code, repaired when that
is safe, and kept and reported when it is a user's commit or tag. Every test leaves the platform as it
found it; problems other tests left before this module started are not this module's to judge."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from services import fsck as checker
from services.common.db import Database
from services.common.migrations import migrate
from services.common.settings import Settings
from services.common.timestamps import utcnow
from services.orchestrator import models as orchestrator
from services.orchestrator.integrity import Verifier
from services.orchestrator.layout import Layout
from services.orchestrator.machine import process_is_vm
from services.registry import models as registry
from services.tagging import models as tagging
from tests.conftest import Org, Platform
from tests.test_vms import new_vm

pytestmark = pytest.mark.vm

VERS = Path(sys.executable).parent / "vers"


@dataclass(frozen=True)
class Fsck:
    code: int
    report: dict[str, Any]

    def keys(self, section: str = "problems") -> set[tuple[str, str]]:
        return {(p["code"], p["object"]) for p in self.report[section]}

    def repaired(self) -> set[tuple[str, str]]:
        return {(r["code"], r["object"]) for r in self.report["repaired"] if "action" in r}


GRACE = 2.0  # short, so the tests need not wait a minute; the damage they make is dated older than this
LONG_AGO = utcnow() - timedelta(hours=1)


def backdate(*paths: Path) -> None:
    """Damage as old as damage found in the field: not mistaken for something in the middle of being made."""
    for path in paths:
        moment = LONG_AGO.timestamp()
        os.utime(path, (moment, moment))


async def fsck(platform: Platform, *args: str, **shell: str) -> Fsck:
    """`vers admin fsck --json` as an operator runs it on the platform's machine (`shell`: what the operator's
    shell has otherwise than the platform)."""
    settings = platform.settings
    env = {
        **os.environ, "VERS_DATA_DIR": str(settings.data_dir), "VERS_IMAGES_DIR": str(settings.image_root),
        "VERS_RUN_DIR": str(settings.vm_run_dir), **shell,
    }  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        VERS,
        "admin",
        "fsck",
        "--json",
        "--grace",
        str(GRACE),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # the platform runs in this event loop: it must go on while fsck looks at it
    stdout, stderr = await process.communicate()
    assert process.returncode in (0, 1) and not stderr, stderr.decode()
    return Fsck(process.returncode, json.loads(stdout))


async def sql(platform: Platform, service: str, statement: str, **params: object) -> None:
    db = Database(platform.settings.database_url(service))
    try:
        async with db.write() as session:
            await session.exec(text(statement), params=params)
    finally:
        await db.close()


async def scalar(platform: Platform, service: str, statement: str, **params: object) -> object:
    db = Database(platform.settings.database_url(service))
    try:
        async with db.read() as session:
            return (await session.exec(text(statement), params=params)).scalar_one()
    finally:
        await db.close()


async def add_row(platform: Platform, service: str, row: object) -> None:
    db = Database(platform.settings.database_url(service))
    try:
        async with db.write() as session:
            session.add(row)
    finally:
        await db.close()


@dataclass(frozen=True)
class Made:
    platform: Platform
    org: Org
    http: httpx.AsyncClient
    vm_id: str
    commit_id: str
    baseline: frozenset[tuple[str, str]]  # what fsck found before this module made anything

    def new(self, found: Fsck, section: str = "remaining") -> set[tuple[str, str]]:
        return found.keys(section) - self.baseline

    async def assert_clean(self) -> Fsck:
        found = await fsck(self.platform)
        assert self.new(found) == set(), found.report
        if not self.baseline:
            assert found.code == 0 and found.report["clean"], found.report
        return found

    async def branch(self) -> str:
        answer = await self.http.post("/api/v1/vm/from_commit", json={"commit_id": self.commit_id})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["vm_id"])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def made(platform: Platform) -> AsyncIterator[Made]:
    baseline = frozenset((await fsck(platform)).keys())
    org = await platform.new_org("fsck")
    async with platform.client(org) as http:
        vm_id = await new_vm(http, mem_size_mib=128)  # its RAM file is hashed on every check
        committed = await http.post(f"/api/v1/vm/{vm_id}/commit", json={"name": "checked"})
        assert committed.status_code == 201, committed.text
        commit_id = committed.json()["commit_id"]
        assert (await http.post("/api/v1/repositories", json={"name": "app"})).status_code == 201
        tagged = await http.post("/api/v1/repositories/app/tags", json={"tag_name": "latest", "commit_id": commit_id})
        assert tagged.status_code == 201, tagged.text
        yield Made(platform, org, http, vm_id, commit_id, baseline)
        assert (await http.delete(f"/api/v1/vm/{vm_id}")).status_code == 200
        assert (await http.delete("/api/v1/repositories/app")).status_code in (200, 204)
        assert (await http.delete(f"/api/v1/commits/{commit_id}")).status_code == 204


async def test_a_working_platform_is_clean(made: Made) -> None:
    found = await made.assert_clean()
    assert found.report["checked"]["commits"] >= 1 and found.report["checked"]["tags"] >= 1
    assert found.report["checked"]["processes"] >= 1
    settings = made.platform.settings
    env = {**os.environ, "VERS_DATA_DIR": str(settings.data_dir), "VERS_RUN_DIR": str(settings.vm_run_dir)}
    text_mode = await asyncio.create_subprocess_exec(VERS, "admin", "fsck", "--grace", str(GRACE), env=env, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await text_mode.communicate()
    if not made.baseline:
        assert text_mode.returncode == 0 and stdout.decode().startswith("✓ Clean ("), stdout.decode()


async def test_files_nothing_owns_are_reported_and_removed(made: Made) -> None:
    data, run = made.platform.settings.data_dir.resolve(), made.platform.settings.vm_run_dir
    stray_layer = data / "layers" / f"{uuid.uuid4()}.qcow2"
    stray_layer.write_bytes(b"QFI\xfb" + bytes(508))
    stray_commit = data / "commits" / str(uuid.uuid4())
    stray_commit.mkdir()
    (stray_commit / "state").write_bytes(b"half a commit")
    stray_run = run / str(uuid.uuid4())
    stray_run.mkdir()
    (stray_run / "qemu.log").write_text("a VM nobody knows\n")
    stray_sleep = data / "sleeping" / str(uuid.uuid4())
    stray_sleep.mkdir()
    (stray_sleep / "state").write_bytes(b"saved")
    ram_copy = run / made.vm_id / f"ram-{uuid.uuid4()}"
    ram_copy.write_bytes(b"\0" * 4096)
    backdate(
        stray_layer, stray_commit / "state", stray_commit, stray_run / "qemu.log", stray_run, stray_sleep / "state", stray_sleep, ram_copy
    )
    expected = {
        ("orphan-layer-file", str(stray_layer)), ("orphan-commit-folder", str(stray_commit)),
        ("orphan-run-folder", str(stray_run)), ("orphan-sleep-folder", str(stray_sleep)), ("orphan-ram-copy", str(ram_copy)),
    }  # fmt: skip

    found = await fsck(made.platform)
    assert found.code == 1 and made.new(found) == expected, found.report
    assert all(p["repair"] == "remove it" for p in found.report["problems"] if (p["code"], p["object"]) in expected)

    repaired = await fsck(made.platform, "--repair")
    assert expected <= repaired.repaired() and made.new(repaired) == set(), repaired.report
    assert not any(path.exists() for path in (stray_layer, stray_commit, stray_run, stray_sleep, ram_copy))
    await made.assert_clean()


async def test_damaged_commits_and_dangling_tags_are_reported_and_kept(made: Made) -> None:
    ram = made.platform.settings.data_dir / "commits" / made.commit_id / "ram"
    with ram.open("r+b") as file:
        file.seek(4096)
        original = file.read(1)
        file.seek(4096)
        file.write(bytes([original[0] ^ 0xFF]))
    gone = str(uuid.uuid4())
    tag = tagging.CommitTagRow(id=str(uuid.uuid4()), org_id=made.org.id, name="points-nowhere", commit_id=gone)
    await add_row(made.platform, "tagging", tag)
    operation = orchestrator.OperationRow(id=str(uuid.uuid4()), vm_id=str(uuid.uuid4()), kind="commit", started_at=LONG_AGO)
    await add_row(made.platform, "orchestrator", operation)
    try:
        expected = {
            ("commit-damaged", f"commit {made.commit_id}"), ("tag-dangling", f"legacy tag {made.org.name}/points-nowhere"),
            ("operation-unfinished", f"operation {operation.id}"),
        }  # fmt: skip
        repaired = await fsck(made.platform, "--repair")
        assert repaired.code == 1 and made.new(repaired, "problems") == expected, repaired.report
        assert made.new(repaired) == expected and not repaired.report["repaired"]
        messages = {p["code"]: p["message"] for p in repaired.report["problems"]}
        assert "its ram file does not match its checksum" in messages["commit-damaged"]
        assert f"points at commit {gone}, which does not exist" in messages["tag-dangling"]
        assert ram.exists()
    finally:
        with ram.open("r+b") as file:
            file.seek(4096)
            file.write(original)
        await sql(made.platform, "tagging", "DELETE FROM commit_tags WHERE id = :id", id=tag.id)
        await sql(made.platform, "orchestrator", "DELETE FROM operations WHERE id = :id", id=operation.id)
    await made.assert_clean()


async def test_a_vm_whose_qemu_died_unseen_is_marked_dead(made: Made) -> None:
    """The orchestrator saw its QEMU die and marked it dead; its row is set back to running, as if the
    orchestrator had been stopped when it happened."""
    vm = await made.branch()
    os.kill(made.platform.vm_pid(vm), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (await made.http.get(f"/api/v1/vm/{vm}/status")).json()["state"] != "dead" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await sql(made.platform, "orchestrator", "UPDATE vms SET state = 'running', created_at = :then WHERE id = :id", then=LONG_AGO, id=vm)

    found = await fsck(made.platform)
    expected = {("vm-no-process", f"VM {vm}"), ("quota-mismatch", f"organization {made.org.name}")}
    assert found.code == 1 and made.new(found) == expected, found.report
    quota = next(p for p in found.report["problems"] if p["code"] == "quota-mismatch")
    assert f"VM {vm} is counted but does not run" in quota["message"]

    repaired = await fsck(made.platform, "--repair")
    assert ("vm-no-process", f"VM {vm}") in repaired.repaired() and made.new(repaired) == set(), repaired.report
    assert (await made.http.get(f"/api/v1/vm/{vm}/status")).json()["state"] == "dead"
    assert not (made.platform.settings.vm_run_dir / vm).exists()
    assert (await made.http.delete(f"/api/v1/vm/{vm}")).status_code == 200
    await made.assert_clean()


async def test_a_qemu_no_live_vm_owns_is_stopped(made: Made) -> None:
    """A VM deleted while its QEMU started (the row says deleted, the process runs on): the process, its
    run folder and its disk layer are all owned by nothing."""
    vm = await made.branch()
    branched, pid = time.monotonic(), made.platform.vm_pid(vm)
    layer_id = await scalar(made.platform, "orchestrator", "SELECT layer_id FROM vms WHERE id = :id", id=vm)
    layer = made.platform.settings.data_dir / "layers" / f"{layer_id}.qcow2"
    assert layer.exists()
    await sql(made.platform, "orchestrator", "UPDATE vms SET deleted_at = :now, created_at = :then WHERE id = :id",
              now=utcnow(), then=LONG_AGO, id=vm)  # fmt: skip
    backdate(made.platform.settings.vm_run_dir / vm)
    await asyncio.sleep(max(0.0, GRACE - (time.monotonic() - branched)))  # its QEMU is older than the grace period

    found = await fsck(made.platform)
    run_folder = made.platform.settings.vm_run_dir / vm
    expected = {("orphan-process", f"process {pid}"), ("orphan-run-folder", str(run_folder))}
    assert found.code == 1 and expected <= made.new(found), found.report

    repaired = await fsck(made.platform, "--repair")
    assert ("orphan-process", f"process {pid}") in repaired.repaired(), repaired.report
    # the orchestrator, seeing the QEMU it still watched exit, may remove its run folder first
    run_repair = next(r for r in repaired.report["repaired"] if (r["code"], r["object"]) == ("orphan-run-folder", str(run_folder)))
    assert "action" in run_repair or run_repair.get("skipped") == f"{run_folder} is already gone", repaired.report
    assert any(code == "garbage-layer" for code, _ in repaired.repaired()), "the layer the QEMU held is collected once it is gone"
    assert made.new(repaired) == set(), repaired.report
    assert not Path(f"/proc/{pid}").exists() or b"vers-" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert not run_folder.exists() and not layer.exists()
    await made.assert_clean()


async def test_another_database_than_the_platforms_is_reported_and_nothing_repaired(made: Made, tmp_path: Path) -> None:
    """ORCHESTRATOR_DATABASE_URL missing from the operator's shell, or naming a file never made, empty, or
    made with the tables but no rows: read as empty, every layer file and commit folder would look orphan and
    every QEMU unowned. fsck says which database it read, and --repair does nothing at all."""
    data, run = made.platform.settings.data_dir.resolve(), made.platform.settings.vm_run_dir
    pid = made.platform.vm_pid(made.vm_id)
    assert any((data / "layers").glob("*.qcow2")) and (data / "commits" / made.commit_id).is_dir()

    def held() -> set[Path]:
        return {path for folder in (data / "layers", data / "commits", data / "sleeping", run) for path in folder.iterdir()}

    before = held()
    never_made, empty, no_rows = tmp_path / "never-made.db", tmp_path / "empty.db", tmp_path / "no-rows.db"
    empty.touch()
    db = Database(f"sqlite+aiosqlite:///{no_rows}")
    await migrate(db, "orchestrator")
    await db.close()
    for database in (never_made, empty, no_rows):
        url = f"sqlite+aiosqlite:///{database}"
        for args in ((), ("--repair",)):
            found = await fsck(made.platform, *args, ORCHESTRATOR_DATABASE_URL=url)
            assert found.code == 1 and found.keys() == {("database-missing", "database orchestrator")}, found.report
        message = found.report["problems"][0]["message"]
        assert url in message and "VERS_DATA_DIR" in message and "ORCHESTRATOR_DATABASE_URL" in message, message
        assert "VERS_DATA_DIR" in found.report["refused"], found.report
        assert not found.repaired() and all("refuses to act" in r["skipped"] for r in found.report["repaired"]), found.report
        assert held() == before and process_is_vm(pid, made.vm_id)
    assert not any(path.name.startswith("never-made") for path in tmp_path.iterdir()), "fsck never makes a database"
    assert empty.stat().st_size == 0
    await made.assert_clean()


async def test_another_run_folder_than_the_platforms_marks_no_vm_dead(made: Made, tmp_path: Path) -> None:
    """VERS_RUN_DIR in the operator's shell is not the platform's: no QEMU is found under it, and every live VM
    would look gone. The process a VM row names runs, under another folder: fsck says which, and --repair does
    nothing at all."""
    elsewhere, run = tmp_path / "run", made.platform.settings.vm_run_dir
    elsewhere.mkdir()
    pid = made.platform.vm_pid(made.vm_id)
    await asyncio.sleep(GRACE)  # the VM is not one just made, whose row and QEMU may disagree a moment
    expected = {("run-dir-mismatch", f"VM {made.vm_id}"), ("run-dir-mismatch", f"run folder {elsewhere}")}
    for args in ((), ("--repair",)):
        found = await fsck(made.platform, *args, VERS_RUN_DIR=str(elsewhere))
        assert found.code == 1 and expected <= found.keys(), found.report
        assert all(p["code"] != "vm-no-process" for p in found.report["problems"]), found.report
    messages = {p["object"]: p["message"] for p in found.report["problems"]}
    assert f"process {pid}" in messages[f"VM {made.vm_id}"] and f"under {run}," in messages[f"VM {made.vm_id}"], messages
    assert f"VERS_RUN_DIR={run}" in found.report["refused"], found.report
    assert not found.repaired() and found.report["remaining"] == found.report["problems"], found.report
    assert (await made.http.get(f"/api/v1/vm/{made.vm_id}/status")).json()["state"] == "running"
    assert process_is_vm(pid, made.vm_id) and (run / made.vm_id).is_dir() and list(elsewhere.iterdir()) == []
    await made.assert_clean()


async def test_a_stopped_platforms_data_folder(tmp_path: Path) -> None:
    """No service runs: fsck reads what is on disk. A sleeping VM stands on a layer whose file is gone and
    has no saved state, a tag outlived its repository, a garbage layer, a saga and a commit deletion were cut
    short an hour ago: each is reported; only the garbage goes."""
    settings = Settings(data_dir=tmp_path / "data", run_dir=str(tmp_path / "run"))
    data = settings.data_dir.resolve()
    for folder in ("layers", "commits", "sleeping", "images"):
        (data / folder).mkdir(parents=True)
    base, layers = data / "images" / "rootfs.qcow2", data / "layers"
    ids = {name: str(uuid.uuid4()) for name in ("frozen", "working", "garbage", "commit", "deleting", "vm", "org", "repo", "saga")}
    commands = [("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")]
    for name, backing in (("frozen", base), ("working", layers / f"{ids['frozen']}.qcow2"), ("garbage", base)):
        commands.append(("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(layers / f"{ids[name]}.qcow2")))
    for command in commands:
        assert await (await asyncio.create_subprocess_exec(*command)).wait() == 0
    (layers / f"{ids['working']}.qcow2").unlink()
    folder = data / "commits" / ids["commit"]
    folder.mkdir()
    (folder / "state").write_bytes(os.urandom(4096))
    checksums = json.dumps(Verifier(Layout.of(settings)).checksums(ids["commit"], ids["frozen"]))
    shape = {"vcpu_count": 1, "mem_size_mib": 128, "fs_size_mib": 64, "image_name": "default", "kernel_path": "-", "initramfs_path": "-"}
    rows = {
        "registry": [registry.OrgRow(id=ids["org"], name="stopped"),
                     registry.SagaRow(id=ids["saga"], kind="repo_delete", org_id=ids["org"], step="tags_deleted", created_at=LONG_AGO)],
        "tagging": [tagging.RepoTagRow(id=str(uuid.uuid4()), repo_id=ids["repo"], repo_name="gone", org_id=ids["org"], name="latest",
                                       commit_id=ids["commit"])],
        "orchestrator": [
            orchestrator.LayerRow(id=ids["frozen"], base_path=str(base), created_at=LONG_AGO),
            orchestrator.LayerRow(id=ids["garbage"], base_path=str(base), created_at=LONG_AGO),
            orchestrator.LayerRow(id=ids["working"], parent_id=ids["frozen"], created_at=LONG_AGO),
            orchestrator.CommitRow(id=ids["commit"], org_id=ids["org"], layer_id=ids["frozen"], ram_format="stream", checksums=checksums,
                                   created_at=LONG_AGO, **shape),
            orchestrator.VmRow(id=ids["vm"], org_id=ids["org"], state="sleeping", layer_id=ids["working"], ram_mode="shared",
                               created_at=LONG_AGO, **shape),
            orchestrator.CommitDeletionRow(commit_id=ids["deleting"], org_id=ids["org"], started_at=LONG_AGO),
        ],
    }  # fmt: skip
    for service in ("registry", "tagging", "orchestrator"):
        db = Database(settings.database_url(service))
        await migrate(db, service)
        async with db.write() as session:
            for row in rows[service]:
                session.add(row)
                await session.flush()
        await db.close()

    expected = {
        ("layer-missing", f"layer {ids['working']}"), ("sleep-state-missing", f"VM {ids['vm']}"),
        ("tag-orphan", "tag stopped/gone:latest"), ("garbage-layer", f"layer {ids['garbage']}"),
        ("saga-unfinished", f"saga {ids['saga']}"), ("commit-deletion-unfinished", f"commit {ids['deleting']}"),
    }  # fmt: skip
    report = await checker.fsck(settings, repair=True)
    assert {p.key for p in report.problems} == expected, report.as_dict()
    assert [(r["code"], r["object"]) for r in report.repaired if "action" in r] == [("garbage-layer", f"layer {ids['garbage']}")]
    assert {p.key for p in report.left} == expected - {("garbage-layer", f"layer {ids['garbage']}")}
    assert not (layers / f"{ids['garbage']}.qcow2").exists() and (layers / f"{ids['frozen']}.qcow2").exists()
