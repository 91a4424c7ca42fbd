"""The `vers` command line: VMs, commits, repositories and tags over the REST gateway."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from click_default_group import DefaultGroup

from services.cli import commits, config, copy, deploy, envvars, governance, mcp, ssh, streams, vmadmin
from services.cli.config import ConfigError, LocalState, check_alias, is_uuid
from services.cli.console import open_console
from services.cli.output import Output, each, progress, vers_command, when
from services.cli.refs import parse_public_ref, split_org
from services.cli.ssh import HostBlock, host_block, save_key, write_config
from services.cli.tunnel import open_stdio, run_stdio, serve
from services.client import ApiClient, ApiError, seg


class Context:
    """What a command needs, made on first use so `--help` and usage errors never touch the network."""

    def __init__(self) -> None:
        self._client: ApiClient | None = None
        self._state: LocalState | None = None

    @functools.cached_property
    def credentials(self) -> config.Credentials:
        return config.credentials()

    @property
    def client(self) -> ApiClient:
        if self._client is None:
            found = self.credentials
            if not found.api_key:
                raise click.ClickException("no API key: run `vers login`, or set VERS_API_KEY")
            self._client = ApiClient(found.url, found.api_key)
        return self._client

    @property
    def state(self) -> LocalState:
        if self._state is None:
            self._state = LocalState(self.credentials.url)
        return self._state

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.request(method, path, **kwargs)

    def list_all(self, path: str, key: str | None = None, params: dict[str, Any] | None = None) -> Any:
        """Every page of a list (`key`: the list's field in the answer; None for an answer that is the list)."""
        return self.client.list_all(path, key, params)

    def vm(self, given: str | None) -> str:
        """The VM a command acts on: an alias, an ID or a unique ID prefix; the VM used last when none is given."""
        if not given:
            if not self.state.last_vm:
                raise click.UsageError("no VM given and none used yet: pass a VM ID or alias")
            return self.state.last_vm
        if given in self.state.aliases:
            return self.state.aliases[given]
        if is_uuid(given):
            return given
        prefix = given.rstrip("…").rstrip(".")  # IDs as the documentation abbreviates them: 2b4a…
        if len(prefix) < 4:
            raise click.ClickException(f"no VM {given!r}: not an alias here; an ID prefix needs at least 4 characters")
        matches = [vm["vm_id"] for vm in self.list_all("/api/v1/vm") if vm["vm_id"].startswith(prefix)]
        if len(matches) > 1:
            raise click.ClickException(f"{given!r} matches {len(matches)} VMs: give more of the ID")
        if not matches:
            raise click.ClickException(f"no VM {given!r}: not an alias here, nor the start of a VM ID in your organization")
        return matches[0]

    def remember(self, vm_id: str, alias: str = "") -> None:
        previous = self.state.remember(vm_id, alias)
        if previous:
            click.echo(f"alias {alias} now names VM {vm_id} (it named {previous})", err=True)


def command(group: click.Group, name: str, formatted: bool = True, **settings: Any) -> Callable[..., Any]:
    """A subcommand of `group` with `--format` (unless interactive), the shared Context and error handling."""

    def decorate(function: Callable[..., Any]) -> click.Command:
        found = vers_command(name, formatted, **settings)(function)
        group.add_command(found)
        return found

    return decorate


def alias_option(function: Callable[..., Any]) -> Callable[..., Any]:
    def checked(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
        if not value:
            return ""
        try:
            return check_alias(value)
        except ConfigError as error:
            raise click.BadParameter(str(error)) from None

    return click.option("--vm-alias", "alias", callback=checked, help="A local name for the new VM.")(function)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=vmadmin.print_version,
    help="Print this CLI's version and the server's, and exit.",
)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run VMs, commit them, branch them, and tag commits in repositories; keep those in check with
    immutable tags, retention rules and garbage collection (`vers gc`), and an audit log (`vers audit`)."""
    ctx.obj = Context()


# --- identity -------------------------------------------------------------------------------------


@command(cli, "login")
@click.option("--url", default=None, help="The gateway, e.g. http://vers.example:8080 (default: VERS_URL or the saved one).")
@click.option("--api-key", default=None, help="Your API key (asked for when not given).")
def login(ctx: Context, out: Output, url: str | None, api_key: str | None) -> None:
    """Check a URL and API key against the server and save them for later commands."""
    url = (url or ctx.credentials.url).rstrip("/")
    if not api_key:
        api_key = click.prompt("API key", hide_input=True, err=True).strip()
    with contextlib.closing(ApiClient(url, api_key)) as client:
        who = client.request("GET", "/api/v1/whoami")
    path = config.save_credentials(url, api_key)
    out.result({"url": url, "org": who["org"], "config": str(path)}, f"✓ Logged in to {url} as organization {who['org']['name']}")


@command(cli, "whoami")
def whoami(ctx: Context, out: Output) -> None:
    """The organization and API key in use."""
    who = ctx.call("GET", "/api/v1/whoami")
    limits = who.get("limits") or {}
    out.fields(
        who,
        [
            ("Server", ctx.credentials.url),
            ("Organization", who["org"]["name"]),
            ("API key", who["api_key"]["label"]),
            *((_LIMIT_LABELS[name], limits[name]) for name in _LIMIT_LABELS if name in limits),
        ],
    )


# Each limit of an organization as `vers whoami` and `vers admin org limits` print it.
_LIMIT_LABELS = {
    "max_vms": "Max VMs",
    "max_vcpus": "Max vCPUs",
    "max_memory_mib": "Max memory (MiB)",
    "max_disk_mib": "Max disk (MiB)",
    "max_commits": "Max commits",
    "max_commit_mib": "Max commit MiB",
    "max_repositories": "Max repositories",
    "max_tags": "Max tags",
    "max_api_keys": "Max API keys",
    "max_domains": "Max domains",
}


# --- VMs ------------------------------------------------------------------------------------------


@command(cli, "run")
@alias_option
@click.option("--mem-size", type=click.IntRange(1), help="Memory in MiB.")
@click.option("--vcpu-count", type=click.IntRange(1), help="Virtual CPUs.")
@click.option("--fs-size", type=click.IntRange(1), help="Root filesystem size in MiB.")
@click.option("--image", help="Image to boot (default: default).")
@click.option(
    "--network",
    type=click.Choice(["nat", "none"]),
    help="nat (the default): outbound access through NAT; none: no packet leaves the VM (tunnels still reach in).",
)
def run(
    ctx: Context,
    out: Output,
    alias: str,
    mem_size: int | None,
    vcpu_count: int | None,
    fs_size: int | None,
    image: str | None,
    network: str | None,
) -> None:
    """Boot a new VM and wait until it answers."""
    wanted = {"mem_size_mib": mem_size, "vcpu_count": vcpu_count, "fs_size_mib": fs_size, "image_name": image, "network": network}
    vm_config = {name: value for name, value in wanted.items() if value is not None}
    with progress("Booting a VM…"):
        vm_id = ctx.call("POST", "/api/v1/vm/new_root", params={"wait_boot": "true"}, json={"vm_config": vm_config})["vm_id"]
    ctx.remember(vm_id, alias)
    out.result({"vm_id": vm_id, "alias": alias or None}, f"✓ VM {vm_id} is running" + (f" (alias {alias})" if alias else ""))


class PassThrough(click.Command):
    """A command whose arguments after `--` go untouched to another program (click would drop the `--`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            args, ctx.meta["passed"] = args[:at], args[at + 1 :]
        return super().parse_args(ctx, args)


@command(cli, "connect", formatted=False, cls=PassThrough)
@click.option("--ssh", "over_ssh", is_flag=True, help="Log in with OpenSSH (`vers ssh-config`'s block) instead of the console.")
@click.argument("vm", required=False)
def connect(ctx: Context, over_ssh: bool, vm: str | None) -> None:
    """The VM's console in this terminal; Ctrl-] or `exit` leaves. With --ssh, `ssh` to the VM instead
    (`vers connect --ssh VM -- ARGS...` passes ARGS to ssh, e.g. a command or -L 8080:localhost:80)."""
    passed: list[str] = click.get_current_context().meta.get("passed", [])
    if passed and not over_ssh:
        raise click.UsageError("arguments after -- are for ssh: add --ssh")
    vm_id = ctx.vm(vm)
    if over_ssh:
        if shutil.which("ssh") is None:
            raise click.ClickException("no ssh on PATH: install OpenSSH's client (Debian: openssh-client)")
        block = _ssh_block(ctx, vm_id)
        path = write_config(block)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp("ssh", ["ssh", "-F", str(path), block.host, *passed])
    session = open_console(ctx.credentials.url, ctx.client.api_key, vm_id)
    ctx.remember(vm_id)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"Connected to VM {vm_id}. Ctrl-] or `exit` leaves.", err=True)
    session.run()
    if interactive:
        click.echo(f"\r\n{'Left' if session.detached else 'Closed'} the console of VM {vm_id}.", err=True)


# `vers exec` and `vers logs`: services/cli/streams.py


def _port(text: str, what: str, lowest: int = 1) -> int:
    if not text.isdigit() or not lowest <= int(text) <= 65535:
        raise click.BadParameter(f"{what} {text!r} is not a port number ({lowest}-65535)", param_hint="[LOCAL:]REMOTE")
    return int(text)


@command(cli, "tunnel")
@click.option("--stdio", is_flag=True, help="One connection on stdin and stdout (for ssh's ProxyCommand), no listening port.")
@click.argument("vm")
@click.argument("ports", metavar="[LOCAL:]REMOTE")
def tunnel(ctx: Context, out: Output, stdio: bool, vm: str, ports: str) -> None:
    """Forward 127.0.0.1:LOCAL to port REMOTE inside the VM, as `ssh -L` does, until Ctrl-C. LOCAL is REMOTE
    when not given; 0 picks a free port. Each connection runs over its own WebSocket, many at once."""
    local_text, colon, remote_text = ports.rpartition(":")
    remote = _port(remote_text, "remote port")
    local = _port(local_text, "local port", lowest=0) if colon else remote
    if stdio and colon:
        raise click.UsageError("--stdio takes the VM's port alone: vers tunnel --stdio VM PORT")
    if stdio and out.json:
        raise click.UsageError("--stdio carries the connection's bytes on stdout: no --format")
    vm_id = ctx.vm(vm)
    api_key = ctx.client.api_key
    if stdio:
        socket = open_stdio(ctx.credentials.url, api_key, vm_id, remote)
        try:
            why = run_stdio(socket, sys.stdin.fileno(), sys.stdout.fileno())
        except KeyboardInterrupt:
            socket.close()
            sys.exit(130)
        if why:
            raise click.ClickException(why)
        return
    ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/metadata")  # an unknown VM fails now, not at the first connection
    ctx.remember(vm_id)

    def ready(port: int) -> None:
        out.result(
            {"vm_id": vm_id, "port": remote, "local_address": "127.0.0.1", "local_port": port},
            f"✓ 127.0.0.1:{port} → VM {vm_id}:{remote} (Ctrl-C stops)",
        )

    def failed(peer: str, why: str) -> None:
        click.echo(f"✗ connection from {peer}: {why}", err=True)

    try:
        asyncio.run(serve(ctx.credentials.url, api_key, vm_id, remote, local, ready, failed))
    except KeyboardInterrupt:  # before the loop took over Ctrl-C
        pass
    except OSError as error:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{local}: {error.strerror or error}") from None


def _ssh_block(ctx: Context, vm_id: str) -> HostBlock:
    """The VM's key saved, and its `Host` block (named by its alias when it has one)."""
    answer = ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/ssh_key")
    ctx.remember(vm_id)
    key = save_key(vm_id, answer["ssh_private_key"])
    return host_block(ctx.state.alias_of(vm_id) or vm_id, vm_id, key, int(answer.get("ssh_port") or 22))


@command(cli, "ssh-config")
@click.argument("vm", required=False)
def ssh_config(ctx: Context, out: Output, vm: str | None) -> None:
    """An OpenSSH `Host` block for the VM (its key saved in the config folder), to add to ~/.ssh/config:
    `vers ssh-config dev >> ~/.ssh/config && ssh dev`, scp and rsync included."""
    block = _ssh_block(ctx, ctx.vm(vm))
    if out.json:
        out.result(block.as_dict())
    else:
        click.echo(block.text, nl=False)


# `vers commit [VM]` commits (the default subcommand); `vers commit list` lists.
@cli.group("commit", cls=DefaultGroup, default="create", default_if_no_args=True)
def commit_group() -> None:
    """Commit a VM (`vers commit [VM]`), or list commits (`vers commit list`)."""


@command(commit_group, "create")
@click.argument("vm", required=False)
@click.option("--name", default="", help="A name for the commit.")
@click.option("--description", default="", help="What the commit holds.")
@click.option("--keep-paused", is_flag=True, help="Leave the VM paused afterwards.")
def commit_create(ctx: Context, out: Output, vm: str | None, name: str, description: str, keep_paused: bool) -> None:
    """Commit the VM's disk and memory as an immutable commit (the VM used last if none is given)."""
    vm_id = ctx.vm(vm)
    params = {"keep_paused": "true"} if keep_paused else {}
    with progress(f"Committing VM {vm_id}…"):
        answer = ctx.call("POST", f"/api/v1/vm/{seg(vm_id)}/commit", params=params, json={"name": name, "description": description})
    ctx.remember(vm_id)
    out.result({"vm_id": vm_id, "commit_id": answer["commit_id"]}, f"✓ Committed VM {vm_id}", f"→ commit {answer['commit_id']}")


@command(commit_group, "list")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
def commit_list(ctx: Context, out: Output, limit: int, offset: int) -> None:
    """Your organization's commits, newest first."""
    page = ctx.call("GET", "/api/v1/commits", params={"limit": limit, "offset": offset})
    rows = [[c["commit_id"], c["name"] or "-", when(c["created_at"]), c["parent_vm_id"] or "-"] for c in page["commits"]]
    out.table(page, ["COMMIT", "NAME", "CREATED", "FROM VM"], rows, "No commits yet: `vers commit` makes one.")
    if not out.json and page["total"] > offset + len(rows):
        click.echo(f"({len(rows)} of {page['total']}; --offset {offset + len(rows)} for more)")


@command(cli, "branch")
@click.argument("source", required=False, metavar="[VM|COMMIT]")
@click.option("--count", type=click.IntRange(1, 64), default=1, show_default=True, help="How many VMs.")
@click.option("--keep-paused", is_flag=True, help="Leave the source VM paused afterwards.")
@click.option("--checkout", is_flag=True, help="Make the new VM the current one (the VM commands act on when none is given).")
@alias_option
def branch(ctx: Context, out: Output, source: str | None, count: int, keep_paused: bool, checkout: bool, alias: str) -> None:
    """New VMs branched copy-on-write from a VM (the current one if none is given) or a commit; the current VM
    stays what it was unless --checkout."""
    if alias and count > 1:
        raise click.UsageError("--vm-alias names one VM: drop it or use --count 1")
    if checkout and count > 1:
        raise click.UsageError("--checkout makes one VM the current one: drop it or use --count 1")
    source_id = ctx.vm(source)  # an ID passes as it is, so a commit ID works too
    params = {"count": count, **({"keep_paused": "true"} if keep_paused else {})}
    with progress(f"Branching {source_id}…"):
        vms = [vm["vm_id"] for vm in ctx.call("POST", f"/api/v1/vm/{seg(source_id)}/branch", params=params)["vms"]]
    for vm_id in vms:
        if alias and (previous := ctx.state.name(vm_id, alias)):
            click.echo(f"alias {alias} now names VM {vm_id} (it named {previous})", err=True)
    if checkout:
        ctx.remember(vms[0])
    lines = [f"✓ Branched {source_id} → {len(vms)} VM{'s' if len(vms) > 1 else ''}", *(f"  VM: {vm_id}" for vm_id in vms)]
    if checkout:
        lines.append(f"✓ Switched to VM {vms[0]}")
    out.result(
        {
            "source": source_id,
            "vms": [{"vm_id": vm_id} for vm_id in vms],
            "alias": alias or None,
            "current_vm_id": ctx.state.last_vm or None,
        },
        *lines,
    )


@command(cli, "run-commit")
@click.argument("source", metavar="ID|REF")
@click.option("--ref", "by_ref", is_flag=True, help="SOURCE is a repo:tag reference.")
@click.option("--tag", "by_tag", is_flag=True, help="SOURCE is a legacy organization tag name.")
@alias_option
def run_commit(ctx: Context, out: Output, source: str, by_ref: bool, by_tag: bool, alias: str) -> None:
    """Start a VM from a commit ID, or from a repo:tag reference with --ref."""
    if by_ref and by_tag:
        raise click.UsageError("--ref and --tag are exclusive: a source is a reference or a legacy tag")
    if by_ref:
        if ":" not in source:
            raise click.UsageError(f"{source!r} is not a repo:tag reference (e.g. my-app:latest)")
        if "/" in source.partition(":")[0]:
            raise click.UsageError(f"{source!r} belongs to another organization: fork it first with `vers repo fork {source}`")
        body = {"ref": source}
    elif by_tag:
        body = {"tag_name": source}
    elif ":" in source:
        raise click.UsageError(f"{source!r} looks like a repo:tag reference; add --ref: vers run-commit {source} --ref")
    else:
        body = {"commit_id": source}
    with progress(f"Starting a VM from {source}…"):
        vm_id = ctx.call("POST", "/api/v1/vm/from_commit", json=body)["vm_id"]
    ctx.remember(vm_id, alias)
    out.result(
        {"vm_id": vm_id, "source": source, "alias": alias or None},
        f"✓ VM {vm_id} is running from {source}" + (f" (alias {alias})" if alias else ""),
    )


def _set_state(ctx: Context, out: Output, vm: str | None, state: str, done: str) -> None:
    vm_id = ctx.vm(vm)
    answer = ctx.call("PATCH", f"/api/v1/vm/{seg(vm_id)}/state", json={"state": state})
    ctx.remember(vm_id)
    out.result(answer, f"✓ {done} VM {vm_id}")


@command(cli, "pause")
@click.argument("vm", required=False)
def pause(ctx: Context, out: Output, vm: str | None) -> None:
    """Pause a VM: its CPUs stop, its memory is kept."""
    _set_state(ctx, out, vm, "Paused", "Paused")


@command(cli, "resume")
@click.argument("vm", required=False)
def resume(ctx: Context, out: Output, vm: str | None) -> None:
    """Resume a paused VM, or wake a sleeping one where it was."""
    _set_state(ctx, out, vm, "Running", "Resumed")


@command(cli, "sleep")
@click.argument("vm", required=False)
def sleep(ctx: Context, out: Output, vm: str | None) -> None:
    """Put a VM to sleep: its memory saved to disk, no QEMU left running; `vers resume` wakes it."""
    with progress("Saving the VM's memory…"):
        _set_state(ctx, out, vm, "Sleeping", "Put to sleep")


@command(cli, "kill")
@click.argument("vm", required=False)
def kill(ctx: Context, out: Output, vm: str | None) -> None:
    """Stop a VM and delete it (its commits stay)."""
    vm_id = ctx.vm(vm)
    ctx.call("DELETE", f"/api/v1/vm/{seg(vm_id)}")
    ctx.state.forget(vm_id)
    ssh.forget(vm_id)
    out.result({"vm_id": vm_id}, f"✓ Killed VM {vm_id}")


@command(cli, "status")
@click.argument("vm", required=False)
def status(ctx: Context, out: Output, vm: str | None) -> None:
    """All your VMs, or one VM in detail."""
    if vm:
        vm_id = ctx.vm(vm)
        meta = ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/metadata")
        ctx.remember(vm_id)
        out.fields(
            meta,
            [
                ("VM", meta["vm_id"]),
                ("Alias", ctx.state.alias_of(vm_id)),
                ("State", meta["state"]),
                ("Created", when(meta["created_at"])),
                ("vCPUs", meta["vcpu_count"]),
                ("Memory", f"{meta['mem_size_mib']} MiB"),
                ("Disk", f"{meta.get('fs_size_mib', 0)} MiB"),
                ("From commit", meta["parent_commit_id"]),
            ],
        )
        return
    vms = ctx.list_all("/api/v1/vm")
    last = ctx.state.last_vm
    # The list has no sizes: each VM's metadata has them (its memory and disk as made or resized).
    for vm_entry in vms:
        try:
            meta = ctx.call("GET", f"/api/v1/vm/{seg(vm_entry['vm_id'])}/metadata")
        except ApiError as error:
            if error.status != 404:
                raise
            meta = {}  # deleted since the list was made
        vm_entry["mem_size_mib"], vm_entry["fs_size_mib"] = meta.get("mem_size_mib"), meta.get("fs_size_mib")
    rows = [
        [
            vm["vm_id"] + (" *" if vm["vm_id"] == last else ""),
            ctx.state.alias_of(vm["vm_id"]) or "-",
            vm["state"],
            f"{vm['mem_size_mib']} MiB" if vm["mem_size_mib"] else "-",
            f"{vm['fs_size_mib']} MiB" if vm["fs_size_mib"] else "-",
            when(vm["created_at"]),
        ]
        for vm in vms
    ]
    out.table(vms, ["VM", "ALIAS", "STATE", "MEMORY", "DISK", "CREATED"], rows, "No VMs: `vers run` starts one.")


# --- repositories ---------------------------------------------------------------------------------


@cli.group("repo")
def repo() -> None:
    """Repositories of tagged commits, private or public, with immutable tags and retention rules
    (`vers repo policy`); publishing scans them for secrets first."""


@command(repo, "create")
@click.argument("name")
@click.option("--description", default="", help="What the repository is for.")
@governance.immutable_option
@governance.retention_options
def repo_create(
    ctx: Context,
    out: Output,
    name: str,
    description: str,
    immutable_tags: tuple[str, ...],
    keep_last: int | None,
    keep_tags: tuple[str, ...],
    untagged_days: int | None,
) -> None:
    """Create a private repository, with immutable tags and retention rules if given (`vers repo policy`
    changes them later); `vers repo visibility NAME --public` publishes it."""
    body: dict[str, Any] = {"name": name, "description": description}
    if immutable_tags:
        body["immutable_tags"] = list(immutable_tags)
    retention = governance.retention_given(keep_last, keep_tags, untagged_days)
    if retention:
        body["retention"] = retention
    answer = ctx.call("POST", "/api/v1/repositories", json=body)
    rules = [f"  {label}: {value}" for label, value in governance.policy_fields(body) if value not in ("none", "off")]
    out.result(answer, f"✓ Created repository {answer['name']} (private)", *rules)


@command(repo, "list")
@click.option("--public", "public", is_flag=True, help="Public repositories of every organization instead.")
def repo_list(ctx: Context, out: Output, public: bool) -> None:
    """Your organization's repositories, or with --public everyone's public ones."""
    if public:
        answer = ctx.list_all("/api/v1/public/repositories", "repositories")
        rows = [[r["full_name"], r["description"] or "-", when(r["created_at"])] for r in answer["repositories"]]
        out.table(answer, ["REPOSITORY", "DESCRIPTION", "CREATED"], rows, "No public repositories.")
        return
    answer = ctx.list_all("/api/v1/repositories", "repositories")
    rows = [
        [r["name"], "public" if r["is_public"] else "private", r["description"] or "-", when(r["created_at"])]
        for r in answer["repositories"]
    ]
    out.table(answer, ["NAME", "VISIBILITY", "DESCRIPTION", "CREATED"], rows, "No repositories: `vers repo create NAME` makes one.")


@command(repo, "get")
@click.argument("name", metavar="NAME|ORG/NAME")
def repo_get(ctx: Context, out: Output, name: str) -> None:
    """One repository: yours by NAME, or a public one by ORG/NAME."""
    org, repo_name = split_org(name)
    if org:
        found = ctx.call("GET", f"/api/v1/public/repositories/{seg(org)}/{seg(repo_name)}")
        out.fields(
            found,
            [
                ("Repository", found["full_name"]),
                ("Visibility", "public"),
                ("Description", found["description"]),
                ("Created", when(found["created_at"])),
                ("ID", found["repo_id"]),
            ],
        )
        return
    found = ctx.call("GET", f"/api/v1/repositories/{seg(repo_name)}")
    out.fields(
        found,
        [
            ("Repository", found["name"]),
            ("Visibility", "public" if found["is_public"] else "private"),
            ("Description", found["description"]),
            ("Created", when(found["created_at"])),
            ("ID", found["repo_id"]),
            *governance.policy_fields(found),
        ],
    )


@command(repo, "delete")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def repo_delete(ctx: Context, out: Output, names: tuple[str, ...]) -> None:
    """Delete repositories and their tags; the commits stay."""
    each(out, names, lambda name: ctx.call("DELETE", f"/api/v1/repositories/{seg(name)}"), "Deleted repository {} (commits kept)")


@command(repo, "visibility")
@click.argument("name")
@click.option(
    "--public",
    type=click.BOOL,
    is_flag=False,
    flag_value="true",
    default=None,
    metavar="[=true|false]",
    help="--public publishes, --public=false makes it private.",
)
@click.option("--private", is_flag=True, help="Same as --public=false.")
@click.option("--force", is_flag=True, help="Publish even when the secret scan finds something (the audit log records it).")
def repo_visibility(ctx: Context, out: Output, name: str, public: bool | None, private: bool, force: bool) -> None:
    """Publish a repository (--public) or make it private (--public=false).

    Publishing first scans every commit its tags name (files on the disk, and the memory image) for private
    keys, cloud credentials, tokens and API keys: findings refuse it, listed with where each one is; remove
    them and tag a new commit, or publish anyway with --force."""
    if (public is None) == (not private):
        raise click.UsageError("say --public or --public=false (or --private)")
    is_public = bool(public) if public is not None else False
    if force and not is_public:
        raise click.UsageError("--force publishes despite the secret scan: it goes with --public")
    answer = governance.set_visibility(ctx, out, name, is_public, force)
    out.result(answer, f"✓ {answer['name']} is now {'public' if answer['is_public'] else 'private'}")


@command(repo, "fork")
@click.argument("source", metavar="ORG/REPO:TAG")
@click.option("--repo-name", default="", help="Repository in your organization (default: the source's name).")
@click.option("--tag-name", default="", help="Tag in that repository (default: the source's tag).")
@alias_option
def repo_fork(ctx: Context, out: Output, source: str, repo_name: str, tag_name: str, alias: str) -> None:
    """Copy a public repository's tag into your organization: a running VM, a commit and a tag."""
    org, source_repo, source_tag = parse_public_ref(source)
    body = {"source_org": org, "source_repo": source_repo, "source_tag": source_tag, "repo_name": repo_name, "tag_name": tag_name}
    with progress(f"Forking {source}…"):
        answer = ctx.call("POST", "/api/v1/repositories/fork", json=body)
    ctx.remember(answer["vm_id"], alias)
    out.result(answer, f"✓ Forked → {answer['reference']}", f"  VM:     {answer['vm_id']}", f"  Commit: {answer['commit_id']}")


for found in governance.REPO_COMMANDS:
    repo.add_command(found)
for found in governance.TOP_COMMANDS:
    cli.add_command(found)
for module in (streams, copy, vmadmin, commits, envvars, deploy, mcp):
    for found in module.TOP_COMMANDS:
        cli.add_command(found)
for found in commits.COMMIT_COMMANDS:
    commit_group.add_command(found)


# --- tags -----------------------------------------------------------------------------------------


@repo.group("tag")
def tag() -> None:
    """Tags: movable names for commits inside a repository."""


@command(tag, "create")
@click.argument("repo_name", metavar="REPO")
@click.argument("tag_name", metavar="TAG")
@click.argument("commit_id", metavar="COMMIT")
@click.option("--description", default="", help="What this tag marks.")
def tag_create(ctx: Context, out: Output, repo_name: str, tag_name: str, commit_id: str, description: str) -> None:
    """Point a new tag at a commit your organization owns."""
    body = {"tag_name": tag_name, "commit_id": commit_id, "description": description}
    answer = ctx.call("POST", f"/api/v1/repositories/{seg(repo_name)}/tags", json=body)
    out.result(answer, f"✓ Tagged {answer['reference']} → {answer['commit_id']}")


@command(tag, "list")
@click.argument("repo_name", metavar="REPO|ORG/REPO")
def tag_list(ctx: Context, out: Output, repo_name: str) -> None:
    """A repository's tags: yours, or a public one's as ORG/REPO."""
    org, name = split_org(repo_name)
    path = f"/api/v1/public/repositories/{seg(org)}/{seg(name)}/tags" if org else f"/api/v1/repositories/{seg(name)}/tags"
    answer = ctx.list_all(path, "tags")
    rows = [[t["tag_name"], t["commit_id"], when(t["updated_at"]), t["description"] or "-"] for t in answer["tags"]]
    out.table(answer, ["TAG", "COMMIT", "UPDATED", "DESCRIPTION"], rows, f"No tags in {repo_name}.")


@command(tag, "get")
@click.argument("repo_name", metavar="REPO|ORG/REPO")
@click.argument("tag_name", metavar="TAG")
def tag_get(ctx: Context, out: Output, repo_name: str, tag_name: str) -> None:
    """One tag: the commit it names and when it last moved."""
    org, name = split_org(repo_name)
    base = f"/api/v1/public/repositories/{seg(org)}/{seg(name)}" if org else f"/api/v1/repositories/{seg(name)}"
    path = f"{base}/tags/{seg(tag_name)}"
    found = ctx.call("GET", path)
    reference = f"{org}/{found['reference']}" if org else found["reference"]
    out.fields(
        found,
        [
            ("Tag", reference),
            ("Commit", found["commit_id"]),
            ("Description", found["description"]),
            ("Created", when(found["created_at"])),
            ("Updated", when(found["updated_at"])),
        ],
    )


@command(tag, "update")
@click.argument("repo_name", metavar="REPO")
@click.argument("tag_name", metavar="TAG")
@click.option("--commit", "commit_id", default=None, help="Move the tag to this commit.")
@click.option("--description", default=None, help="New description.")
def tag_update(ctx: Context, out: Output, repo_name: str, tag_name: str, commit_id: str | None, description: str | None) -> None:
    """Move a tag to another commit, or change its description."""
    if commit_id is None and description is None:
        raise click.UsageError("nothing to change: give --commit ID and/or --description TEXT")
    before = ctx.call("GET", f"/api/v1/repositories/{seg(repo_name)}/tags/{seg(tag_name)}")
    body = {name: value for name, value in (("commit_id", commit_id), ("description", description)) if value is not None}
    after = ctx.call("PATCH", f"/api/v1/repositories/{seg(repo_name)}/tags/{seg(tag_name)}", json=body)
    if after["commit_id"] != before["commit_id"]:
        line = f"✓ Moved {after['reference']} → {after['commit_id']} (was {before['commit_id']})"
    else:
        line = f"✓ Updated {after['reference']} (still {after['commit_id']})"
    out.result({**after, "previous_commit_id": before["commit_id"]}, line)


@command(tag, "delete")
@click.argument("repo_name", metavar="REPO")
@click.argument("tag_names", nargs=-1, required=True, metavar="TAG...")
def tag_delete(ctx: Context, out: Output, repo_name: str, tag_names: tuple[str, ...]) -> None:
    """Delete tags; the commits they named stay."""
    each(
        out,
        tag_names,
        lambda name: ctx.call("DELETE", f"/api/v1/repositories/{seg(repo_name)}/tags/{seg(name)}"),
        f"Deleted tag {repo_name}:{{}} (commit kept)",
    )


@command(tag, "history")
@click.argument("repo_name", metavar="REPO")
@click.argument("tag_name", metavar="TAG")
def tag_history(ctx: Context, out: Output, repo_name: str, tag_name: str) -> None:
    """Where a tag pointed over time, newest first: the commit to roll back to."""
    answer = ctx.list_all(f"/api/v1/repositories/{seg(repo_name)}/tags/{seg(tag_name)}/history", "events")
    rows = [
        [when(e["created_at"]), e["action"], e["old_commit_id"] or "-", e["new_commit_id"] or "-", e["api_key_id"]]
        for e in answer["events"]
    ]
    out.table(answer, ["WHEN", "ACTION", "FROM", "TO", "BY KEY"], rows, f"No history for {repo_name}:{tag_name}.")


# --- domains --------------------------------------------------------------------------------------


@cli.group("domain")
def domain() -> None:
    """Domains: NAME.<the platform's domain suffix> reaches a port of a VM through the gateway."""


def _access(found: dict[str, Any]) -> str:
    return "public" if found.get("is_public") else "private"


@command(domain, "create")
@click.argument("name")
@click.argument("vm", required=False)
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="The VM's port requests go to (default 80).")
@click.option("--public", "is_public", is_flag=True, help="Reachable without an API key (default: the organization's key only).")
def domain_create(ctx: Context, out: Output, name: str, vm: str | None, port: int | None, is_public: bool) -> None:
    """Route NAME (a DNS label: lowercase letters, digits, hyphens) to a port of a VM, the VM used last if none is given."""
    vm_id = ctx.vm(vm)
    body: dict[str, Any] = {"domain": name, "vm_id": vm_id, "is_public": is_public, **({"port": port} if port else {})}
    found = ctx.call("POST", "/api/v1/domains", json=body)
    ctx.remember(vm_id)
    line = f"✓ {found['domain']} → VM {found['vm_id']}:{found['port']} ({_access(found)})"
    out.result(found, line, f"  ID: {found['domain_id']}")


