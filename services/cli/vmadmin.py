"""`vers label`, `vers resize`, `vers info`, `vers alias`, `vers checkout`, and what `vers --version` prints.
main.py adds the commands; this module needs nothing from it."""

from __future__ import annotations

import contextlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

import click

from services.cli import config
from services.cli.config import ConfigError, check_alias
from services.cli.output import Output, progress, vers_command, when
from services.client import ApiClient, ApiError, Unreachable, seg

if TYPE_CHECKING:
    from services.cli.app import Context

# How far `vers info` follows a VM's commits back (each step is one request).
LINEAGE_MAX = 20


def _pairs(items: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="KEY=VALUE")
        labels[key] = value
    return labels


def _labels_text(labels: dict[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(labels.items())) or "none"


@vers_command("label")
@click.argument("vm", required=False)
@click.argument("pairs", nargs=-1, metavar="[KEY=VALUE...]")
@click.option("--remove", "removed", multiple=True, metavar="KEY", help="Remove this label; repeatable.")
@click.option("--replace", is_flag=True, help="The VM's labels become exactly the KEY=VALUE pairs given (none: no labels).")
def label(ctx: Context, out: Output, vm: str | None, pairs: tuple[str, ...], removed: tuple[str, ...], replace: bool) -> None:
    """Set labels on a VM (`vers label dev team=web tier=1`), remove some (--remove KEY), replace them all
    (--replace), or with nothing else given list them. `GET /api/v1/vm?label=KEY=VALUE` lists the VMs
    that have a label."""
    labels = _pairs(pairs)
    if replace and removed:
        raise click.UsageError("--replace sets the whole set of labels: give the ones to keep, without --remove")
    vm_id = ctx.vm(vm)
    base = f"/api/v1/vm/{seg(vm_id)}"
    if replace:
        current = ctx.call("PUT", f"{base}/labels", json={"labels": labels}).get("labels") or {}
        line = f"✓ Replaced the labels of VM {vm_id}"
    elif labels or removed:
        current = {}
        if labels:
            current = ctx.call("PATCH", f"{base}/label", json={"labels": labels}).get("labels") or {}
        for key in removed:
            current = ctx.call("DELETE", f"{base}/label/{seg(key)}").get("labels") or {}
        line = f"✓ Labelled VM {vm_id}"
    else:
        current = ctx.call("GET", f"{base}/status").get("labels") or {}
        ctx.remember(vm_id)
        rows = [[key, value] for key, value in sorted(current.items())]
        out.table({"vm_id": vm_id, "labels": current}, ["KEY", "VALUE"], rows, f"VM {vm_id} has no labels.")
        return
    ctx.remember(vm_id)
    out.result({"vm_id": vm_id, "labels": current}, line, f"  Labels: {_labels_text(current)}")


@vers_command("resize")
@click.argument("vm", required=False)
@click.option(
    "--size",
    "size_mib",
    type=click.IntRange(1),
    required=True,
    metavar="MiB",
    help="The disk's new size in MiB, more than its current size (a disk only grows).",
)
def resize(ctx: Context, out: Output, vm: str | None, size_mib: int) -> None:
    """Grow a running VM's disk, and its root filesystem with it, without a reboot."""
    vm_id = ctx.vm(vm)
    with progress(f"Growing the disk of VM {vm_id}…"):
        answer = ctx.call("PATCH", f"/api/v1/vm/{seg(vm_id)}/disk", json={"fs_size_mib": size_mib})
    ctx.remember(vm_id)
    out.result(answer, f"✓ Resized the disk of VM {vm_id} to {answer['fs_size_mib']} MiB")


def lineage(ctx: Context, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The commits the VM comes from, newest first: its parent commit and what that commit descends from."""
    parent = meta.get("parent_commit_id") or ""
    if not parent:
        return []
    try:
        return list(ctx.call("GET", f"/api/v1/vm/commits/{seg(parent)}/parents"))[:LINEAGE_MAX]
    except ApiError as error:
        if error.status != 404:
            raise
        return []  # the parent commit was deleted since: the VM still names it


@vers_command("info")
@click.argument("vm", required=False)
def info(ctx: Context, out: Output, vm: str | None) -> None:
    """A VM in full: state, resources (vCPUs, memory, disk, network, IP), labels, and its lineage (the commit
    it started from, the VM that commit was taken of, and the commits before it)."""
    vm_id = ctx.vm(vm)
    meta = ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/metadata")
    chain = lineage(ctx, meta)
    ctx.remember(vm_id)
    fields = [
        ("VM", meta["vm_id"]),
        ("Alias", ctx.state.alias_of(vm_id)),
        ("Current", "yes" if ctx.state.last_vm == vm_id else "no"),
        ("State", meta["state"]),
        ("Created", when(meta.get("created_at"))),
        ("vCPUs", meta.get("vcpu_count")),
        ("Memory", f"{meta.get('mem_size_mib', 0)} MiB"),
        ("Disk", f"{meta.get('fs_size_mib', 0)} MiB"),
        ("Network", meta.get("network") or "none"),
        ("IP", meta.get("ip")),
        ("Labels", _labels_text(meta.get("labels") or {})),
        ("Parent commit", meta.get("parent_commit_id")),
        ("Grandparent VM", meta.get("grandparent_vm_id")),
    ]
    steps = [f"  {c['id']}  {c.get('name') or '-'}  from VM {c.get('parent_vm_id') or '-'}  {when(c.get('created_at'))}" for c in chain]
    out.fields({"vm": meta, "lineage": chain}, fields)
    if not out.json:
        click.echo("Lineage:" if steps else "Lineage:        a root VM (started from an image)")
        for step in steps:
            click.echo(step)


@vers_command("alias")
@click.argument("vm", required=False)
@click.argument("name", required=False)
def alias(ctx: Context, out: Output, vm: str | None, name: str | None) -> None:
    """Give a VM a local name (`vers alias VM NAME`) that every command takes in place of its ID; with no
    argument, list the aliases. Aliases live in this machine's config, per server."""
    if vm is None:
        rows = [[given, target, "*" if target == ctx.state.last_vm else ""] for given, target in sorted(ctx.state.aliases.items())]
        out.table(ctx.state.aliases, ["ALIAS", "VM", "CURRENT"], rows, "No aliases: `vers alias VM NAME` makes one.")
        return
    if name is None:
        raise click.UsageError("give the alias too: vers alias VM NAME")
    try:
        check_alias(name)
    except ConfigError as error:
        raise click.BadParameter(str(error), param_hint="NAME") from None
    vm_id = ctx.vm(vm)
    ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/status")  # an alias only ever names a VM of yours
    previous = ctx.state.name(vm_id, name)
    lines = [f"✓ {name} → VM {vm_id}"] + ([f"  (it named VM {previous} before)"] if previous else [])
    out.result({"alias": name, "vm_id": vm_id, "previous_vm_id": previous or None}, *lines)


@vers_command("checkout")
@click.argument("vm", required=False)
def checkout(ctx: Context, out: Output, vm: str | None) -> None:
    """Make a VM the current one: the VM commands act on when none is given. With no VM, print the current one."""
    if vm is None:
        current = ctx.state.last_vm
        if not current:
            raise click.ClickException("no current VM: `vers checkout VM` sets one")
        out.result(
            {"vm_id": current, "alias": ctx.state.alias_of(current) or None},
            f"Current VM: {current}" + (f" ({ctx.state.alias_of(current)})" if ctx.state.alias_of(current) else ""),
        )
        return
    vm_id = ctx.vm(vm)
    found = ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/status")
    ctx.remember(vm_id)
    named = ctx.state.alias_of(vm_id)
    out.result(
        {"vm_id": vm_id, "alias": named or None, "state": found["state"]},
        f"✓ Switched to VM {vm_id}" + (f" ({named})" if named else "") + f", {found['state']}",
    )


def print_version(click_context: click.Context, _param: click.Parameter, value: bool) -> None:
    """`vers --version`: this CLI's version, and the server's when it answers (not an error when it does not)."""
    if not value or click_context.resilient_parsing:
        return
    try:
        mine = importlib.metadata.version("vers-platform")
    except importlib.metadata.PackageNotFoundError:
        mine = "unknown"
    click.echo(f"vers {mine} (CLI)")
    try:
        url = config.credentials().url
    except ConfigError as error:
        click.echo(f"server: not asked ({error})")
        click_context.exit(0)
    try:
        with contextlib.closing(ApiClient(url, timeout=5.0)) as client:
            server = client.request("GET", "/api/v1/system/version")
        click.echo(
            f"server: {server.get('executable_name') or 'orchestrator'} {server.get('workspace_version') or 'unknown'} "
            f"(git {server.get('git_hash') or 'unknown'}) at {url}"
        )
    except (ApiError, Unreachable) as error:
        why = error.message if isinstance(error, ApiError) else str(error)
        click.echo(f"server: could not reach {url} for its version: {why}")
    click_context.exit(0)


# Top-level commands.
TOP_COMMANDS: list[click.Command] = [label, resize, info, alias, checkout]
