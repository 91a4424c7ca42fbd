"""`vers admin fsck`: the invariants that span the three services' databases, the data folder and the QEMU
processes, checked on the platform's machine whether the platform runs or not. It reads the databases and
files directly, since what it looks for is exactly what the services cannot see from inside one of them.

Each problem has a code, the object it concerns and a message saying what is wrong and what `--repair`
does about it. Repairs only take away what nothing owns (files, folders, garbage layers, QEMU processes of
no live VM) or make a row say what is true (a VM whose QEMU is gone is dead); a commit or a tag a user made
is never deleted, only reported.

A running platform is caught between the steps of its changes: what an operation in flight owns, and what
is younger than the grace period, is not a problem; and a problem counts only if a second look a moment
later still sees it.

Pointed at the wrong place (another database than the platform's, another run folder), everything would
look orphan: fsck then reports that, and `--repair` refuses to act at all."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from services.common.db import Database, execute_sql
from services.common.errors import DataLoss
from services.common.settings import Settings
from services.common.timestamps import as_utc
from services.orchestrator.commitstore import PART
from services.orchestrator.integrity import Verifier
from services.orchestrator.layout import Layout
from services.orchestrator.machine import kill_process, process_is_vm, qcow2_backing
from services.orchestrator.models import LIVE_STATES, VmState

GRACE_SECONDS = 60.0
SECOND_LOOK_SECONDS = 0.5
REPAIR_ROUNDS = 3  # a repair can free what another one then takes away (a killed QEMU's layers)

# Read with plain SQL, each table optional: some are newer than the databases fsck may be pointed at.
TABLES = {
    "tagging": ("repo_tags", "commit_tags", "deleted_commits"),
    "registry": ("orgs", "repositories", "sagas"),
    "orchestrator": ("layers", "vms", "commits", "operations", "commit_deletions", "fork_requests"),
}
FINISHED_COLUMNS = ("finished_at", "completed_at", "done_at")
FINISHED_STEPS = frozenset({"done", "finished", "completed", "undone", "compensated", "abandoned"})
# Processes before the folders they use, rows before the files they free.
REPAIR_ORDER = (
    "orphan-process", "vm-no-process", "orphan-run-folder", "orphan-ram-copy", "orphan-sleep-folder",
    "orphan-commit-folder", "orphan-layer-file", "garbage-layer",
)  # fmt: skip
ENV_NAMES = {service: f"{service.upper()}_DATABASE_URL" for service in TABLES}

Action = Callable[[], Awaitable[str]]
Row = dict[str, Any]


class Skipped(Exception):
    """A repair not made because what it would act on changed since it was checked."""


@dataclass(frozen=True)
class Problem:
    code: str
    object: str
    message: str
    repair: str = ""  # what --repair does about it; empty when it is left to a person
    action: Action | None = field(default=None, compare=False, repr=False)
    refuses: str = ""  # why --repair does nothing at all while this problem is there

    @property
    def key(self) -> tuple[str, str]:
        return self.code, self.object

    def as_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "object": self.object, "message": self.message, "repair": self.repair or None}


@dataclass
class Report:
    problems: list[Problem]
    repaired: list[dict[str, str]] = field(default_factory=list)
    remaining: list[Problem] | None = None  # after --repair: what a check made after the repairs still finds
    checked: dict[str, int] = field(default_factory=dict)
    refused: str = ""  # why --repair did nothing at all

    @property
    def left(self) -> list[Problem]:
        return self.problems if self.remaining is None else self.remaining

    @property
    def clean(self) -> bool:
        return not self.left

    def as_dict(self) -> dict[str, object]:
        return {
            "problems": [problem.as_dict() for problem in self.problems],
            "repaired": self.repaired,
            "remaining": [problem.as_dict() for problem in self.left],
            "clean": self.clean,
            "checked": self.checked,
            "refused": self.refused or None,
        }


@dataclass(frozen=True)
class Qemu:
    pid: int
    vm_id: str
    vcpus: int
    memory_mib: int
    age: float
    layers: frozenset[str]  # ids of the layer files it holds open
    run_dir: str = ""  # the run folder its VM's folder (sockets, pid file) is in; empty when not told


def _arg(args: list[str], flag: str) -> str:
    at = args.index(flag) + 1 if flag in args else len(args)
    return args[at] if at < len(args) else ""


def _skip_vanished(function: Callable[..., Any], name: str, error: tuple[type[BaseException], BaseException, Any]) -> None:
    """For shutil.rmtree: an entry someone else removed meanwhile is no error."""
    if not isinstance(error[1], FileNotFoundError):
        raise error[1]


def _leading_int(value: str) -> int:
    found = re.match(r"\d+", value)
    return int(found.group()) if found else 0


def _cmdline(pid: int | str) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def run_dir_of(args: list[str], vm_id: str) -> str:
    """The run folder a QEMU started by an orchestrator uses: the one its VM's folder (its pid file) is in."""
    if pidfile := _arg(args, "-pidfile"):
        return str(Path(pidfile).parent.parent)
    for arg in args:
        if found := re.search(r"(/[^,=]*)/" + re.escape(vm_id) + "/", arg):
            return found.group(1)
    return ""


def vers_qemus(layers_dir: Path) -> list[tuple[Qemu, list[str]]]:
    """Every QEMU on this machine named as an orchestrator names them (`-name vers-<id>`), whatever run folder
    it uses, with its size, age, the layer files under `layers_dir` it holds open and its arguments."""
    layers_prefix = str(layers_dir) + "/"
    ticks = os.sysconf("SC_CLK_TCK")
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = _cmdline(proc.name)
            name = _arg(args, "-name")
            if not args[0].endswith("qemu-system-x86_64") or not name.startswith("vers-"):
                continue
            started = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        except (OSError, ValueError, IndexError):
            continue  # ended while being read
        opened = set()
        try:
            descriptors = list((proc / "fd").iterdir())
        except OSError:
            descriptors = []  # not ours to read: the process still counts, its files unknown
        for fd in descriptors:
            try:
                target = os.readlink(fd).removesuffix(" (deleted)")
            except OSError:
                continue
            if target.startswith(layers_prefix) and target.endswith(".qcow2"):
                opened.add(Path(target).stem)
        vm_id = name.removeprefix("vers-")
        vcpus, memory = _leading_int(_arg(args, "-smp")), _leading_int(_arg(args, "-m"))
        qemu = Qemu(int(proc.name), vm_id, vcpus, memory, uptime - started, frozenset(opened), run_dir_of(args, vm_id))
        found.append((qemu, args))
    return found