@command(domain, "list")
@click.option("--vm", default=None, help="Only this VM's domains.")
def domain_list(ctx: Context, out: Output, vm: str | None) -> None:
    """Your organization's domains."""
    params = {"vm_id": ctx.vm(vm)} if vm else {}
    found = ctx.list_all("/api/v1/domains", params=params)
    rows = [[d["domain"], f"{d['vm_id']}:{d['port']}", _access(d), when(d["created_at"]), d["domain_id"]] for d in found]
    out.table(found, ["DOMAIN", "VM:PORT", "ACCESS", "CREATED", "ID"], rows, "No domains: `vers domain create NAME` makes one.")


@command(domain, "delete")
@click.argument("names", nargs=-1, required=True, metavar="DOMAIN_ID_OR_NAME...")
def domain_delete(ctx: Context, out: Output, names: tuple[str, ...]) -> None:
    """Delete domains, by ID, by NAME or by their full name; the VMs stay."""
    listed: list[dict[str, Any]] = ctx.list_all("/api/v1/domains")

    def delete(given: str) -> None:
        name = given.lower().rstrip(".")  # names are kept in lowercase, as DNS compares them
        found = next((d for d in listed if given == d["domain_id"] or name in (d["domain"], d["domain"].split(".", 1)[0])), None)
        if found is None:
            raise ApiError(404, f"no domain {given!r} in your organization: `vers domain list` shows them")
        ctx.call("DELETE", f"/api/v1/domains/{seg(found['domain_id'])}")

    each(out, names, delete, "Deleted domain {}")


