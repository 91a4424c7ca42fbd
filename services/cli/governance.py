"""`vers` commands for a registry's governance: repository policies (immutable tags, retention), the
organization's retention rule, garbage collection, the audit log, and the secret scan's refusal to publish.
main.py adds the commands to its groups; this module needs nothing from it."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from services.cli.output import Output, progress, size, vers_command, when
from services.client import ApiError, seg

if TYPE_CHECKING:
    from services.cli.app import Context

# The largest page the audit listing answers.
AUDIT_PAGE_SIZE = 1000


# --- repository policies --------------------------------------------------------------------------


FINDING_COLUMNS = ["COMMIT", "WHERE", "PATH OR OFFSET", "RULE", "EXCERPT"]


def retention_options(function: Any) -> Any:
    """--keep-last, --keep-tag and --untagged-days, as `repo create` and `repo policy` take them."""
    for option in reversed(
        [
            click.option(
                "--keep-last",
                type=click.IntRange(0),
                default=None,
                metavar="N",
                help="Keep the last N commits each tag pointed at; 0 turns the rule off.",
            ),
            click.option(
                "--keep-tag",
                "keep_tags",
                multiple=True,
                metavar="PATTERN",
                help="Tags matching PATTERN (shell-style, e.g. 'release-*') keep every commit they pointed at; repeatable.",
            ),
            click.option(
                "--untagged-days",
                type=click.IntRange(0),
                default=None,
                metavar="DAYS",
                help="Delete commits the repository's tags once named and none names now, once older than DAYS; 0 turns it off.",
            ),
        ]
    ):
        function = option(function)
    return function


def immutable_option(function: Any) -> Any:
    return click.option(
        "--immutable-tag",
        "immutable_tags",
        multiple=True,
        metavar="PATTERN",
        help="Tags matching PATTERN (shell-style, e.g. 'v*') cannot be moved or deleted once made; repeatable.",
    )(function)


def retention_given(
    keep_last: int | None, keep_tags: tuple[str, ...], untagged_days: int | None, no_keep_tags: bool = False
) -> dict[str, Any]:
    """The retention fields the command line set, and only those."""
    if keep_tags and no_keep_tags:
        raise click.UsageError("--keep-tag and --no-keep-tags contradict each other: give one")
    given: dict[str, Any] = {}
    if keep_last is not None:
        given["keep_last"] = keep_last
    if keep_tags or no_keep_tags:
        given["keep_tags"] = list(keep_tags)
    if untagged_days is not None:
        given["untagged_older_than_days"] = untagged_days
    return given


def policy_fields(repository: dict[str, Any]) -> list[tuple[str, Any]]:
    """A repository's immutable tags and retention rules as `Name: value` pairs."""
    retention = repository.get("retention") or {}
    keep_last = int(retention.get("keep_last") or 0)
    days = int(retention.get("untagged_older_than_days") or 0)
    return [
        ("Immutable tags", ", ".join(repository.get("immutable_tags") or []) or "none"),
        ("Keep last", f"{keep_last} commit{'s' if keep_last != 1 else ''} per tag" if keep_last else "off"),
        ("Keep tags", ", ".join(retention.get("keep_tags") or []) or "off"),
        ("Untagged after", f"{days} day{'s' if days != 1 else ''}" if days else "off"),
    ]


@vers_command("policy")
@click.argument("name")
@immutable_option
@click.option("--no-immutable-tags", is_flag=True, help="Remove every immutable tag pattern.")
@retention_options
@click.option("--no-keep-tags", is_flag=True, help="Remove every --keep-tag pattern.")
def repo_policy(
    ctx: Context,
    out: Output,
    name: str,
    immutable_tags: tuple[str, ...],
    no_immutable_tags: bool,
    keep_last: int | None,
    keep_tags: tuple[str, ...],
    untagged_days: int | None,
    no_keep_tags: bool,
) -> None:
    """A repository's immutable tags and retention rules: change the ones given (the others stay), or with
    no option print them. `vers gc --dry-run` shows what the rules would delete."""
    if immutable_tags and no_immutable_tags:
        raise click.UsageError("--immutable-tag and --no-immutable-tags contradict each other: give one")
    retention = retention_given(keep_last, keep_tags, untagged_days, no_keep_tags)
    path = f"/api/v1/repositories/{seg(name)}"
    body: dict[str, Any] = {}
    if immutable_tags or no_immutable_tags:
        body["immutable_tags"] = {"patterns": list(immutable_tags)}
    if retention:
        # The rules travel as one message whose fields have no "left out": fill in the ones not given.
        current = ctx.call("GET", path).get("retention") or {}
        body["retention"] = {"keep_last": 0, "keep_tags": [], "untagged_older_than_days": 0, **current, **retention}
    if not body:
        found = ctx.call("GET", path)
        out.fields(found, [("Repository", found["name"]), *policy_fields(found)])
        return
    changed = ctx.call("PATCH", f"{path}/policy", json=body)
    out.fields(changed, [("Repository", changed["name"]), *policy_fields(changed)], f"✓ Updated the policy of {changed['name']}")


