"""`vers repo`: repositories, their tags (`vers repo tag`) and forks of public ones."""

from __future__ import annotations

from typing import Any

import click

from services.cli import governance
from services.cli.app import Context, alias_option, command
from services.cli.output import Output, each, progress, when
from services.cli.refs import parse_public_ref, split_org
from services.client import seg


@click.group("repo")
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


TOP_COMMANDS: list[click.Command] = [repo]