# --- administration -------------------------------------------------------------------------------


def _data_dir() -> Path:
    return Path(os.environ.get("VERS_DATA_DIR", ".vers"))


@contextlib.contextmanager
def _admin_client(ctx: Context) -> Iterator[ApiClient]:
    key_file = _data_dir() / "admin.key"
    if not key_file.exists():
        raise click.ClickException(f"no administrator key at {key_file}: run this on the platform's machine with its VERS_DATA_DIR")
    with contextlib.closing(ApiClient(ctx.credentials.url, key_file.read_text().strip())) as client:
        yield client


@cli.group()
def admin() -> None:
    """Platform administration (needs the administrator key in VERS_DATA_DIR)."""


@admin.group("org")
def admin_org() -> None:
    """Organizations."""


@command(admin_org, "create")
@click.argument("name")
def admin_org_create(ctx: Context, out: Output, name: str) -> None:
    """Create an organization and print its first API key (shown once) on the last line."""
    with _admin_client(ctx) as client:
        answer = client.request("POST", "/api/v1/admin/orgs", json={"name": name})
    out.result(
        answer, f"Created organization {answer['org']['name']} ({answer['org']['id']})", "Its API key, shown only now:", answer["token"]
    )


@command(admin_org, "list")
def admin_org_list(ctx: Context, out: Output) -> None:
    """Every organization."""
    with _admin_client(ctx) as client:
        answer = client.list_all("/api/v1/admin/orgs", "orgs")
    out.table(answer, ["NAME", "ID"], [[org["name"], org["id"]] for org in answer["orgs"]], "No organizations.")