def qemu_processes(run_dir: Path, layers_dir: Path) -> tuple[list[Qemu], list[Qemu]]:
    """This platform's QEMU processes, told as the orchestrator tells them (`-name vers-<id>`, sockets under
    its run folder); and apart, those that use another run folder."""
    marker = str(run_dir) + "/"
    ours: list[Qemu] = []
    others: list[Qemu] = []
    for qemu, args in vers_qemus(layers_dir):
        (ours if any(marker in arg for arg in args) else others).append(qemu)
    return ours, others


def in_flight(operations: list[Row]) -> tuple[set[str], set[str], set[str]]:
    """The VMs, commits and layers operations in flight own."""
    vms: set[str] = set()
    commits: set[str] = set()
    layers: set[str] = set()
    for op in operations:
        vms.add(op["vm_id"])
        vms.update(json.loads(op.get("vm_ids") or "[]"))
        commits.update(filter(None, [op.get("commit_id")]))
        layers.update(filter(None, [op.get("old_layer_id"), op.get("new_layer_id")]))
    return vms, commits, layers


def sqlite_absence(path: Path, tables: Iterable[str]) -> str:
    """Why this SQLite file is not a service database with its tables; empty when it is. Read only: never
    creates the file (SQLite would, opened the ordinary way)."""
    if not path.is_file():
        return "there is no such file"
    try:
        connection = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        try:
            names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    except sqlite3.Error as error:
        return f"it cannot be read ({error})"
    return "" if names & set(tables) else "the file has none of its tables"


def _same_file(named: str, expected: str, folder: Path) -> bool:
    path = named if os.path.isabs(named) else str(folder / named)
    return os.path.normpath(path) == os.path.normpath(expected) or os.path.realpath(path) == os.path.realpath(expected)


def _epoch(value: object) -> float | None:
    """A stored time as seconds (SQLite hands DateTime columns read with plain SQL back as text)."""
    if value is None or value == "":
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return as_utc(moment).timestamp()


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _some(items: Iterable[str], shown: int = 3) -> str:
    names = sorted(set(items))
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"


def _unfinished(row: Row) -> bool:
    if any(row.get(column) is not None for column in FINISHED_COLUMNS):
        return False
    return not any(str(row.get(column, "")).lower() in FINISHED_STEPS for column in ("step", "state", "status"))


def _started(row: Row) -> float | None:
    for column in ("started_at", "created_at", "updated_at"):
        if row.get(column) is not None:
            return _epoch(row[column])
    return None


