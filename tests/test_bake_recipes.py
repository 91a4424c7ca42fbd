"""The parts of a bake that need no Debian archive: recipes, the Node.js LTS rule, npm integrity."""

from __future__ import annotations

import base64
import datetime
import hashlib

import pytest

from services.bake import upstream
from services.bake.errors import BakeError
from services.bake.recipes import COMMON_PACKAGES, RECIPES, recipe
from services.bake.upstream import NpmPackage, node_lts_major


def test_the_documented_images_exist_with_the_documented_basics() -> None:
    assert set(RECIPES) == {"debian", "node", "python", "rust", "go", "pi-agent", "cc-agent"}
    assert "openssh-server" in COMMON_PACKAGES
    assert {"git", "curl", "nginx", "iproute2"} <= set(COMMON_PACKAGES)
    assert RECIPES["pi-agent"].npm == ("@mariozechner/pi-coding-agent",)
    assert RECIPES["cc-agent"].npm == ("@anthropic-ai/claude-code",)
    assert all(r.node for r in RECIPES.values() if r.npm), "npm tools need the registry's Node.js"


def test_extra_packages_are_added_to_a_copy() -> None:
    assert recipe("python", ("htop",)).packages[-1] == "htop"
    assert "htop" not in RECIPES["python"].packages
    with pytest.raises(KeyError, match="no supported image 'ruby'"):
        recipe("ruby")


@pytest.mark.parametrize(
    ("day", "major"),
    [("2023-10-24", 20), ("2024-04-30", 20), ("2024-10-29", 22), ("2025-09-30", 22), ("2025-10-28", 24), ("2026-11-27", 26)],
)
def test_node_lts_line_follows_the_release_policy(day: str, major: int) -> None:
    assert node_lts_major(datetime.date.fromisoformat(day)) == major


def test_a_tarball_that_does_not_match_its_integrity_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    good = b"the real tarball"
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(good).digest()).decode()
    package = NpmPackage("tool", "1.0.0", "https://registry.example/tool-1.0.0.tgz", integrity)

    class Answer:
        def __init__(self, content: bytes) -> None:
            self.content = content

    monkeypatch.setattr(upstream, "_get", lambda url, **_: Answer(good))
    assert upstream.fetch_verified(package) == good
    monkeypatch.setattr(upstream, "_get", lambda url, **_: Answer(b"something else"))
    with pytest.raises(BakeError, match="does not match its registry integrity"):
        upstream.fetch_verified(package)