def _limit_option(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        f"--{name.replace('_', '-')}",
        name,
        type=click.IntRange(-1),
        default=None,
        metavar="N",
        help=f"{_LIMIT_LABELS[name]}; -1 puts back the platform's default.",
    )


def _limit_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for name in reversed(_LIMIT_LABELS):
        function = _limit_option(name)(function)
    return function


@command(admin_org, "limits")
@click.argument("org", metavar="ORG")
@_limit_options
def admin_org_limits(ctx: Context, out: Output, org: str, **limits: int | None) -> None:
    """Set an organization's own limits (-1: back to the default, VERS_ORG_MAX_*), and print them all;
    with no option, only print them."""
    body = {name: value for name, value in limits.items() if value is not None}
    with _admin_client(ctx) as client:
        answer = client.request("PATCH", f"/api/v1/admin/orgs/{seg(org)}/limits", json=body)
    out.fields(
        answer, [("Organization", answer["org"]["name"]), *((_LIMIT_LABELS[name], answer["limits"][name]) for name in _LIMIT_LABELS)]
    )


@admin.group("images")
def admin_images() -> None:
    """Supported images: vers/node, python, rust, go, pi-agent, cc-agent."""


@command(admin_images, "bake")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@click.option("--extra-package", "extra", multiple=True, metavar="PKG", help="Another Debian package for this bake; repeatable.")
def admin_images_bake(ctx: Context, out: Output, names: tuple[str, ...], extra: tuple[str, ...]) -> None:
    """Build, boot, commit and publish supported images (all when no NAME is given) as vers/NAME:latest
    and vers/NAME:<date>. Needs root (debootstrap) and the platform running; a failed bake moves no tag."""
    from services.bake.disk import Sources
    from services.bake.errors import BakeError
    from services.bake.pipeline import bake
    from services.bake.recipes import RECIPES, recipe
    from services.common.settings import Settings

    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        raise click.BadParameter(f"no supported image {', '.join(unknown)}; there are: {', '.join(RECIPES)}", param_hint="NAME")
    # SIGTERM (a CI job cancelled) unwinds like Ctrl-C, so mounts in the scratch root are undone.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = Settings(data_dir=_data_dir())
    sources = Sources(settings.image_suite, settings.debian_mirror, settings.debian_security_mirror, settings.npm_registry)
    results, failed = [], []
    with _admin_client(ctx) as client:
        for name in names or tuple(RECIPES):
            try:
                baked = bake(
                    client,
                    recipe(name, extra),
                    settings.image_root,
                    sources,
                    lambda line, name=name: click.echo(f"{name}: {line}", err=True),
                )
            except (BakeError, ApiError) as error:
                failed.append(name)
                results.append({"name": name, "error": str(error.message if isinstance(error, ApiError) else error)})
                click.echo(f"Error: baking {name}: {results[-1]['error']} (latest not moved)", err=True)
                continue
            results.append({"name": name, "commit_id": baked.commit_id, "dated_tag": baked.dated_tag, "versions": baked.versions})
            if not out.json:
                click.echo(f"✓ Baked vers/{name}:latest → {baked.commit_id}")
                click.echo(f"  Dated:    vers/{name}:{baked.dated_tag}")
                click.echo(f"  Versions: {'; '.join(f'{tool}: {text}' for tool, text in baked.versions.items())}")
    if out.json:
        out.result({"results": results})
    if failed:
        sys.exit(1)


