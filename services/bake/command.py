"""`vers admin images bake`: bake supported images, one after the other, through a platform's API with the
caller's key (the `vers` organization's publishes them as vers/<name>); each result or failure reported."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.bake.disk import Sources
from services.bake.errors import BakeError
from services.bake.pipeline import bake
from services.bake.recipes import RECIPES, recipe
from services.client import ApiClient, ApiError
from services.common.settings import Settings

Echo = Callable[[str], None]


def cache_folder() -> Path:
    """Where bakes on this machine keep Debian packages and their builds' manifests: VERS_BAKE_CACHE, else
    vers/bake in the user's cache folder (XDG_CACHE_HOME, ~/.cache)."""
    if folder := os.environ.get("VERS_BAKE_CACHE"):
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vers" / "bake"


def unknown_names(names: tuple[str, ...]) -> str:
    """What is wrong with the names asked for ("" when each names a recipe)."""
    unknown = [name for name in names if name not in RECIPES]
    return f"no supported image {', '.join(unknown)}; there are: {', '.join(RECIPES)}" if unknown else ""


def _prefixed(err: Echo, name: str) -> Echo:
    return lambda line: err(f"{name}: {line}")


def run(client: ApiClient, names: tuple[str, ...], extra: tuple[str, ...], echo: Echo, err: Echo) -> list[dict[str, Any]]:
    """Bake each named image (all when none), with `extra` Debian packages; one result each, with "error"
    for a bake that failed (it moved no tag). `echo` gets the summary of each success, `err` the progress
    (`name: line`) and each failure. The Debian suite and archives come from the VERS_IMAGE_SUITE,
    VERS_DEBIAN_MIRROR, VERS_DEBIAN_SECURITY_MIRROR and VERS_NPM_REGISTRY settings of this machine."""
    settings = Settings()
    sources = Sources(settings.image_suite, settings.debian_mirror, settings.debian_security_mirror, settings.npm_registry)
    results: list[dict[str, Any]] = []
    for name in names or tuple(RECIPES):
        try:
            baked = bake(client, recipe(name, extra), cache_folder(), sources, _prefixed(err, name))
        except (BakeError, ApiError) as error:
            results.append({"name": name, "error": str(error.message if isinstance(error, ApiError) else error)})
            err(f"Error: baking {name}: {results[-1]['error']} (latest not moved)")
            continue
        results.append({"name": name, "commit_id": baked.commit_id, "dated_tag": baked.dated_tag, "versions": baked.versions})
        echo(f"✓ Baked vers/{name}:latest → {baked.commit_id}")
        echo(f"  Dated:    vers/{name}:{baked.dated_tag}")
        echo(f"  Versions: {'; '.join(f'{tool}: {text}' for tool, text in baked.versions.items())}")
    return results