class Fsck:
    def __init__(self, settings: Settings, grace: float = GRACE_SECONDS) -> None:
        self.settings = settings
        self.grace = grace
        self.layout = Layout.of(settings)
        self.verifier = Verifier(self.layout)  # kept across looks: a file unchanged since it was hashed is not hashed again
        self.dbs: dict[str, Database | None] = {}
        self.urls: dict[str, str] = {}
        self.unopened: dict[str, str] = {}  # service: why its database was not opened (SQLite would create it)
        self.absent: dict[str, str] = {}  # service: why its database is not there, as of the last look
        self.existing: dict[str, set[str]] = {}  # service: its tables, as of the last look
        self.checked: dict[str, int] = {}
        for service, names in TABLES.items():
            url = settings.database_url(service)
            parsed = make_url(url)
            self.urls[service] = parsed.render_as_string(hide_password=True)
            sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
            if sqlite_file and (why := sqlite_absence(Path(str(parsed.database)), names)):
                self.unopened[service] = why  # opened the ordinary way, SQLite would create it
            self.dbs[service] = None
            if service not in self.unopened:
                try:
                    self.dbs[service] = Database(url)
                except (ImportError, SQLAlchemyError, ValueError) as error:  # a driver not installed, a URL not understood
                    self.unopened[service] = f"it cannot be opened ({type(error).__name__}: {error})"

    async def close(self) -> None:
        for db in self.dbs.values():
            if db is not None:
                await db.close()

    def is_young(self, path: Path, now: float | None = None) -> bool:
        try:
            return (now or time.time()) - path.stat().st_mtime < self.grace
        except OSError:
            return False

    # Database access

    async def read(self, service: str) -> dict[str, list[Row]]:
        """Every table of the service in one read transaction (one consistent view); a missing table is empty.
        A database that is not there, or has none of the service's tables, is noted in `absent`: read as
        empty, everything the service owns would look orphan."""
        tables: dict[str, list[Row]] = {name: [] for name in TABLES[service]}
        db = self.dbs[service]
        self.absent.pop(service, None)
        if db is None:
            self.absent[service] = self.unopened[service]
            return tables
        try:
            async with db.read() as session:
                connection = await session.connection()
                existing = set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
                for name in tables:
                    if name in existing:
                        tables[name] = [dict(row) for row in (await execute_sql(session, f'SELECT * FROM "{name}"')).mappings()]
        except (SQLAlchemyError, OSError) as error:
            self.absent[service] = f"it cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            return tables
        self.existing[service] = existing
        if not existing & set(TABLES[service]):
            self.absent[service] = "it has none of the service's tables"
        return tables

    async def rows(self, service: str, table: str, where: str = "", **params: object) -> list[Row]:
        """Rows read again when a repair acts (none when the table is not there)."""
        db = self.dbs[service]
        if db is None or table not in self.existing.get(service, set()):
            return []
        async with db.read() as session:
            return [dict(row) for row in (await execute_sql(session, f'SELECT * FROM "{table}" {where}', params)).mappings()]

    async def write(self, service: str, sql: str, **params: object) -> int:
        db = self.dbs[service]
        if db is None:
            raise Skipped(f"the {service} database does not exist")
        async with db.write() as session:
            return (await execute_sql(session, sql, params)).rowcount

    async def vm_row(self, vm_id: str) -> Row | None:
        db = self.dbs["orchestrator"]
        if db is None:
            raise Skipped("the orchestrator database does not exist")
        async with db.read() as session:
            row = (await execute_sql(session, "SELECT * FROM vms WHERE id = :id", {"id": vm_id})).mappings().first()
            return dict(row) if row is not None else None

    async def busy(self) -> tuple[set[str], set[str], set[str]]:
        """The VMs, commits and layers operations in flight own now."""
        return in_flight(await self.rows("orchestrator", "operations"))

    def running_anywhere(self, vm_id: str, pid: int = 0) -> Qemu | None:
        """A QEMU of the VM on this machine now, whatever run folder it uses (`pid`: the one its row names)."""
        for qemu, _ in vers_qemus(self.layout.layers):
            if qemu.vm_id == vm_id:
                return qemu
        if pid and process_is_vm(pid, vm_id):
            return Qemu(pid, vm_id, 0, 0, 0.0, frozenset())
        return None

    # What owns a file or folder found orphan, read again when its repair acts; empty: still nothing

    def young_row(self, row: Row) -> bool:
        moment = _epoch(row.get("created_at"))
        return moment is not None and time.time() - moment < self.grace

    async def layer_owner(self, layer_id: str) -> str:
        if await self.rows("orchestrator", "layers", "WHERE id = :id", id=layer_id):
            return f"a layer row names layer {layer_id} now"
        if layer_id in (await self.busy())[2]:
            return f"an operation in flight owns layer {layer_id}"
        if any(layer_id in qemu.layers for qemu, _ in vers_qemus(self.layout.layers)):
            return f"a QEMU holds layer {layer_id} open"
        return ""

    async def commit_owner(self, commit_id: str) -> str:
        if await self.rows("orchestrator", "commits", "WHERE id = :id AND deleted_at IS NULL", id=commit_id):
            return f"commit {commit_id} exists now"
        if await self.rows("orchestrator", "commit_deletions", "WHERE commit_id = :id", id=commit_id):
            return f"commit {commit_id} is being deleted"
        if commit_id in (await self.busy())[1]:
            return f"an operation in flight makes commit {commit_id}"
        return ""

    async def ram_copy_owner(self, commit_id: str) -> str:
        return f"commit {commit_id} is being made" if commit_id in (await self.busy())[1] else ""

    async def vm_owner(self, vm_id: str) -> tuple[Row | None, str]:
        """The VM's row now, and why what is named after it is not to be touched: a change in flight or just made."""
        vm = await self.vm_row(vm_id)
        if vm_id in (await self.busy())[0]:
            return vm, f"an operation in flight changes VM {vm_id}"
        if vm is not None and self.young_row(vm):
            return vm, f"VM {vm_id} was just made"
        return vm, ""

    async def sleep_owner(self, vm_id: str) -> str:
        vm, why = await self.vm_owner(vm_id)
        if why or vm is None or vm["deleted_at"] is not None:
            return why
        if vm["state"] == VmState.SLEEPING:
            return f"VM {vm_id} is sleeping on it"
        if vm["state"] in LIVE_STATES and self.running_anywhere(vm_id, vm["pid"] or 0) is None:
            return f"VM {vm_id} did not finish waking from it"
        return ""

    async def run_owner(self, vm_id: str) -> str:
        vm, why = await self.vm_owner(vm_id)
        if why:
            return why
        if vm is not None and vm["deleted_at"] is None and vm["state"] != VmState.DEAD:
            return f"VM {vm_id} is {vm['state']}"
        if (qemu := self.running_anywhere(vm_id)) is not None:
            return f"a QEMU of VM {vm_id} (process {qemu.pid}) still runs"
        return ""

    # Looking

    async def check(self) -> list[Problem]:
        first = await self._look()
        if not first:
            return []
        await asyncio.sleep(SECOND_LOOK_SECONDS)
        seen = {problem.key for problem in first}
        return [problem for problem in await self._look() if problem.key in seen]

    async def _look(self) -> list[Problem]:
        # tags before the commits they name: a commit made after the tags were read names nothing wrong
        tables: dict[str, list[Row]] = {}
        for service in TABLES:
            tables.update(await self.read(service))
        if missing := self.database_missing(tables):
            self.checked = {"databases": len(TABLES) - len(self.absent)}
            return [missing]  # every other finding would come from reading the wrong database
        survey = Survey(self, tables, *qemu_processes(self.layout.run, self.layout.layers))
        problems = survey.problems()
        self.checked = survey.checked
        return problems

    def database_missing(self, tables: dict[str, list[Row]]) -> Problem | None:
        """A database not there, or empty while the data folder holds what its rows would own: fsck is most
        likely not reading the platform's databases (a *_DATABASE_URL missing from this shell)."""
        reasons = {service: why for service, why in self.absent.items()}
        if not reasons and not (tables["layers"] or tables["vms"] or tables["commits"]):
            layer_files = sorted(self.layout.layers.glob("*.qcow2")) if self.layout.layers.is_dir() else []
            commit_folders = [path for path in Survey._entries(self.layout.commits) if path.is_dir()]
            if layer_files or commit_folders:
                reasons["orchestrator"] = (f"it has no layer, VM or commit row, yet {self.settings.data_dir.resolve()} holds "
                                           f"{len(layer_files)} layer files and {len(commit_folders)} commit folders")  # fmt: skip
        if not reasons:
            return None
        said = "; ".join(
            f"the {service} database fsck read, {self.urls[service]} ({ENV_NAMES[service]}, or {service}.db in VERS_DATA_DIR "
            f"when unset): {why}" for service, why in reasons.items()
        )  # fmt: skip
        return Problem(
            "database-missing", f"database {', '.join(reasons)}",
            f"{said}. VERS_DATA_DIR and the *_DATABASE_URL variables must be the platform's (as its services have them): "
            f"read against another database, every file and process of the platform would look orphan",
            refuses="fsck may not be reading the platform's databases; run it with the platform's VERS_DATA_DIR and *_DATABASE_URL",
        )  # fmt: skip

    # Repairing

    async def run(self, repair: bool) -> Report:
        report = Report(await self.check())
        report.checked = self.checked
        if not repair:
            return report
        if refusing := [p for p in report.problems if p.refuses]:
            report.refused = "; ".join(sorted({p.refuses for p in refusing}))
            report.repaired = [{"code": p.code, "object": p.object, "skipped": f"--repair refuses to act: {p.refuses}"} for p in refusing]
            return report
        pending, tried = report.problems, set()
        for _ in range(REPAIR_ROUNDS):
            todo = [p for p in pending if p.action is not None and p.key not in tried]
            if not todo or any(p.refuses for p in pending):  # what the repairs did may have shown fsck looks in the wrong place
                break
            for problem in sorted(todo, key=lambda p: REPAIR_ORDER.index(p.code) if p.code in REPAIR_ORDER else len(REPAIR_ORDER)):
                tried.add(problem.key)
                entry = {"code": problem.code, "object": problem.object}
                assert problem.action is not None
                try:
                    entry["action"] = await problem.action()
                except Skipped as reason:
                    entry["skipped"] = str(reason)
                except Exception as error:
                    entry["error"] = f"{type(error).__name__}: {error}"
                report.repaired.append(entry)
            pending = await self.check()
        report.remaining = pending
        report.checked = self.checked
        return report


