"""Baking a supported image: build its root disk, boot it as a VM, check its toolchain answers, commit the
running VM, and publish it as `vers/<name>` with a dated tag, then move `latest`.

Everything after the disk goes through the REST API as the `vers` organization, as any publisher would.
The dated tag is created before `latest` moves, so a bake that fails anywhere leaves `latest` where it was.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from services.bake.disk import Sources, build_image
from services.bake.errors import BakeError, Log
from services.bake.recipes import Recipe
from services.client import ApiClient, ApiError, Unreachable
from services.orchestrator.images import register


@dataclass(frozen=True)
class Baked:
    name: str
    commit_id: str
    dated_tag: str
    versions: dict[str, str]


def _versions(client: ApiClient, vm_id: str, recipe: Recipe) -> dict[str, str]:
    found = {}
    for label, command in recipe.versions.items():
        result = client.request("POST", f"/api/v1/vm/{vm_id}/exec", json={"command": ["sh", "-c", command], "timeout_secs": 120})
        if result["exit_code"] != 0:
            raise BakeError(f"`{command}` exited {result['exit_code']} in the baked VM: {(result['stderr'] or result['stdout']).strip()}")
        printed = (result["stdout"].strip() or result["stderr"].strip()).splitlines()  # some tools print it on stderr
        found[label] = printed[0] if printed else ""
    return found


def describe(recipe: Recipe, manifest: dict[str, object], versions: dict[str, str], day: str) -> str:
    debian = manifest.get("debian", {})
    npm = manifest.get("npm", {})
    assert isinstance(debian, dict) and isinstance(npm, dict)
    parts = [f"vers/{recipe.name} baked {day} from Debian {manifest['suite']}: {recipe.summary}."]
    parts.append("Versions: " + "; ".join(f"{label}: {text}" for label, text in versions.items()) + ".")
    parts.append("Debian packages: " + ", ".join(f"{name} {version}" for name, version in sorted(debian.items())) + ".")
    if npm:
        parts.append("npm packages: " + ", ".join(f"{name}@{version}" for name, version in sorted(npm.items())) + ".")
    return " ".join(parts)


def _commit_image(client: ApiClient, recipe: Recipe, folder: Path, day: str, log: Log) -> tuple[str, dict[str, str]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    log(f"booting {recipe.name}")
    vm_id = client.request(
        "POST",
        "/api/v1/vm/new_root",
        params={"wait_boot": "true"},
        json={"vm_config": {"image_name": folder.name, "mem_size_mib": recipe.mem_size_mib}},
    )["vm_id"]
    try:
        versions = _versions(client, vm_id, recipe)
        log("committing: " + "; ".join(versions.values()))
        # what the guest wrote, on its disk: the commit's disk alone is then a complete file system
        client.request("POST", f"/api/v1/vm/{vm_id}/exec", json={"command": ["sync"], "timeout_secs": 120})
        body = {"name": f"{recipe.name} {day}", "description": describe(recipe, manifest, versions, day)}
        commit_id = client.request("POST", f"/api/v1/vm/{vm_id}/commit", json=body)["commit_id"]
    finally:
        with contextlib.suppress(ApiError, Unreachable):
            client.request("DELETE", f"/api/v1/vm/{vm_id}")
    return commit_id, versions


def _publish(client: ApiClient, recipe: Recipe, commit_id: str, day: str, summary: str) -> str:
    """`vers/<name>` public, a new dated tag on the commit, then `latest` moved to it; the dated tag's name."""
    try:
        client.request("GET", f"/api/v1/repositories/{recipe.name}")
    except ApiError as error:
        if error.status != 404:
            raise
        try:
            client.request("POST", "/api/v1/repositories", json={"name": recipe.name, "description": recipe.summary})
        except ApiError as race:
            if race.status != 409:
                raise
    client.request("PATCH", f"/api/v1/repositories/{recipe.name}/visibility", json={"is_public": True})
    existing = {tag["tag_name"] for tag in client.request("GET", f"/api/v1/repositories/{recipe.name}/tags")["tags"]}
    counter = 1
    while True:
        dated = day if counter == 1 else f"{day}.{counter}"
        counter += 1
        if dated in existing:
            continue
        try:
            body = {"tag_name": dated, "commit_id": commit_id, "description": summary}
            client.request("POST", f"/api/v1/repositories/{recipe.name}/tags", json=body)
            break
        except ApiError as error:
            if error.status != 409:  # another bake took this name meanwhile: take the next
                raise
    _scan(client, recipe, dated)
    if "latest" in existing:
        client.request("PATCH", f"/api/v1/repositories/{recipe.name}/tags/latest", json={"commit_id": commit_id})
    else:
        client.request("POST", f"/api/v1/repositories/{recipe.name}/tags", json={"tag_name": "latest", "commit_id": commit_id})
    return dated


def _scan(client: ApiClient, recipe: Recipe, dated: str) -> None:
    """Published again, so the secret scan reads the new commit now, not at someone's first fork; with findings
    the dated tag goes again (nobody could fork it meanwhile: a fork of an unscanned commit scans it first) and
    the bake fails, saying what was found where."""
    try:
        client.request("PATCH", f"/api/v1/repositories/{recipe.name}/visibility", json={"is_public": True})
    except ApiError as error:
        findings = error.body.get("findings")
        if not findings:
            raise
        with contextlib.suppress(ApiError, Unreachable):
            client.request("DELETE", f"/api/v1/repositories/{recipe.name}/tags/{dated}")
        where = "; ".join(f"{f['rule']} in {f['where']} {f.get('path') or f.get('offset')}" for f in findings[:10])
        raise BakeError(f"vers/{recipe.name}: the secret scan found {len(findings)} secret(s) in the new commit: {where}") from None


def bake(client: ApiClient, recipe: Recipe, image_root: Path, sources: Sources, log: Log, day: datetime.date | None = None) -> Baked:
    day = day or datetime.datetime.now(datetime.UTC).date()
    folder = build_image(recipe, image_root, sources, log, day)
    try:
        commit_id, versions = _commit_image(client, recipe, folder, day.isoformat(), log)
        dated = _publish(client, recipe, commit_id, day.isoformat(), "; ".join(f"{tool} {text}" for tool, text in versions.items()))
    except BaseException:
        register(image_root, {}, remove=(folder.name,))
        raise
    # `vers run --image <name>` boots what vers/<name>:latest was baked from, never a disk that failed
    register(image_root, {recipe.name: folder}, remove=(folder.name,))
    return Baked(recipe.name, commit_id, dated, versions)
