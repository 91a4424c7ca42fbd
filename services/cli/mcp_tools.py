"""The tools `vers mcp serve` gives a coding agent: run, branch, commit, exec, copy, status, kill and tag,
each a call (or a few) to the platform's REST API with the CLI's credentials, answered as structured
results. A refusal of the API comes back to the agent as a tool error carrying the API's message, never
as a crashed server."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from services.cli import copy as copying
from services.cli.config import ConfigError, LocalState, check_alias
from services.client import ApiClient, ApiError, Unreachable, seg
from services.common.ids import is_uuid

INSTRUCTIONS = """\
Vers runs your work environment as a VM that can be committed (disk, memory and running processes, all of it)
and branched copy-on-write in seconds. Use it to make risky steps reversible:

1. Before a risky step (a migration, a dependency upgrade, a large refactor, `rm -rf`, an experiment), `commit`
   the VM you work in: you get a commit_id.
2. Do the step with `exec` in that VM. To keep the original untouched, `branch` the commit and try the step
   in the new VM instead.
3. If it went wrong, roll back: `branch` from the commit_id gives a VM exactly as it was at the commit
   (files and processes), continue there, and `kill` the broken VM. If it went right, go on; `tag` with
   REPO:TAG names the commit as a known-good state, which `branch` takes as a source too.

VMs are named by ID, by an alias (given to `run` or `branch`, or by `vers run --vm-alias` on this machine),
or by the first characters of an ID; `status` lists them with their state. `exec` runs without a terminal:
give input with `stdin`; a non-zero exit code is a result, not an error. `copy` moves files and folders
between this machine (where the server runs) and a VM, written VM:PATH. A call the platform refuses comes
back as an error whose message says what to fix.
"""

VmName = Annotated[str, Field(description="The VM: its ID, an alias, or the first characters (at least 4) of its ID.")]
AliasName = Annotated[
    str | None, Field(description="A local name for the new VM (letters, digits, `.`, `_`, `-`), usable wherever a VM is asked for.")
]


class VmRef(BaseModel):
    vm_id: str = Field(description="The VM's ID.")
    alias: str | None = Field(None, description="Its local alias, if it has one.")


class RunResult(VmRef):
    state: str = Field(description="Its state: running once `run` answers.")


class BranchResult(BaseModel):
    source: str = Field(description="What was branched: a VM ID, a commit ID or REPO:TAG.")
    vms: list[VmRef] = Field(description="The new VMs, running.")


class CommitResult(BaseModel):
    vm_id: str = Field(description="The VM committed; it goes on running.")
    commit_id: str = Field(description="The new commit: `branch` from it to get a VM exactly as the VM is now.")


class ExecResult(BaseModel):
    exit_code: int = Field(description="The command's exit code.")
    stdout: str
    stderr: str
    stdout_truncated: bool = Field(False, description="The command wrote more than the platform keeps: stdout is its beginning.")
    stderr_truncated: bool = Field(False, description="The same for stderr.")


class VmInfo(BaseModel):
    vm_id: str
    alias: str | None = None
    state: str = Field(description="booting, running, paused, sleeping or dead.")
    created_at: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    # Filled in when one VM is asked for.
    ip: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    disk_mib: int | None = None
    network: str | None = None
    parent_commit_id: str | None = Field(None, description="The commit the VM was started or branched from.")


class StatusResult(BaseModel):
    vms: list[VmInfo]


class KillResult(BaseModel):
    vm_id: str
    killed: bool


class TagResult(BaseModel):
    reference: str = Field(description="REPO:TAG.")
    commit_id: str = Field(description="The commit the tag names now.")
    previous_commit_id: str | None = Field(None, description="The commit it named before it moved; none for a new tag.")
    created: bool = Field(description="True when the tag is new, false when it moved.")


class CopyResult(BaseModel):
    direction: Literal["to_vm", "from_vm"]
    vm_id: str
    local: str = Field(description="The path on this machine.")
    remote: str = Field(description="The path in the VM.")


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """The API's refusal, or why it cannot be reached, as the tool's error: the agent reads the message."""
    try:
        yield
    except ApiError as error:
        raise ToolError(f"{error.message} (HTTP {error.status})") from None
    except (Unreachable, ConfigError) as error:
        raise ToolError(str(error)) from None


class Platform:
    """The REST API with the CLI's credentials, and its VM aliases; every failure a ToolError."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.url = client.base_url

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        with tool_errors():
            return self.client.request(method, path, **kwargs)

    def list_vms(self) -> list[dict[str, Any]]:
        with tool_errors():
            return self.client.list_all("/api/v1/vm")

    def state(self) -> LocalState:
        # Read anew each time: `vers run --vm-alias` in a terminal meanwhile names VMs for the agent too.
        with tool_errors():
            return LocalState(self.url)

    def vm(self, given: str) -> str:
        """A VM's ID from an alias, an ID, or the start of an ID."""
        given = given.strip()
        if not given:
            raise ToolError("no VM given: pass a VM ID or alias (the status tool lists them)")
        aliases = self.state().aliases
        if given in aliases:
            return aliases[given]
        if is_uuid(given):
            return given
        prefix = given.rstrip("…").rstrip(".")
        if len(prefix) < 4:
            raise ToolError(f"no VM {given!r}: not an alias here, and an ID prefix needs at least 4 characters")
        matches = [vm["vm_id"] for vm in self.list_vms() if vm["vm_id"].startswith(prefix)]
        if len(matches) > 1:
            raise ToolError(f"{given!r} matches {len(matches)} VMs: give more of the ID")
        if not matches:
            raise ToolError(
                f"no VM {given!r}: not an alias here, nor the start of a VM ID in your organization (the status tool lists them)"
            )
        return matches[0]

    def name(self, vm_id: str, alias: str | None) -> str | None:
        """Record `alias` for the VM; answers the alias it goes by."""
        state = self.state()
        if alias:
            with tool_errors():
                state.remember(vm_id, check_alias(alias))
            return alias
        return state.alias_of(vm_id) or None


