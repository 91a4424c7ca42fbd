"""The secret scan looks for the owning org's own environment variable values (rule org-env-var): on a
synthetic memory file (found once however many copies, excerpt redacted, short and plain values not looked
for, values escaped, the kept result's version following the set of values), and on a real VM whose
/etc/environment holds the org's database URL: publishing its commit is refused until the variable is gone."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
import pytest_asyncio

from services.orchestrator.secrets import LITERAL_BYTES, LITERAL_RULE, RULES_VERSION, org_literals, scan_commit, scan_version
from tests.conftest import Org, Platform
from tests.test_vms import new_vm, out

pytestmark = pytest.mark.vm

MIB = 1 << 20
DB_URL = "postgres://app:Sup3rS3cret@db/prod"
# Regex syntax and non-ASCII in a value: looked for as it is, not as a pattern.
ESCAPED = "p@ss.w*rd(1)+[é]|^$"
# A provider-format token set as a variable: one finding, as the org's variable.
TOKEN = "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5"
LONG = "".join(random.Random(1).choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", k=8192))


def memory_file(folder: Path, placed: dict[int, bytes]) -> Path:
    """Random bytes with the given bytes at the given offsets."""
    data = bytearray(random.Random(7).randbytes(8 * MIB))
    for offset, text in placed.items():
        data[offset : offset + len(text)] = text
    path = folder / "ram"
    path.write_bytes(bytes(data))
    return path


async def test_the_org_values_are_found_redacted_and_keyed(tmp_path: Path) -> None:
    variables = {
        "DB_URL": DB_URL, "ESCAPED": ESCAPED, "GITHUB_TOKEN": TOKEN, "CERT": LONG,
        "DEBUG": "1", "FLAG": "true", "SEVEN": "Ab3defg",  # too short to mean anything
        "NODE_ENV": "production", "PATH_EXTRA": "/usr/local/sbin",  # plain configuration
        "ADMIN_PASSWORD": "correcthorsebattery",  # plain, but named a secret
    }  # fmt: skip
    literals = org_literals(variables)
    assert literals == sorted({DB_URL.encode(), ESCAPED.encode(), TOKEN.encode(), LONG.encode()[:LITERAL_BYTES], b"correcthorsebattery"})
    near_miss = ESCAPED.replace(".", "X").replace("*", "Y").encode()
    path = memory_file(tmp_path, {
        1000: b"DB_URL=" + DB_URL.encode() + b"\x00", 3 * MIB: DB_URL.encode(), 5 * MIB + 17: DB_URL.encode(),  # one secret, three copies
        2 * MIB: ESCAPED.encode(), 2 * MIB + 4096: near_miss,
        4 * MIB: b"GITHUB_TOKEN=" + TOKEN.encode(), 6 * MIB + 3: LONG.encode(), 7 * MIB: b"correcthorsebattery",
        7 * MIB + 100: b"Ab3defg production /usr/local/sbin",
    })  # fmt: skip

    found = await scan_commit([path], [], None, [], literals)
    by_offset = {f.offset: f for f in found}
    assert {f.rule for f in found} == {LITERAL_RULE}, found
    # the first copy only; each value's, the escaped one exactly (not the near miss), the long one by its start
    assert sorted(by_offset) == [1007, 2 * MIB, 4 * MIB + 13, 6 * MIB + 3, 7 * MIB], found
    assert all(f.where == "memory" and f.path == "" for f in found)
    for finding, value in zip(
        [by_offset[o] for o in sorted(by_offset)], [DB_URL, ESCAPED, TOKEN, LONG, "correcthorsebattery"], strict=True
    ):
        # a few of the value's first characters, no more; never the rest (the password in the URL)
        shown = finding.excerpt.rstrip("*")
        assert finding.excerpt.endswith("*" * 8) and len(shown) <= 8 and value.startswith(shown), finding
    assert "Sup3r" not in by_offset[1007].excerpt

    # without the org's values the same memory holds only the token a provider rule knows
    assert [(f.rule, f.offset) for f in await scan_commit([path], [], None, [])] == [("github-token", 4 * MIB + 13)]

    # the version the result is kept under: the rules' alone without values; with values, a digest of the
    # whole set under the platform's key, in any order, that any change of the set (or another key) changes
    key = b"k" * 32
    assert scan_version([], key) == RULES_VERSION
    version = scan_version(literals, key)
    assert version.startswith(RULES_VERSION + "+" + LITERAL_RULE + "-") and version != RULES_VERSION
    assert scan_version(list(reversed(literals)), key) == version
    assert scan_version(org_literals({**variables, "DEBUG": "0", "NODE_ENV": "staging"}), key) == version  # not looked for
    assert scan_version(org_literals({**variables, "DB_URL": DB_URL + "2"}), key) != version
    assert scan_version(org_literals({k: v for k, v in variables.items() if k != "ESCAPED"}), key) != version
    assert scan_version(literals, b"another platform") != version
    assert not any(part in version for part in ("Sup3r", "correct", "p@ss"))


def scan_versions(platform: Platform, commit_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(platform.settings.data_dir / "orchestrator.db") as db:
        return db.execute(
            "SELECT rules_version, findings FROM secret_scans WHERE commit_id = ? ORDER BY scanned_at", (commit_id,)
        ).fetchall()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def org_with_vars(platform: Platform) -> Org:
    return await platform.new_org("env-secrets")


async def test_a_commit_holding_an_org_value_is_not_published_until_the_value_is_gone(platform: Platform, org_with_vars: Org) -> None:
    async with platform.client(org_with_vars) as http:
        assert (await http.put("/api/v1/env_vars", json={"vars": {"DB_URL": DB_URL}})).status_code == 200
        vm = await new_vm(http, mem_size_mib=128)
        try:
            assert DB_URL in await out(http, vm, "cat /etc/environment; sync")
            made = await http.post(f"/api/v1/vm/{vm}/commit", json={"name": "with-db-url"})
            assert made.status_code == 201, made.text
            commit = made.json()["commit_id"]
        finally:
            assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200

        refused = await http.patch(f"/api/v1/commits/{commit}", json={"is_public": True})
        assert refused.status_code == 409, refused.text
        assert LITERAL_RULE in refused.json()["error"] and "Sup3r" not in refused.text
        ours = [f for f in refused.json()["findings"] if f["rule"] == LITERAL_RULE]
        assert ours and all(f["commit_id"] == commit and f["excerpt"].endswith("*" * 8) for f in ours), ours
        # the memory's many copies (every process's environment) count once per memory file
        assert len([f for f in ours if f["where"] == "memory"]) <= 2, ours
        assert all(f["path"] == "/etc/environment" for f in ours if f["where"] == "disk"), ours
        assert (await http.get(f"/api/v1/commits/{commit}")).json()["is_public"] is False

        # a value too short to be looked for leaves the kept result as it is: no second scan
        assert (await http.put("/api/v1/env_vars", json={"vars": {"DEBUG": "1"}})).status_code == 200
        assert (await http.patch(f"/api/v1/commits/{commit}", json={"is_public": True})).status_code == 409
        [(version, _)] = scan_versions(platform, commit)
        assert version.startswith(RULES_VERSION + "+" + LITERAL_RULE + "-")

        # the variable deleted: scanned again without it, and published
        assert (await http.delete("/api/v1/env_vars/DB_URL")).status_code == 200
        published = await http.patch(f"/api/v1/commits/{commit}", json={"is_public": True})
        assert published.status_code == 200, published.text
        assert published.json()["is_public"] is True
        kept = scan_versions(platform, commit)
        assert [v for v, _ in kept] == [version, RULES_VERSION] and kept[1][1] == "[]"
        assert not any("Sup3r" in v or "Sup3r" in f for v, f in kept)
        assert (await http.patch(f"/api/v1/commits/{commit}", json={"is_public": False})).status_code == 200