# --- publishing -----------------------------------------------------------------------------------


def set_visibility(ctx: Context, out: Output, name: str, is_public: bool, force: bool) -> dict[str, Any]:
    """The repository after the change; a refusal for secrets prints its findings and exits 1."""
    body = {"is_public": is_public, "force": force}
    waiting = "Scanning the commits for secrets…" if is_public else "Changing the visibility…"
    return publish(ctx, out, f"/api/v1/repositories/{seg(name)}/visibility", body, waiting)


def publish(ctx: Context, out: Output, path: str, body: dict[str, Any], waiting: str) -> dict[str, Any]:
    """PATCH a visibility (a repository's, a commit's): the answer; a refusal for secrets prints its findings
    as a table (or the error's JSON body) and exits 1."""
    try:
        with progress(waiting):
            return ctx.call("PATCH", path, json=body)
    except ApiError as error:
        if not error.body.get("findings"):
            raise
        if out.json:
            out.result(error.body)
            sys.exit(1)
        out.table(error.body, FINDING_COLUMNS, [_finding_row(f) for f in error.body["findings"]], "")
        raise click.ClickException(f"{error.message} (HTTP {error.status})") from None


def _finding_row(finding: dict[str, Any]) -> list[str]:
    offset = int(finding.get("offset") or 0)
    place = f"offset {offset:#x}" if finding.get("where") == "memory" else finding.get("path") or f"offset {offset:#x}"
    excerpt = finding.get("excerpt", "").replace("\r", "\\r").replace("\n", "\\n")  # one line per finding
    return [finding.get("commit_id", ""), finding.get("where", ""), place, finding.get("rule", ""), excerpt]


# --- retention and garbage collection -------------------------------------------------------------


@vers_command("retention")
@click.option(
    "--untagged-days",
    type=click.IntRange(0),
    default=None,
    metavar="DAYS",
    help="Delete commits no tag or legacy tag names once older than DAYS; 0 keeps them.",
)
def retention(ctx: Context, out: Output, untagged_days: int | None) -> None:
    """Your organization's rule for commits no tag names, wherever they came from: set it with
    --untagged-days, or print it. `vers gc` (or the platform's scheduled run) applies it."""
    if untagged_days is None:
        answer = ctx.call("GET", "/api/v1/retention")
        done: tuple[str, ...] = ()
    else:
        answer = ctx.call("PATCH", "/api/v1/retention", json={"retention": {"untagged_older_than_days": untagged_days}})
        done = ("✓ Updated your organization's retention rule",)
    days = int(answer.get("untagged_older_than_days") or 0)
    rule = f"deleted once older than {days} day{'s' if days != 1 else ''}" if days else "kept (no rule)"
    out.fields(answer, [("Untagged commits", rule)], *done)


@vers_command("gc")
@click.option("--dry-run", is_flag=True, help="List what would be deleted and the space it frees; delete nothing.")
def gc(ctx: Context, out: Output, dry_run: bool) -> None:
    """Apply the retention rules now (each repository's, `vers repo policy`, and the organization's,
    `vers retention`): delete the commits they let go that no tag, legacy tag or VM needs, and the disk
    layers nothing else uses."""
    with progress("Looking for what retention lets go…" if dry_run else "Collecting garbage…"):
        answer = ctx.call("POST", "/api/v1/gc", json={"dry_run": dry_run})
    commits = [{**c, "bytes_freed": int(c.get("bytes_freed") or 0)} for c in answer.get("commits") or []]
    answer = {**answer, "dry_run": bool(answer.get("dry_run")), "commits": commits, "bytes_freed": int(answer.get("bytes_freed") or 0)}
    if out.json:
        out.result(answer)
        return
    rows = [
        [c["commit_id"], c.get("name") or "-", c.get("reason") or "-", when(c.get("created_at")), size(c["bytes_freed"])] for c in commits
    ]
    count = f"{len(commits)} commit{'s' if len(commits) != 1 else ''}"
    if dry_run:
        summary = f"Would delete {count} and free {size(answer['bytes_freed'])} (dry run: nothing was deleted)"
    else:
        summary = f"✓ Deleted {count}, freed {size(answer['bytes_freed'])}"
    nothing = "Nothing to collect: no commit falls under a retention rule" + (" (dry run: nothing was deleted)." if dry_run else ".")
    out.table(answer, ["COMMIT", "NAME", "REASON", "CREATED", "FREES"], rows, nothing)
    if rows:
        click.echo(summary)