class Survey:
    """One look at everything, and the problems in it."""

    def __init__(self, fsck: Fsck, tables: dict[str, list[Row]], processes: list[Qemu], elsewhere: Iterable[Qemu] = ()) -> None:
        self.fsck = fsck
        self.now = time.time()
        self.tables = tables
        self.orgs = {row["id"]: row["name"] for row in tables["orgs"]}
        self.repositories = {row["id"] for row in tables["repositories"]}
        self.layers = {row["id"]: row for row in tables["layers"]}
        self.vms = {row["id"]: row for row in tables["vms"]}
        # Of several hosts, the VMs whose files this host holds (writable layer, run and sleep folders): the checks
        # of files look at these; what the layers and commits are reachable from counts every host's.
        here = fsck.settings.host_name if fsck.settings.orchestrator_role == "host" else ""
        self.local_vms = {vm_id: row for vm_id, row in self.vms.items() if row.get("host_id", "") == here}
        self.commits = {row["id"]: row for row in tables["commits"]}
        self.deletions = {row["commit_id"]: row for row in tables["commit_deletions"]}
        self.tag_refused = {row["commit_id"] for row in tables["deleted_commits"]}
        self.processes = processes
        self.by_vm: dict[str, list[Qemu]] = defaultdict(list)
        for process in processes:
            self.by_vm[process.vm_id].append(process)
        # QEMU processes of the platform's VMs under another run folder than fsck's (a VERS_RUN_DIR not the platform's)
        self.elsewhere: dict[str, list[Qemu]] = defaultdict(list)
        for process in elsewhere:
            self.elsewhere[process.vm_id].append(process)
        self.away: dict[str, tuple[int, str] | None] = {}
        # a layer file any QEMU holds open is in use, whatever run folder the QEMU uses
        self.open_layers = set().union(
            *(process.layers for process in processes), *(p.layers for ps in self.elsewhere.values() for p in ps)
        )
        # What operations in flight own, whatever their age: an old one is reported, and left to the
        # orchestrator's start-up, which finishes or undoes it with what it owns.
        self.busy_vms, self.busy_commits, self.busy_layers = in_flight(tables["operations"])
        self.found: list[Problem] = []
        self.chains: dict[str, frozenset[tuple[str, str]]] = {}
        self.chain_users: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.chain_details: dict[tuple[str, str], str] = {}
        self.backing_files: set[str] = set()  # files the layers in use are backed by, rows or not
        self.checked: dict[str, int] = {}

    def add(self, code: str, obj: str, message: str, repair: str = "", action: Action | None = None, refuses: str = "") -> None:
        self.found.append(Problem(code, obj, message, repair, action, refuses))

    def problems(self) -> list[Problem]:
        self.check_tags()
        self.check_commits()
        self.check_run_dir()
        self.check_vms()
        self.check_processes()
        self.check_chains()
        self.check_files()
        self.check_garbage()
        self.check_quotas()
        self.check_in_flight()
        self.checked = {
            "tags": len(self.tables["repo_tags"]) + len(self.tables["commit_tags"]),
            "commits": sum(1 for c in self.commits.values() if c["deleted_at"] is None),
            "vms": sum(1 for vm in self.vms.values() if vm["deleted_at"] is None),
            "layers": len(self.layers),
            "processes": len(self.processes),
        }
        return self.found

    # Ages and states

    def young(self, value: object) -> bool:
        moment = _epoch(value)
        return moment is not None and self.now - moment < self.fsck.grace

    def org(self, org_id: str) -> str:
        return self.orgs.get(org_id, org_id)

    def settling(self, vm_id: str) -> bool:
        """A VM an operation in flight changes, or just made: its row, files and QEMU may disagree a moment."""
        vm = self.vms.get(vm_id)
        return vm_id in self.busy_vms or (vm is not None and self.young(vm["created_at"]))

    def commit_gone(self, commit_id: str) -> str:
        """Why a tag may not name this commit; empty when it may."""
        commit = self.commits.get(commit_id)
        if commit is None:
            return "does not exist"
        if commit["deleted_at"] is not None:
            return "was deleted"
        if commit_id in self.deletions:
            return "is being deleted"
        if commit_id in self.tag_refused:
            return "is recorded as deleted by the tagging service"
        return ""

    # Tags

    def check_tags(self) -> None:
        deleting_orgs = {s.get("org_id") for s in self.tables["sagas"] if _unfinished(s) and self.young(s.get("created_at"))}
        keep = "fsck never deletes a tag a user made: move it to a commit that exists, or delete it"
        for tag in self.tables["repo_tags"]:
            name = f"tag {self.org(tag['org_id'])}/{tag['repo_name']}:{tag['name']}"
            if tag["repo_id"] not in self.repositories:
                if tag["org_id"] not in deleting_orgs:
                    self.add("tag-orphan", name, f"its repository {tag['repo_name']} ({tag['repo_id']}) no longer exists, but the tag "
                             f"does: the repository's deletion did not finish; fsck never deletes a tag a user made")  # fmt: skip
            elif why := self.commit_gone(tag["commit_id"]):
                self.add("tag-dangling", name, f"points at commit {tag['commit_id']}, which {why}; {keep}")
        for tag in self.tables["commit_tags"]:
            if why := self.commit_gone(tag["commit_id"]):
                self.add("tag-dangling", f"legacy tag {self.org(tag['org_id'])}/{tag['name']}",
                         f"points at commit {tag['commit_id']}, which {why}; {keep}")  # fmt: skip

    # Commits

    def verify(self, commit: Row) -> str:
        """Why the commit's files cannot be trusted; empty when they can. With a shared commit store, its copies
        there are checked (every host copies from them; a host's own copy that differs is copied anew when used),
        or this host's when the store has none (a commit made before the store was set)."""
        layout = self.fsck.layout
        in_store = layout.store is not None and layout.store_commit_folder(commit["id"]).is_dir()
        folder = layout.store_commit_folder(commit["id"]) if in_store else layout.commit_folder(commit["id"])
        checksums = commit.get("checksums") or "{}"
        try:
            if "files" not in json.loads(checksums):  # recorded before commits had checksums
                return "" if (folder / "state").exists() else f"commit {commit['id']} is damaged: its state file is missing"
            self.fsck.verifier.verify(commit["id"], checksums, commit["layer_id"], in_store=in_store)
        except DataLoss as error:
            return error.message
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"commit {commit['id']} could not be checked: {error}"
        return ""

    def check_commits(self) -> None:
        live = [c for c in self.commits.values() if c["deleted_at"] is None and c["id"] not in self.deletions]
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:  # hashing releases the GIL
            verdicts = list(pool.map(self.verify, live))
        for commit, why in zip(live, verdicts, strict=True):
            if why:
                self.add("commit-damaged", f"commit {commit['id']}", f"{why} (organization {self.org(commit['org_id'])}): "
                         "restoring it fails; fsck never deletes a commit: put the file back from a backup, "
                         "or delete the commit")  # fmt: skip
            self.walk(commit["layer_id"], f"commit {commit['id']}")
        for commit_id in sorted(self.tag_refused):
            refused = self.commits.get(commit_id)
            if refused is not None and refused["deleted_at"] is None and commit_id not in self.deletions:
                self.add("commit-untaggable", f"commit {commit_id}", "the tagging service refuses tags to this commit (it recorded "
                         "its deletion), but the orchestrator keeps it as a live commit: a deletion was abandoned after the tagging "
                         "service agreed to it; delete the commit again to finish it")  # fmt: skip

    # VMs and their QEMU processes

    def runs_elsewhere(self, vm: Row) -> tuple[int, str] | None:
        """(pid, run folder) of a QEMU of this VM that runs, though not under fsck's run folder: the process its
        row names (`vers-<id>`), or one found by that name."""
        if vm["id"] not in self.away:
            found = None
            pid = vm.get("pid") or 0
            if pid and process_is_vm(pid, vm["id"]):
                try:
                    folder = run_dir_of(_cmdline(pid), vm["id"])
                except OSError:
                    folder = ""
                found = (pid, folder)
            elif self.elsewhere.get(vm["id"]):
                process = self.elsewhere[vm["id"]][0]
                found = (process.pid, process.run_dir)
            self.away[vm["id"]] = found
        return self.away[vm["id"]]

    def ours(self, folder: str) -> bool:
        """Whether a QEMU's run folder is the one fsck looks in."""
        return bool(folder) and os.path.realpath(folder) == os.path.realpath(self.fsck.layout.run)

    def check_run_dir(self) -> None:
        """Live VMs, none of them runs under fsck's run folder, and some run under another: VERS_RUN_DIR is not
        the platform's, and every VM would look gone."""
        live = [vm for vm in self.local_vms.values() if vm["deleted_at"] is None and vm["state"] in LIVE_STATES]
        if any(self.by_vm.get(vm["id"]) for vm in live):
            return
        away = {vm["id"]: found for vm in live if (found := self.runs_elsewhere(vm)) is not None and not self.ours(found[1])}
        if not away:
            return
        folders = {folder or "a folder its command line does not tell" for _, folder in away.values()}
        run = self.fsck.layout.run
        self.add("run-dir-mismatch", f"run folder {run}", f"no QEMU runs under {run}, the run folder fsck "
                 f"looks in (VERS_RUN_DIR), but the QEMU of {len(away)} live VM{'s' if len(away) != 1 else ''} ({_some(away)}) "
                 f"runs under {_some(folders)}: VERS_RUN_DIR must be the platform's",
                 refuses=f"fsck is not looking in the platform's run folder; run it with VERS_RUN_DIR={_some(folders)}")  # fmt: skip

    def check_vms(self) -> None:
        for vm in self.local_vms.values():
            if vm["deleted_at"] is None and vm["state"] == VmState.DEAD:
                # its disk is never opened again, but its rows are still walked by the garbage collection
                for layer_id in self.chain_ids(vm["layer_id"]):
                    if layer_id not in self.layers:
                        self.chain_users[("layer-row-missing", layer_id)].append(f"VM {vm['id']} (dead)")
            if vm["deleted_at"] is not None or vm["state"] == VmState.DEAD or self.settling(vm["id"]):
                continue
            self.walk(vm["layer_id"], f"VM {vm['id']}")
            name, saved = f"VM {vm['id']}", self.fsck.layout.sleep_folder(vm["id"]) / "state"
            mine = self.by_vm.get(vm["id"], [])
            if vm["state"] == VmState.SLEEPING:
                if not saved.exists():
                    self.add("sleep-state-missing", name, f"VM {vm['id']} (organization {self.org(vm['org_id'])}) is sleeping but its "
                             f"saved state {saved} is missing: it cannot wake; delete it")  # fmt: skip
                continue
            if vm["state"] not in LIVE_STATES:
                continue
            if not mine and (away := self.runs_elsewhere(vm)) is not None:
                pid, folder = away
                if not self.ours(folder):  # else a QEMU started since the processes were listed
                    self.add("run-dir-mismatch", name, f"VM {vm['id']} is {vm['state']} and its QEMU (process {pid}) runs, with its "
                             f"sockets under {folder or 'a folder its command line does not tell'}, not under {self.fsck.layout.run}, "
                             f"the run folder fsck looks in: VERS_RUN_DIR must be the platform's; fsck never marks a VM dead "
                             f"whose QEMU runs")  # fmt: skip
            elif not mine and saved.exists():
                self.add(
                    "vm-no-process",
                    name,
                    f"VM {vm['id']} is {vm['state']} in the database but no QEMU runs it; its saved state "
                    f"from a wake that did not finish is still there",
                    "put it back to sleep, its saved state kept",
                    self.set_state(vm, VmState.SLEEPING),
                )
            elif not mine:
                self.add(
                    "vm-no-process",
                    name,
                    f"VM {vm['id']} (organization {self.org(vm['org_id'])}) is {vm['state']} in the "
                    f"database, and counted in its quota, but no QEMU runs it: it is gone",
                    "mark it dead and remove its run folder",
                    self.set_state(vm, VmState.DEAD),
                )
            recorded = set(self.chain_ids(vm["layer_id"]))
            for process in mine:
                if unknown := process.layers - recorded:
                    self.add("vm-layer-unrecorded", name, f"its QEMU (process {process.pid}) writes to layer {_some(unknown)}, which the "
                             "database does not record in its disk chain: its next commits would capture a stale disk; the "
                             "orchestrator reconciles it with QEMU's block graph when it starts: restart the orchestrator")  # fmt: skip

    def check_processes(self) -> None:
        for process in self.processes:
            vm = self.vms.get(process.vm_id)
            if process.age < self.fsck.grace or self.settling(process.vm_id):
                continue
            if vm is None:
                why = "no VM row names it"
            elif vm["deleted_at"] is not None:
                why = "its VM was deleted"
            elif vm["state"] not in LIVE_STATES:
                why = f"its VM is {vm['state']}"
            elif len(self.by_vm[process.vm_id]) > 1 and vm["pid"] and process.pid != vm["pid"]:
                why = f"it is a second QEMU of that VM, whose row names process {vm['pid']}"
            else:
                continue
            self.add(
                "orphan-process",
                f"process {process.pid}",
                f"QEMU process {process.pid} of VM {process.vm_id} runs, but {why}: "
                "nothing manages it, it holds its disk and no quota counts it",
                "kill it",
                self.kill(process),
            )

    # Layers

    def chain_ids(self, layer_id: str) -> list[str]:
        chain: list[str] = []
        seen: set[str] = set()
        current: str | None = layer_id
        while current is not None and current not in seen:
            chain.append(current)
            seen.add(current)
            row = self.layers.get(current)
            current = row["parent_id"] if row is not None else None
        return chain

    def walk(self, layer_id: str, user: str) -> None:
        """Check the layer chain the user stands on, each layer once however many stand on it."""
        path: list[str] = []
        on_path: set[str] = set()
        current: str | None = layer_id
        while current is not None and current not in self.chains and current not in on_path:
            path.append(current)
            on_path.add(current)
            row = self.layers.get(current)
            current = row["parent_id"] if row is not None else None
        below = self.chains.get(current, frozenset()) if current is not None else frozenset()
        for layer in reversed(path):
            below = below | self.layer_problems(layer)
            self.chains[layer] = below
        for key in self.chains.get(layer_id, below):
            self.chain_users[key].append(user)

    def layer_problems(self, layer_id: str) -> frozenset[tuple[str, str]]:
        row = self.layers.get(layer_id)
        if row is None:
            return frozenset({("layer-row-missing", layer_id)})
        path = self.fsck.layout.layer_file(layer_id)
        if not path.exists() and self.fsck.layout.store is not None:
            path = self.fsck.layout.store_layer_file(layer_id)  # a frozen layer this host has no copy of
        if not path.exists():
            in_flight = layer_id in self.busy_layers or self.young(row["created_at"])
            return frozenset() if in_flight else frozenset({("layer-missing", layer_id)})
        found = set()
        parent, base = row["parent_id"], row.get("base_path") or ""
        expected = str(path.parent / f"{parent}.qcow2") if parent else base
        try:
            named = qcow2_backing(path)
        except (OSError, ValueError) as error:
            found.add(("layer-damaged", layer_id))
            self.chain_details[("layer-damaged", layer_id)] = str(error)
            named = expected
        if named and not named.startswith("json:"):
            self.backing_files.add(os.path.normpath(named if os.path.isabs(named) else path.parent / named))
        if expected and (named is None or not (named.startswith("json:") or _same_file(named, expected, path.parent))):
            found.add(("layer-backing-mismatch", layer_id))
            self.chain_details[("layer-backing-mismatch", layer_id)] = (
                f"its qcow2 header names {named or 'no backing file'}, its row {expected}"
            )
        if not parent and base and not Path(base).exists():
            found.add(("image-missing", base))
        return frozenset(found)

    def check_chains(self) -> None:
        for (code, obj), users in self.chain_users.items():
            on = f"{_some(users)} stand{'s' if len(set(users)) == 1 else ''} on it"
            detail = self.chain_details.get((code, obj), "")
            if code == "layer-row-missing":
                self.add(code, f"layer {obj}", f"no layer row {obj}, yet {on}: their disks cannot be opened, "
                         "and the orchestrator's garbage collection fails on it")  # fmt: skip
            elif code == "layer-missing":
                self.add(
                    code, f"layer {obj}", f"the layer file {self.fsck.layout.layer_file(obj)} is missing and {on}: they cannot run or be "
                    f"restored"
                )  # fmt: skip
            elif code == "image-missing":
                self.add(code, f"image {obj}", f"the image disk {obj} is missing and {on}: rebuild that image (make images)")
            elif code == "layer-damaged":
                self.add(code, f"layer {obj}", f"the layer file {self.fsck.layout.layer_file(obj)} cannot be read ({detail}) and {on}")
            else:
                self.add(code, f"layer {obj}", f"layer {obj} is backed by another file than its row says ({detail}), and {on}: "
                         f"their disks are not what was committed")  # fmt: skip

    def check_garbage(self) -> None:
        """Layers no VM or commit row stands on, by the orchestrator's own rule (rows of deleted VMs and
        commits stand on nothing; dead VMs not deleted still do)."""
        roots = [vm["layer_id"] for vm in self.vms.values() if vm["deleted_at"] is None]
        roots += [c["layer_id"] for c in self.commits.values() if c["deleted_at"] is None]
        reachable: set[str] = set()
        for root in roots:
            current = root
            while current is not None and current not in reachable:
                reachable.add(current)
                row = self.layers.get(current)
                current = row["parent_id"] if row is not None else None
        garbage = [
            layer_id for layer_id, row in self.layers.items()
            if layer_id not in reachable and layer_id not in self.busy_layers and layer_id not in self.open_layers
            and not self.young(row["created_at"])
        ]  # fmt: skip
        for layer_id in sorted(garbage, key=lambda layer_id: len(self.chain_ids(layer_id)), reverse=True):  # children first
            self.add("garbage-layer", f"layer {layer_id}", f"no VM or commit stands on layer {layer_id}, yet its row and file remain",
                     "remove its row and file", self.collect(layer_id))  # fmt: skip

    # Files and folders

    def check_files(self) -> None:
        now = self.now
        layout = self.fsck.layout
        layer_folders = [layout.layers, *([layout.store_layers] if layout.store is not None else [])]
        commit_folders = [layout.commits, *([layout.store_commits] if layout.store is not None else [])]
        for folder in layer_folders:
            for path in sorted(folder.glob("*.qcow2")) if folder.is_dir() else []:
                layer_id = path.stem
                if layer_id in self.layers or layer_id in self.busy_layers or layer_id in self.open_layers or self.fsck.is_young(path, now):
                    continue
                if str(path) in self.backing_files:
                    continue  # a layer in use is backed by it (its row says otherwise: layer-backing-mismatch)
                self.add("orphan-layer-file", str(path), "no layer row names this layer file", "remove it",
                         self.remove(path, partial(self.fsck.layer_owner, layer_id)))  # fmt: skip
        owned = {c["id"] for c in self.commits.values() if c["deleted_at"] is None} | set(self.deletions) | self.busy_commits
        for path in [entry for folder in commit_folders for entry in self._entries(folder)]:
            if path.name in owned or self.fsck.is_young(path, now) or PART in path.name:
                continue  # a copy to or from the commit store under way (the orchestrator removes stale ones)
            why = "no commit row names it" if path.name not in self.commits else f"commit {path.name} was deleted"
            self.add("orphan-commit-folder", str(path), f"a commit folder, but {why}", "remove it",
                     self.remove(path, partial(self.fsck.commit_owner, path.name)))  # fmt: skip
        for path in self._entries(self.fsck.layout.sleeping):
            vm = self.vms.get(path.name)
            if vm is not None and vm["deleted_at"] is None and vm["state"] == VmState.SLEEPING:
                continue
            if self.settling(path.name) or self.fsck.is_young(path, now):
                continue
            if vm is not None and vm["deleted_at"] is None and vm["state"] in LIVE_STATES and not self.by_vm.get(path.name):
                continue  # a wake that did not finish: the VM goes back to sleep on this saved state (vm-no-process)
            why = (
                "no VM row names it"
                if vm is None
                else "its VM was deleted"
                if vm["deleted_at"]
                else f"its VM is {vm['state']}, not sleeping"
            )
            self.add("orphan-sleep-folder", str(path), f"a sleeping VM's saved state, but {why}", "remove it",
                     self.remove(path, partial(self.fsck.sleep_owner, path.name)))  # fmt: skip
        for path in self._entries(self.fsck.layout.run):
            vm = self.vms.get(path.name)
            if vm is not None and vm["deleted_at"] is None and vm["state"] != VmState.DEAD:
                for copy in sorted(path.glob("ram-*")):
                    commit_id = copy.name.removeprefix("ram-")
                    if commit_id not in self.busy_commits and not self.fsck.is_young(copy, now):
                        self.add("orphan-ram-copy", str(copy), "the RAM copy of a commit that is not being made (an interrupted "
                                 "commit left it in tmpfs, where it takes memory)", "remove it",
                                 self.remove(copy, partial(self.fsck.ram_copy_owner, commit_id)))  # fmt: skip
                continue
            if self.settling(path.name) or self.fsck.is_young(path, now):
                continue
            why = "no VM row names it" if vm is None else "its VM was deleted" if vm["deleted_at"] else "its VM is dead"
            self.add("orphan-run-folder", str(path), f"a VM's run folder (sockets, RAM file in tmpfs), but {why}", "remove it",
                     self.remove(path, partial(self.fsck.run_owner, path.name)))  # fmt: skip

    @staticmethod
    def _entries(folder: Path) -> list[Path]:
        return sorted(folder.iterdir()) if folder.is_dir() else []

    # Quotas

    def check_quotas(self) -> None:
        """Per organization, what its rows count against its limits is what its QEMU processes use."""
        counted: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        running: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        notes: dict[str, list[str]] = defaultdict(list)
        fixable: dict[str, bool] = defaultdict(lambda: True)
        for vm in self.vms.values():
            if vm["deleted_at"] is None and vm["state"] in LIVE_STATES and not self.settling(vm["id"]):
                if not self.by_vm.get(vm["id"]) and self.runs_elsewhere(vm) is not None:
                    continue  # it runs, under another run folder (run-dir-mismatch): counted as it uses, as far as fsck knows
                counted[vm["org_id"]][0] += vm["vcpu_count"]
                counted[vm["org_id"]][1] += vm["mem_size_mib"]
                if not self.by_vm.get(vm["id"]):
                    notes[vm["org_id"]].append(f"VM {vm['id']} is counted but does not run")
        for process in self.processes:
            owner = self.vms.get(process.vm_id)
            if owner is None or self.settling(owner["id"]):
                continue
            org = owner["org_id"]
            if owner["deleted_at"] is not None or owner["state"] not in LIVE_STATES:
                if process.age < self.fsck.grace:
                    continue
                notes[org].append(f"VM {owner['id']} runs but is not counted ({'deleted' if owner['deleted_at'] else owner['state']})")
            elif (process.vcpus, process.memory_mib) != (owner["vcpu_count"], owner["mem_size_mib"]):
                notes[org].append(f"VM {owner['id']} is counted as {owner['vcpu_count']} vCPUs and {owner['mem_size_mib']} MiB "
                                  f"but runs with {process.vcpus} and {process.memory_mib} MiB")  # fmt: skip
                fixable[org] = False
            running[org][0] += process.vcpus
            running[org][1] += process.memory_mib
        for org in sorted(set(counted) | set(running)):
            if counted[org] != running[org]:
                (cv, cm), (rv, rm) = counted[org], running[org]
                self.add(
                    "quota-mismatch",
                    f"organization {self.org(org)}",
                    f"its rows count {cv} vCPUs and {cm} MiB against its "
                    f"limits, but its QEMU processes use {rv} vCPUs and {rm} MiB: {'; '.join(notes[org])}",
                    "settled by the repairs of the VMs named" if fixable[org] else "",
                )

    # Changes that did not finish

    def check_in_flight(self) -> None:
        restart = "the orchestrator finishes or undoes it when it starts: restart it, unless it is still at work on it"
        for op in self.tables["operations"]:
            if (age := self._age(op)) is not None:
                self.add("operation-unfinished", f"operation {op['id']}", f"the {op['kind']} of VM {op['vm_id']} began {_ago(age)} ago "
                         f"and has not finished; {restart}")  # fmt: skip
        for row in self.tables["commit_deletions"]:
            if (age := self._age(row)) is not None:
                self.add("commit-deletion-unfinished", f"commit {row['commit_id']}", f"its deletion began {_ago(age)} ago and has not "
                         f"finished (it cannot be restored or tagged meanwhile); the orchestrator finishes it when it starts (or keeps "
                         f"the commit if a tag names it): restart it, unless it is still at work on it")  # fmt: skip
        sagas = {saga["id"] for saga in self.tables["sagas"]}
        for row in self.tables["fork_requests"]:
            name = row.get("saga_id") or row.get("id") or json.dumps(row, default=str)
            if _unfinished(row) and (age := self._age(row)) is not None:
                settles = "its saga is settled when the registry starts" if name in sagas else "and no saga remains to finish or undo it"
                self.add("fork-unfinished", f"fork {name}", f"a fork began {_ago(age)} ago and has not finished, {settles}")
            elif row.get("state") == "abandoned" and name not in sagas and not self.young(row.get("created_at")):
                vm, commit = self.vms.get(row.get("vm_id") or ""), self.commits.get(row.get("commit_id") or "")
                left = []
                if vm is not None and vm["deleted_at"] is None:
                    left.append(f"VM {vm['id']}")
                if commit is not None and commit["deleted_at"] is None:
                    left.append(f"commit {commit['id']}")
                if left:
                    self.add("fork-leftover", f"fork {name}", f"the fork was undone, but what it made remains: {' and '.join(left)} "
                             f"of organization {self.org(row.get('org_id', ''))}, charged to its quota; delete them")  # fmt: skip
        for saga in self.tables["sagas"]:
            if _unfinished(saga) and (age := self._age(saga)) is not None:
                self.add("saga-unfinished", f"saga {saga['id']}", f"the {saga.get('kind', '')} of organization "
                         f"{self.org(saga.get('org_id', ''))} stopped at step {saga.get('step', '?')} {_ago(age)} ago: the "
                         f"registry finishes or undoes it when it starts; restart it if it is running")  # fmt: skip

    def _age(self, row: Row) -> float | None:
        """How long ago an unfinished change began, if longer than the grace period."""
        started = _started(row)
        if started is None or self.now - started < self.fsck.grace:
            return None
        return self.now - started

    # Repairs: each looks again at what it acts on, at the moment it acts

    def remove(self, path: Path, owner: Callable[[], Awaitable[str]]) -> Action:
        """Remove a file or folder nothing owned when it was checked, if nothing owns it now either."""

        async def act() -> str:
            if not path.exists() and not path.is_symlink():
                raise Skipped(f"{path} is already gone")
            if self.fsck.is_young(path):
                raise Skipped(f"{path} changed since it was checked")
            if why := await owner():
                raise Skipped(why)
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, onerror=_skip_vanished)  # its owner may be removing it too
                else:
                    path.unlink()
            except FileNotFoundError:
                if path.exists() or path.is_symlink():
                    raise
                raise Skipped(f"{path} is already gone") from None  # removed meanwhile by whoever owned it last
            return f"removed {path}"

        return act

    def kill(self, process: Qemu) -> Action:
        async def act() -> str:
            vm, why = await self.fsck.vm_owner(process.vm_id)
            if why:
                raise Skipped(why)
            if vm is not None and vm["deleted_at"] is None and vm["state"] in LIVE_STATES and vm["pid"] in (0, process.pid):
                raise Skipped(f"VM {process.vm_id} is {vm['state']} again")
            ours, _ = qemu_processes(self.fsck.layout.run, self.fsck.layout.layers)
            if not any(qemu.pid == process.pid and qemu.vm_id == process.vm_id for qemu in ours):
                raise Skipped(f"QEMU process {process.pid} of VM {process.vm_id} is gone")
            kill_process(process.pid, process.vm_id)
            deadline = time.monotonic() + 10
            while process_is_vm(process.pid, process.vm_id) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return f"killed QEMU process {process.pid} of VM {process.vm_id}"

        return act

    def set_state(self, vm: Row, state: str) -> Action:
        """Make the row of a VM whose QEMU is gone say so: only if, looked at again, its row is unchanged, no
        change is in flight on it, and no QEMU of it runs on this machine under any run folder."""

        async def act() -> str:
            row, why = await self.fsck.vm_owner(vm["id"])
            if why:
                raise Skipped(why)
            if row is None or row["deleted_at"] is not None or row["state"] != vm["state"]:
                raise Skipped(f"VM {vm['id']} changed since it was checked")
            if (qemu := self.fsck.running_anywhere(vm["id"], row["pid"] or 0)) is not None:
                raise Skipped(f"a QEMU of VM {vm['id']} runs (process {qemu.pid})")
            if state == VmState.SLEEPING and not (self.fsck.layout.sleep_folder(vm["id"]) / "state").exists():
                raise Skipped(f"the saved state of VM {vm['id']} is gone")
            changed = await self.fsck.write(
                "orchestrator",
                "UPDATE vms SET state = :state, pid = 0 WHERE id = :id AND state = :seen AND pid = :pid AND deleted_at IS NULL",
                state=state, id=vm["id"], seen=row["state"], pid=row["pid"],
            )  # fmt: skip
            if not changed:
                raise Skipped(f"VM {vm['id']} changed since it was checked")
            run = self.fsck.layout.run_folder(vm["id"])
            if state == VmState.DEAD:
                shutil.rmtree(run, ignore_errors=True)
                return f"marked VM {vm['id']} dead (was {vm['state']}) and removed its run folder"
            (run / "ram").unlink(missing_ok=True)
            return f"put VM {vm['id']} back to sleep (was {vm['state']}); it wakes from its saved state"

        return act

    def collect(self, layer_id: str) -> Action:
        async def act() -> str:
            db = self.fsck.dbs["orchestrator"]
            if db is None:
                raise Skipped("the orchestrator database does not exist")
            if layer_id in (await self.fsck.busy())[2]:
                raise Skipped(f"an operation in flight owns layer {layer_id}")
            if any(layer_id in qemu.layers for qemu, _ in vers_qemus(self.fsck.layout.layers)):
                raise Skipped(f"a QEMU holds layer {layer_id} open")
            async with db.write() as session:  # reachability again, inside the transaction that deletes
                layers = {row[0]: row[1] for row in await execute_sql(session, "SELECT id, parent_id FROM layers")}
                live = "SELECT layer_id FROM vms WHERE deleted_at IS NULL UNION SELECT layer_id FROM commits WHERE deleted_at IS NULL"
                roots = [row[0] for row in await execute_sql(session, live)]
                for root in roots:
                    current, seen = root, set()
                    while current is not None and current not in seen:
                        if current == layer_id:
                            raise Skipped(f"layer {layer_id} is in use again")
                        seen.add(current)
                        current = layers.get(current)
                if layer_id in layers.values():
                    raise Skipped(f"layer {layer_id} still has a child layer")
                await execute_sql(session, "DELETE FROM layers WHERE id = :id", {"id": layer_id})
            self.fsck.layout.layer_file(layer_id).unlink(missing_ok=True)
            if self.fsck.layout.store is not None:
                self.fsck.layout.store_layer_file(layer_id).unlink(missing_ok=True)
            return f"removed garbage layer {layer_id} (row and file)"

        return act


async def fsck(settings: Settings, repair: bool = False, grace: float = GRACE_SECONDS) -> Report:
    checker = Fsck(settings, grace)
    try:
        return await checker.run(repair)
    finally:
        await checker.close()
