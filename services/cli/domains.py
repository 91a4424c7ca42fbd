"""`vers domain`: names under the platform's domain suffix that reach a port of a VM."""

from __future__ import annotations

from typing import Any

import click

from services.cli.app import Context, command
from services.cli.output import Output, each, when
from services.client import ApiError, seg


@click.group("domain")
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


TOP_COMMANDS: list[click.Command] = [domain]