@command(admin, "fsck")
@click.option(
    "--repair",
    is_flag=True,
    help="Fix what is safe to fix (orphan files and processes, garbage layers, rows of VMs "
    "that are gone) and say what was done; commits and tags are only reported.",
)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="A change younger than this is an operation in flight, not a problem.",
)
def admin_fsck(ctx: Context, out: Output, repair: bool, as_json: bool, grace: float) -> None:
    """Check the platform's databases, files and QEMU processes against each other; exit 0 only when clean.
    Runs on the platform's machine (its VERS_DATA_DIR), the platform running or stopped."""
    import asyncio

    from services.common.settings import Settings
    from services.fsck import fsck

    if as_json:
        out = Output("json")
    settings = Settings(data_dir=_data_dir())
    if not settings.data_dir.is_dir():
        raise click.ClickException(f"no data folder at {settings.data_dir}: run this on the platform's machine with its VERS_DATA_DIR")
    report = asyncio.run(fsck(settings, repair=repair, grace=grace))
    if out.json:
        out.result(report.as_dict())
        sys.exit(0 if report.clean else 1)
    columns = ["CODE", "OBJECT", "PROBLEM", "--REPAIR"]
    if report.problems:
        out.table(None, columns, [[p.code, p.object, p.message, p.repair or "-"] for p in report.problems], "")
    for done in report.repaired:
        if "action" in done:
            click.echo(f"✓ {done['action']}")
        else:
            click.echo(f"✗ {done['code']} {done['object']}: {done.get('error') or 'not repaired: ' + done.get('skipped', '')}")
    if repair and report.remaining and report.repaired:
        click.echo("Still there after the repairs:")
        out.table(None, columns, [[p.code, p.object, p.message, p.repair or "-"] for p in report.remaining], "")
    checked = ", ".join(f"{count} {'VMs' if what == 'vms' else what}" for what, count in report.checked.items())
    if report.clean:
        click.echo(f"✓ Clean{' after the repairs' if report.problems else ''} ({checked} checked)")
        return
    repairable = sum(1 for p in report.left if p.action is not None)
    hint = f", {repairable} repairable with --repair" if repairable and not repair else ""
    click.echo(f"✗ {len(report.left)} problem{'s' if len(report.left) != 1 else ''}{hint} ({checked} checked)")
    sys.exit(1)


def main() -> None:
    cli(prog_name="vers")


if __name__ == "__main__":
    main()