def build_server(client: ApiClient) -> MCPServer:
    """An MCP server whose tools act on the platform `client` reaches, as the organization of its key."""
    platform = Platform(client)
    server: MCPServer = MCPServer("vers", title="Vers VMs", instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool(
        name="run",
        description="Boot a new VM from an image and wait until it answers. Start here when there is no VM yet; "
        "to copy an existing environment use `branch` instead. Answers the VM's ID.",
        annotations=ToolAnnotations(title="Run a new VM", read_only_hint=False, destructive_hint=False, idempotent_hint=False),
    )
    def run(
        memory_mib: Annotated[int | None, Field(ge=1, description="Memory in MiB (the platform's default when not given).")] = None,
        vcpus: Annotated[int | None, Field(ge=1, description="Virtual CPUs.")] = None,
        disk_mib: Annotated[int | None, Field(ge=1, description="Root filesystem size in MiB.")] = None,
        image: Annotated[str | None, Field(description="The image to boot (the platform's default when not given).")] = None,
        network: Annotated[
            Literal["nat", "none"] | None,
            Field(description="nat (the default): outbound access through NAT; none: no packet leaves the VM."),
        ] = None,
        alias: AliasName = None,
    ) -> RunResult:
        if alias:
            _check_alias(alias)
        wanted = {"mem_size_mib": memory_mib, "vcpu_count": vcpus, "fs_size_mib": disk_mib, "image_name": image, "network": network}
        vm_config = {key: value for key, value in wanted.items() if value is not None}
        vm_id = platform.call("POST", "/api/v1/vm/new_root", params={"wait_boot": "true"}, json={"vm_config": vm_config})["vm_id"]
        return RunResult(vm_id=vm_id, alias=platform.name(vm_id, alias), state="running")

    @server.tool(
        name="branch",
        description="New VMs copied copy-on-write from a source, each running: from a VM (snapshotted first, it goes "
        "on running), from a commit ID (the VM exactly as it was when committed: this is how to roll back), or "
        "from REPO:TAG. Use it to try a risky step in a copy, or to get back to a commit after a step went wrong.",
        annotations=ToolAnnotations(title="Branch a VM or commit", read_only_hint=False, destructive_hint=False, idempotent_hint=False),
    )
    def branch(
        source: Annotated[str, Field(description="A VM (ID, alias or ID prefix), a commit ID, or REPO:TAG of your repositories.")],
        count: Annotated[int, Field(ge=1, description="How many VMs.")] = 1,
        alias: AliasName = None,
    ) -> BranchResult:
        if alias and count > 1:
            raise ToolError("alias names one VM: drop it or branch with count 1")
        if alias:
            _check_alias(alias)
        if ":" in source:
            repo, _, tag = source.partition(":")
            if "/" in repo:
                raise ToolError(f"{source!r} belongs to another organization: only your repositories' tags branch here")
            answer = platform.call("POST", f"/api/v1/vm/branch/by_ref/{seg(repo)}/{seg(tag)}", json={"count": count})
            source_id = source
        else:
            source_id = platform.vm(source)  # an ID passes as it is, so a commit ID works too
            answer = platform.call("POST", f"/api/v1/vm/{seg(source_id)}/branch", params={"count": count})
        vms = [VmRef(vm_id=vm["vm_id"], alias=platform.name(vm["vm_id"], alias)) for vm in answer["vms"]]
        return BranchResult(source=source_id, vms=vms)

    @server.tool(
        name="commit",
        description="Save a VM whole (disk, memory, running processes) as an immutable commit, and answer its ID. "
        "Do this before a risky step: `branch` from the commit later gets back to exactly this state. The VM "
        "pauses for the snapshot and then goes on running.",
        annotations=ToolAnnotations(title="Commit a VM", read_only_hint=False, destructive_hint=False, idempotent_hint=False),
    )
    def commit(
        vm: VmName,
        name: Annotated[str, Field(description="A short name for the commit, e.g. what is about to be tried.")] = "",
        description: Annotated[str, Field(description="What the commit holds.")] = "",
    ) -> CommitResult:
        vm_id = platform.vm(vm)
        answer = platform.call("POST", f"/api/v1/vm/{seg(vm_id)}/commit", json={"name": name, "description": description})
        return CommitResult(vm_id=vm_id, commit_id=answer["commit_id"])

    @server.tool(
        name="exec",
        description="Run a command in a VM and wait for it; answers its exit code, stdout and stderr. A string runs as "
        "a shell line (`sh -c`: pipes, &&, redirections work); a list runs as it is, without a shell. No terminal: "
        "pass input with stdin. A non-zero exit code is a result, not an error.",
        annotations=ToolAnnotations(title="Run a command in a VM", read_only_hint=False, destructive_hint=True, idempotent_hint=False),
    )
    def exec_(
        vm: VmName,
        command: Annotated[
            list[str] | str,
            Field(description='A shell line, e.g. "cd /srv/app && make test", or an argument list, e.g. ["ls", "-la", "/srv"].'),
        ],
        stdin: Annotated[str, Field(description="Text given to the command's standard input.")] = "",
        timeout_secs: Annotated[int, Field(ge=0, description="Kill the command after this many seconds; 0: the platform's default.")] = 0,
        working_dir: Annotated[str, Field(description="Directory to run in (default: the guest's home).")] = "",
        env: Annotated[dict[str, str] | None, Field(description="Extra environment variables.")] = None,
    ) -> ExecResult:
        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        if not argv or (isinstance(command, str) and not command.strip()):
            raise ToolError("no command: give a shell line or a non-empty argument list")
        vm_id = platform.vm(vm)
        body = {"command": argv, "stdin": stdin, "timeout_secs": timeout_secs, "working_dir": working_dir, "env": env or {}}
        # No client-side timeout: the platform bounds every exec (VERS_EXEC_MAX_TIMEOUT_SECONDS).
        answer = platform.call("POST", f"/api/v1/vm/{seg(vm_id)}/exec", json=body, timeout=None)
        return ExecResult(
            exit_code=int(answer.get("exit_code") or 0),
            stdout=answer.get("stdout") or "",
            stderr=answer.get("stderr") or "",
            stdout_truncated=bool(answer.get("stdout_truncated")),
            stderr_truncated=bool(answer.get("stderr_truncated")),
        )

    @server.tool(
        name="copy",
        description="Copy a file or a folder (recursively, modes kept) between this machine (where this server runs) "
        "and a VM, either way. Write the VM's side as VM:/absolute/path (e.g. dev:/srv/app) and this machine's as a "
        "plain path: source ./src, destination dev:/srv/app uploads; source dev:/var/log/app.log, destination ./logs "
        "downloads. As with scp -r, a destination folder that exists receives the source under its own name; any "
        "other destination is the copy's new name.",
        annotations=ToolAnnotations(title="Copy files to or from a VM", read_only_hint=False, destructive_hint=True, idempotent_hint=True),
    )
    def copy(
        source: Annotated[str, Field(description="What to copy: a local path, or VM:PATH.")],
        destination: Annotated[str, Field(description="Where to: VM:PATH when source is local, a local path when source is VM:PATH.")],
    ) -> CopyResult:
        source_vm, source_path = _split_remote(source)
        destination_vm, destination_path = _split_remote(destination)
        if (source_vm is None) == (destination_vm is None):
            raise ToolError("exactly one side is a VM: write it VM:PATH (e.g. dev:/srv/app), the other a local path")
        if source_vm is not None:
            vm_id = platform.vm(source_vm)
            local = Path(destination_path).expanduser()
            _transfer(lambda: copying.download(platform.client, vm_id, source_path, local))
            return CopyResult(direction="from_vm", vm_id=vm_id, local=str(local), remote=source_path)
        assert destination_vm is not None
        vm_id = platform.vm(destination_vm)
        local = Path(source_path).expanduser()
        _transfer(lambda: copying.upload(platform.client, vm_id, local, destination_path))
        return CopyResult(direction="to_vm", vm_id=vm_id, local=str(local), remote=destination_path)

    @server.tool(
        name="status",
        description="One VM in detail (state, IP, memory, vCPUs, disk, the commit it came from), or with no VM every "
        "VM of your organization with its state and alias. State is booting, running, paused, sleeping or dead.",
        annotations=ToolAnnotations(title="VM status", read_only_hint=True, destructive_hint=False, idempotent_hint=True),
    )
    def status(
        vm: Annotated[str | None, Field(description="A VM (ID, alias or ID prefix); leave out for all of them.")] = None,
    ) -> StatusResult:
        state = platform.state()
        if vm:
            vm_id = platform.vm(vm)
            meta = platform.call("GET", f"/api/v1/vm/{seg(vm_id)}/metadata")
            return StatusResult(
                vms=[
                    VmInfo(
                        vm_id=meta["vm_id"],
                        alias=state.alias_of(vm_id) or None,
                        state=meta.get("state", ""),
                        created_at=meta.get("created_at"),
                        labels=meta.get("labels") or {},
                        ip=meta.get("ip") or None,
                        memory_mib=meta.get("mem_size_mib"),
                        vcpus=meta.get("vcpu_count"),
                        disk_mib=meta.get("fs_size_mib"),
                        network=meta.get("network") or None,
                        parent_commit_id=meta.get("parent_commit_id") or None,
                    )
                ]
            )
        return StatusResult(
            vms=[
                VmInfo(
                    vm_id=found["vm_id"],
                    alias=state.alias_of(found["vm_id"]) or None,
                    state=found.get("state", ""),
                    created_at=found.get("created_at"),
                    labels=found.get("labels") or {},
                )
                for found in platform.list_vms()
            ]
        )

    @server.tool(
        name="kill",
        description="Stop a VM and delete it; its commits stay (branch from them to get it back as committed). "
        "Use it on a VM a step broke, once you have branched a good one from a commit.",
        annotations=ToolAnnotations(title="Delete a VM", read_only_hint=False, destructive_hint=True, idempotent_hint=True),
    )
    def kill(vm: VmName) -> KillResult:
        vm_id = platform.vm(vm)
        platform.call("DELETE", f"/api/v1/vm/{seg(vm_id)}")
        platform.state().forget(vm_id)
        return KillResult(vm_id=vm_id, killed=True)

    @server.tool(
        name="tag",
        description="Point REPO:TAG at a commit: creates the tag, or moves it when it exists (answering where it "
        "pointed before). Names a known-good state, e.g. my-app:last-green; `branch` takes REPO:TAG as a source.",
        annotations=ToolAnnotations(title="Tag a commit", read_only_hint=False, destructive_hint=False, idempotent_hint=True),
    )
    def tag(
        reference: Annotated[str, Field(description="REPO:TAG in your organization, e.g. my-app:latest.")],
        commit_id: Annotated[str, Field(description="The commit the tag should name.")],
        description: Annotated[str | None, Field(description="What the tag marks (kept as it is when not given).")] = None,
        create_repository: Annotated[bool, Field(description="Create the repository (private) when it does not exist yet.")] = False,
    ) -> TagResult:
        repo, colon, tag_name = reference.partition(":")
        if not colon or not repo or not tag_name:
            raise ToolError(f"{reference!r} is not REPO:TAG (e.g. my-app:latest)")
        if "/" in repo:
            raise ToolError(f"{reference!r} names another organization's repository: tag in your own (REPO:TAG)")
        repo_path = f"/api/v1/repositories/{seg(repo)}"
        if create_repository:
            _ensure_repository(platform, repo)
        before = _tag_or_none(platform, f"{repo_path}/tags/{seg(tag_name)}")
        if before is None:
            body = {"tag_name": tag_name, "commit_id": commit_id, "description": description or ""}
            created = platform.call("POST", f"{repo_path}/tags", json=body)
            return TagResult(reference=created.get("reference") or reference, commit_id=created["commit_id"], created=True)
        changes = {"commit_id": commit_id, **({"description": description} if description is not None else {})}
        after = platform.call("PATCH", f"{repo_path}/tags/{seg(tag_name)}", json=changes)
        return TagResult(
            reference=after.get("reference") or reference,
            commit_id=after["commit_id"],
            previous_commit_id=before["commit_id"],
            created=False,
        )

    return server


def _check_alias(alias: str) -> None:
    with tool_errors():
        check_alias(alias)


def _split_remote(path: str) -> tuple[str | None, str]:
    """VM:PATH as (VM, PATH); a local path (no colon before the first slash) as (None, path)."""
    head, colon, tail = path.partition(":")
    if colon and head and "/" not in head:
        return head, tail
    return None, path


def _transfer(action: Callable[[], object]) -> None:
    try:
        with tool_errors():
            action()
    except copying.CopyError as error:
        raise ToolError(str(error)) from None
    except OSError as error:  # a local file that cannot be read or written
        raise ToolError(f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")) from None


def _tag_or_none(platform: Platform, path: str) -> dict[str, Any] | None:
    with tool_errors():
        try:
            return platform.client.request("GET", path)
        except ApiError as error:
            if error.status != 404:
                raise
    return None


def _ensure_repository(platform: Platform, repo: str) -> None:
    with tool_errors():
        try:
            platform.client.request("GET", f"/api/v1/repositories/{seg(repo)}")
            return
        except ApiError as error:
            if error.status != 404:
                raise
        try:
            platform.client.request("POST", "/api/v1/repositories", json={"name": repo, "description": ""})
        except ApiError as error:
            if error.status != 409:  # made meanwhile by someone else: as good
                raise
