"""`vers commit publish|unpublish|history|delete`. main.py adds the commands; this module needs nothing from it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from services.cli.governance import publish
from services.cli.output import Output, each, vers_command, when
from services.client import ApiError, seg
from services.common.ids import is_uuid

if TYPE_CHECKING:
    from services.cli.app import Context

# Top-level commands.
TOP_COMMANDS: list[click.Command] = []


def _commit_id(given: str) -> str:
    if not is_uuid(given):
        raise click.BadParameter(f"{given!r} is not a commit ID (a UUID: vers commit list shows them)", param_hint="COMMIT")
    return given


def _set_public(ctx: Context, out: Output, commit_id: str, is_public: bool) -> dict[str, Any]:
    """The commit after the change; a refusal for secrets prints its findings and exits 1."""
    waiting = "Scanning the commit for secrets…" if is_public else "Unpublishing…"
    return publish(ctx, out, f"/api/v1/commits/{seg(commit_id)}", {"is_public": is_public}, waiting)


@vers_command("publish")
@click.argument("commit", metavar="COMMIT")
def commit_publish(ctx: Context, out: Output, commit: str) -> None:
    """Make one of your commits public: any organization can then branch or restore it by ID (`vers branch
    COMMIT`, `vers run-commit COMMIT`), and `GET /api/v1/commits/public` lists it; only you can change,
    tag or delete it. The commit's memory and disk are scanned for secrets first: findings refuse it."""
    answer = _set_public(ctx, out, _commit_id(commit), True)
    out.result(answer, f"✓ Published commit {answer['commit_id']}: any organization can branch it by its ID")


@vers_command("unpublish")
@click.argument("commit", metavar="COMMIT")
def commit_unpublish(ctx: Context, out: Output, commit: str) -> None:
    """Make a public commit private again: no new branches from other organizations (the VMs they
    already made run on)."""
    answer = _set_public(ctx, out, _commit_id(commit), False)
    out.result(answer, f"✓ Commit {answer['commit_id']} is private again")


@vers_command("history")
@click.argument("source", required=False, metavar="[VM|COMMIT]")
def commit_history(ctx: Context, out: Output, source: str | None) -> None:
    """The lineage of a commit, or of the commit a VM was started from (the VM used last if none is given),
    newest first: each commit and the one its VM was started from, as far as you may see them."""
    commit_id = _lineage_start(ctx, source)
    chain = ctx.call("GET", f"/api/v1/vm/commits/{seg(commit_id)}/parents")  # a list (the SDK's shape)
    rows = [
        [c["id"], c.get("name") or "-", when(c.get("created_at")), c.get("parent_vm_id") or "-", "yes" if c.get("is_public") else "no"]
        for c in chain
    ]  # fmt: skip
    out.table(chain, ["COMMIT", "NAME", "CREATED", "FROM VM", "PUBLIC"], rows, f"No commits in the lineage of {commit_id}.")


def _lineage_start(ctx: Context, source: str | None) -> str:
    """A commit ID as it is; a VM (alias, ID, ID prefix, or the one used last): the commit it was started from."""
    if source and is_uuid(source) and source not in ctx.state.aliases:
        try:
            metadata = ctx.call("GET", f"/api/v1/vm/{seg(source)}/metadata")
        except ApiError as error:
            if error.status != 404:
                raise
            return source  # not a VM of yours: a commit
    else:
        metadata = ctx.call("GET", f"/api/v1/vm/{seg(ctx.vm(source))}/metadata")
    if not metadata.get("parent_commit_id"):
        raise click.ClickException(f"VM {metadata['vm_id']} was not started from a commit: it has no history yet (vers commit makes one)")
    return str(metadata["parent_commit_id"])


@vers_command("delete")
@click.argument("commits", nargs=-1, required=True, metavar="COMMIT...")
def commit_delete(ctx: Context, out: Output, commits: tuple[str, ...]) -> None:
    """Delete commits of yours, each on its own: a commit a VM stands on, or a tag names, stays (the reason
    is printed), and the exit code is 1 if any stayed."""
    ids = tuple(_commit_id(given) for given in dict.fromkeys(commits))
    each(out, ids, lambda commit_id: ctx.call("DELETE", f"/api/v1/commits/{seg(commit_id)}"), "Deleted commit {}")


# Subcommands of `vers commit`.
COMMIT_COMMANDS: list[click.Command] = [commit_publish, commit_unpublish, commit_history, commit_delete]
