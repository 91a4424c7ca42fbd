"""The reference shapes the CLI accepts: `org/repo` and `org/repo:tag` for other organizations' public repositories."""

from __future__ import annotations

import click


def split_org(name: str) -> tuple[str, str]:
    """`org/repo` → ("org", "repo"); `repo` → ("", "repo")."""
    org, slash, repo = name.partition("/")
    if not slash:
        return "", name
    if not org or not repo or "/" in repo:
        raise click.BadParameter(f"{name!r} is neither REPO nor ORG/REPO")
    return org, repo


def parse_public_ref(reference: str) -> tuple[str, str, str]:
    """`org/repo:tag` → its three parts, or a usage error that shows the shape."""
    path, colon, tag = reference.partition(":")
    org, repo = split_org(path) if colon else ("", "")
    if not (org and repo and tag):
        raise click.BadParameter(f"{reference!r} is not ORG/REPO:TAG (e.g. vers/python:latest)", param_hint="ORG/REPO:TAG")
    return org, repo, tag
