"""The `vers` binary's governance commands against a launched platform: repository policies (immutable tags,
retention), the organization's retention rule, garbage collection, the audit log, and publishing refused
for a secret in a commit (and forced), with `--format json` on each."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.launcher import COMMITTED, VERS, Site, running_site

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with running_site(tmp_path_factory.mktemp("cli-governance")) as started:
        yield started


def test_policy_set_on_create_shown_changed_and_cleared(site: Site) -> None:
    me = site.user("policies")
    created = me.vers(
        "repo", "create", "my-app", "--immutable-tag", "v*", "--keep-last", "5", "--keep-tag", "release-*", "--untagged-days", "30"
    ).stdout
    assert created == (
        "✓ Created repository my-app (private)\n  Immutable tags: v*\n  Keep last: 5 commits per tag\n"
        "  Keep tags: release-*\n  Untagged after: 30 days\n"
    )

    assert me.vers("repo", "policy", "my-app").stdout == (
        "Repository:     my-app\nImmutable tags: v*\nKeep last:      5 commits per tag\nKeep tags:      release-*\n"
        "Untagged after: 30 days\n"
    )
    found = me.json("repo", "get", "my-app")
    assert found["immutable_tags"] == ["v*"]
    assert found["retention"] == {"keep_last": 5, "keep_tags": ["release-*"], "untagged_older_than_days": 30}
    assert "Immutable tags: v*" in me.vers("repo", "get", "my-app").stdout

    # One rule changed: the others stay.
    changed = me.vers("repo", "policy", "my-app", "--keep-last", "3", "--immutable-tag", "v*", "--immutable-tag", "stable").stdout
    assert changed.startswith("✓ Updated the policy of my-app\n")
    assert "Immutable tags: v*, stable\nKeep last:      3 commits per tag\nKeep tags:      release-*\n" in changed
    assert me.json("repo", "policy", "my-app", "--untagged-days", "7")["retention"] == {
        "keep_last": 3,
        "keep_tags": ["release-*"],
        "untagged_older_than_days": 7,
    }

    cleared = me.json("repo", "policy", "my-app", "--no-immutable-tags", "--no-keep-tags", "--keep-last", "0", "--untagged-days", "0")
    assert cleared["immutable_tags"] == []
    assert not any((cleared.get("retention") or {}).values()), cleared
    assert me.vers("repo", "policy", "my-app").stdout == (
        "Repository:     my-app\nImmutable tags: none\nKeep last:      off\nKeep tags:      off\nUntagged after: off\n"
    )

    missing = me.vers("repo", "policy", "nope", "--keep-last", "2", expect=1)
    assert missing.stderr.startswith("Error: ") and "(HTTP 404)" in missing.stderr and missing.stderr.count("\n") == 1


def test_org_retention_set_and_shown(site: Site) -> None:
    me = site.user("retention")
    assert me.vers("retention").stdout == "Untagged commits: kept (no rule)\n"
    assert me.vers("retention", "--untagged-days", "14").stdout == (
        "✓ Updated your organization's retention rule\nUntagged commits: deleted once older than 14 days\n"
    )
    assert me.json("retention") == {"untagged_older_than_days": 14}
    assert me.json("retention", "--untagged-days", "0") == {"untagged_older_than_days": 0}
    assert me.vers("retention").stdout == "Untagged commits: kept (no rule)\n"


def test_gc_dry_run_on_an_org_without_commits(site: Site) -> None:
    me = site.user("empty")
    me.vers("retention", "--untagged-days", "1")
    assert me.vers("gc", "--dry-run").stdout == (
        "Nothing to collect: no commit falls under a retention rule (dry run: nothing was deleted).\n"
    )
    assert me.json("gc", "--dry-run") == {"dry_run": True, "commits": [], "bytes_freed": 0}
    assert me.json("gc") == {"dry_run": False, "commits": [], "bytes_freed": 0}


def test_audit_shows_the_repository_create_and_policy_change(site: Site) -> None:
    me = site.user("audited")
    me.vers("repo", "create", "my-app")
    me.vers("repo", "policy", "my-app", "--immutable-tag", "v*")

    events = me.json("audit")["events"]
    changes = [(e["type"], e["target"]) for e in events if e["type"].startswith("repository.")]
    assert changes == [("repository.create", "my-app"), ("repository.policy", "my-app")], events
    policy = next(e for e in events if e["type"] == "repository.policy")
    assert policy["api_key_id"] and "v*" in policy["after"] and policy["at"]

    text = me.vers("audit", "--type", "repository").stdout.splitlines()
    assert text[0].split() == ["TIME", "TYPE", "TARGET", "KEY", "BEFORE", "→", "AFTER"]
    rows = [line.split() for line in text if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert [row[2:4] for row in rows] == [["repository.create", "my-app"], ["repository.policy", "my-app"]]
    assert rows[1][5:] == ["immutable_tags:", "[]", "→", '["v*"]']  # only what changed

    only = me.json("audit", "--type", "repository.policy")["events"]
    assert [e["type"] for e in only] == ["repository.policy"]
    assert [e["type"] for e in me.json("audit", "--since", "1h", "--type", "repository")["events"]] == [
        "repository.create",
        "repository.policy",
    ]
    assert me.vers("audit", "--since", "2099-01-01").stdout == "No changes recorded that match.\n"

    first = me.vers("audit", "--type", "repository", "--limit", "1").stdout
    assert "repository.create" in first and "repository.policy" not in first
    assert first.endswith("(the first 1; --limit or --since for more)\n")
    assert len(me.json("audit", "--type", "repository", "--limit", "1")["events"]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["repo", "policy", "my-app", "--immutable-tag", "v*", "--no-immutable-tags"], "contradict each other"),
        (["repo", "policy", "my-app", "--keep-tag", "r*", "--no-keep-tags"], "contradict each other"),
        (["repo", "policy", "my-app", "--keep-last", "-1"], "Invalid value for '--keep-last'"),
        (["repo", "create", "my-app", "--untagged-days", "x"], "Invalid value for '--untagged-days'"),
        (["repo", "visibility", "my-app", "--public=false", "--force"], "--force publishes despite the secret scan"),
        (["retention", "--untagged-days", "-2"], "Invalid value for '--untagged-days'"),
        (["audit", "--since", "yesterday"], "is neither a time"),
        (["audit", "--limit", "0"], "Invalid value for '--limit'"),
    ],
)
def test_bad_arguments_are_usage_errors_before_any_request(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "VERS_URL": "http://127.0.0.1:9", "VERS_API_KEY": "vers_x", "VERS_CONFIG_DIR": str(tmp_path)}
    result = subprocess.run([VERS, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr


def _private_key() -> str:
    """A PEM private key made now, so that no key is kept in the source."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()


