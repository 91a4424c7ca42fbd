"""`vers admin`: organizations, supported images and consistency checks, with the platform's administrator key."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from click_default_group import DefaultGroup

from services.cli.app import LIMIT_LABELS, Context, command
from services.cli.output import Output
from services.client import ApiClient, seg


def _data_dir() -> Path:
    return Path(os.environ.get("VERS_DATA_DIR", ".vers"))


@contextlib.contextmanager
def _admin_client(ctx: Context) -> Iterator[ApiClient]:
    key_file = _data_dir() / "admin.key"
    if not key_file.exists():
        raise click.ClickException(f"no administrator key at {key_file}: run this on the platform's machine with its VERS_DATA_DIR")
    with contextlib.closing(ApiClient(ctx.credentials.url, key_file.read_text().strip())) as client:
        yield client


@click.group()
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
        help=f"{LIMIT_LABELS[name]}; -1 puts back the platform's default.",
    )


def _limit_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for name in reversed(LIMIT_LABELS):
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
    out.fields(answer, [("Organization", answer["org"]["name"]), *((LIMIT_LABELS[name], answer["limits"][name]) for name in LIMIT_LABELS)])


@admin.group("images")
def admin_images() -> None:
    """Supported images: vers/node, python, rust, go, pi-agent, cc-agent."""


@command(admin_images, "bake")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@click.option("--extra-package", "extra", multiple=True, metavar="PKG", help="Another Debian package for this bake; repeatable.")
def admin_images_bake(ctx: Context, out: Output, names: tuple[str, ...], extra: tuple[str, ...]) -> None:
    """Build, boot, commit and publish supported images (all when no NAME is given) as vers/NAME:latest
    and vers/NAME:<date>, through the platform's API with your key (VERS_URL/VERS_API_KEY or `vers login`;
    the `vers` organization's key publishes them). Needs root here (debootstrap); the platform may run
    elsewhere. A failed bake moves no tag."""
    from services.bake.command import run, unknown_names

    if problem := unknown_names(names):
        raise click.BadParameter(problem, param_hint="NAME")
    # SIGTERM (a CI job cancelled) unwinds like Ctrl-C, so mounts in the scratch root are undone.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def quiet(line: str) -> None:
        """With --format json the answer says it all."""

    def progress(line: str) -> None:
        click.echo(line, err=True)

    results = run(ctx.client, names, extra, quiet if out.json else click.echo, progress)
    if out.json:
        out.result({"results": results})
    if any("error" in result for result in results):
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


TOP_COMMANDS: list[click.Command] = [admin]


@admin.group("hosts", cls=DefaultGroup, default="list", default_if_no_args=True)
def admin_hosts() -> None:
    """The VM hosts (with the administrator's key as the caller's: `vers login` with it, or VERS_API_KEY)."""


@command(admin_hosts, "list")
def admin_hosts_list(ctx: Context, out: Output) -> None:
    """Every host and its room, as of its last heartbeat."""
    answer = ctx.client.request("GET", "/api/v1/admin/hosts")
    rows = [
        [
            host["host_id"],
            host["state"],
            host["address"],
            host.get("accelerator", ""),
            str(host["room"].get("vm_count", 0)),
            f"{host['room'].get('memory_free_mib', '0')} / {host['room'].get('memory_total_mib', '0')}",
            str(host["room"].get("disk_free_mib", "0")),
            host.get("heartbeat_at", ""),
        ]
        for host in answer.get("hosts", [])
    ]
    columns = ["HOST", "STATE", "ADDRESS", "ACCEL", "VMS", "MEMORY FREE / TOTAL (MiB)", "DISK FREE (MiB)", "LAST HEARTBEAT"]
    out.table(answer, columns, rows, "No hosts.")


@command(admin_hosts, "remove")
@click.argument("host")
def admin_hosts_remove(ctx: Context, out: Output, host: str) -> None:
    """Forget a dead host that is not coming back: the VMs asleep on it become dead (then deletable)."""
    answer = ctx.client.request("DELETE", f"/api/v1/admin/hosts/{seg(host)}")
    dead = answer.get("dead_vm_ids", [])
    out.result(answer, f"Removed host {host}" + (f"; its sleeping VMs are dead: {', '.join(dead)}" if dead else ""))