# --- audit log ------------------------------------------------------------------------------------

_AGO = re.compile(r"\A(?P<count>\d+)(?P<unit>[smhdw])\Z")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def since_time(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    """--since as the API takes it (RFC 3339, UTC): a time (`2026-11-27T09:00`, `2026-11-27`, local unless
    it says its zone) or a span back from now (`90m`, `12h`, `7d`, `2w`)."""
    if not value:
        return ""
    ago = _AGO.match(value.strip())
    if ago:
        moment = datetime.now(UTC) - timedelta(**{_UNITS[ago["unit"]]: int(ago["count"])})
    else:
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is neither a time (2026-11-27T09:00, 2026-11-27) nor a span back from now (90m, 12h, 7d, 2w)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.astimezone()
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@vers_command("audit")
@click.option(
    "--since", callback=since_time, metavar="TIME", help="Only changes at or after TIME: 2026-11-27T09:00, 2026-11-27, or 12h, 7d ago."
)
@click.option(
    "--type", "type_", default="", metavar="TYPE", help="Only changes of this type (tag.move), or of this family without a dot (tag)."
)
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, metavar="N", help="At most this many changes.")
def audit(ctx: Context, out: Output, since: str, type_: str, limit: int) -> None:
    """Your organization's audit log, oldest first: every change to its repositories, tags, commits and
    API keys, with the key that made it (`-` for the platform's scheduled runs) and the state before and after."""
    params = {name: value for name, value in (("since", since), ("type", type_)) if value}
    events: list[dict[str, Any]] = []
    token = ""
    while len(events) < limit:
        page_params = {**params, "page_size": min(limit - len(events), AUDIT_PAGE_SIZE), **({"page_token": token} if token else {})}
        page = ctx.call("GET", "/api/v1/audit", params=page_params)
        events.extend(page.get("events") or [])
        token = page.get("next_page_token") or ""
        if not token:
            break
    events = events[:limit]
    rows = [[when(e.get("at")), e.get("type", ""), e.get("target") or "-", e.get("api_key_id") or "-", _change(e)] for e in events]
    out.table(
        {"events": events, "next_page_token": token},
        ["TIME", "TYPE", "TARGET", "KEY", "BEFORE → AFTER"],
        rows,
        "No changes recorded" + (" that match." if params else "."),
    )
    if token and not out.json:
        click.echo(f"(the first {len(events)}; --limit or --since for more)")


def _change(event: dict[str, Any]) -> str:
    """What an event changed, on one line: the fields that differ (`retention.keep_last: 5 → 3`) when both
    states describe the same thing, or else both states whole (`- → {...}` for a creation)."""
    before, after = _state(event.get("before")), _state(event.get("after"))
    if isinstance(before, dict) and isinstance(after, dict) and before.keys() & after.keys():
        old, new = _flat(before), _flat(after)
        changed = [
            f"{name}: {_compact(old[name]) if name in old else '-'} → {_compact(new[name]) if name in new else '-'}"
            for name in sorted(old.keys() | new.keys())
            if old.get(name, ...) != new.get(name, ...)
        ]
        return "; ".join(changed) or "(no change)"
    if before is None and after is None:
        return "-"
    return f"{'-' if before is None else _compact(before)} → {'-' if after is None else _compact(after)}"


def _state(text: str | None) -> Any:
    """A state's JSON decoded; None when there is none, the text itself when it is not JSON."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _flat(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested fields as dotted names: {"retention": {"keep_last": 5}} is {"retention.keep_last": 5}."""
    flat: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _compact(value: Any) -> str:
    """A value as short as JSON writes it; a string as it is."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# What main.py adds: to `vers repo`, and to `vers` itself.
REPO_COMMANDS = (repo_policy,)
TOP_COMMANDS = (retention, gc, audit)