def test_publishing_a_commit_with_a_private_key_is_refused_with_findings_then_forced(site: Site) -> None:
    me = site.user("leaky")
    me.vers("run", "--vm-alias", "leaky")
    me.vers("exec", "-i", "leaky", "--", "cat > /root/deploy_key && sync", stdin=_private_key())
    commit = COMMITTED.search(me.vers("commit", "leaky").stdout)["commit"]  # type: ignore[index]
    me.vers("kill", "leaky")
    me.vers("repo", "create", "app", "--immutable-tag", "v*")
    me.vers("repo", "tag", "create", "app", "v1.0", commit)

    refused = me.vers("repo", "visibility", "app", "--public", expect=1)
    assert refused.stdout.split("\n", 1)[0].split() == ["COMMIT", "WHERE", "PATH", "OR", "OFFSET", "RULE", "EXCERPT"], refused
    on_disk = [line for line in refused.stdout.splitlines() if "/root/deploy_key" in line]
    assert on_disk and commit in on_disk[0] and "disk" in on_disk[0] and "private-key" in on_disk[0], refused.stdout
    assert "PRIVATE KEY-----\n" not in refused.stdout  # excerpts are redacted
    assert refused.stderr.startswith("Error: ") and refused.stderr.endswith("(HTTP 409)\n"), refused.stderr

    body = me.json("repo", "visibility", "app", "--public", expect=1)
    assert (body["success"], body["code"]) == (False, "ABORTED")
    assert body["error"] in refused.stderr
    found = [f for f in body["findings"] if f["where"] == "disk" and f["path"] == "/root/deploy_key"]
    assert found and found[0]["commit_id"] == commit and found[0]["rule"] == "private-key", body
    assert me.json("repo", "get", "app")["is_public"] is False

    assert me.vers("repo", "visibility", "app", "--public", "--force").stdout == "✓ app is now public\n"
    assert me.json("repo", "get", "app")["is_public"] is True
    forced = me.json("audit", "--type", "publish.forced")["events"]
    assert [e["target"] for e in forced] == ["app"] and forced[0]["api_key_id"], forced

    # The immutable `v*` rule holds for the tag just published.
    kept = me.vers("repo", "tag", "delete", "app", "v1.0", expect=1)
    assert "(HTTP 409)" in kept.stderr and "v*" in kept.stderr, kept.stderr
