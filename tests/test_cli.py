"""The `vers` binary against the platform as `make run` starts it, on real VMs: the documentation's
"Typical Workflows" and "Release tagging" replayed command by command, the console in a pseudo-terminal,
`--format json` on every command, and usage errors."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pexpect
import pytest

from services.cli.main import cli
from tests.launcher import COMMITTED, FORKED, STARTED, VERS, Site, User, command_path, running_site

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with running_site(tmp_path_factory.mktemp("cli")) as started:
        yield started


@pytest.fixture(scope="module")
def supported_python(site: Site) -> str:
    """`vers/python:latest`, published by the `vers` organization the way its images are (here from the default image)."""
    vers_org = site.vers_org()
    vers_org.vers("run", "--vm-alias", "bake")
    vers_org.vers("exec", "bake", "--", "echo python > /etc/flavour")
    commit = COMMITTED.search(vers_org.vers("commit", "bake").stdout)["commit"]  # type: ignore[index]
    vers_org.vers("repo", "create", "python")
    vers_org.vers("repo", "tag", "create", "python", "latest", commit)
    vers_org.vers("repo", "visibility", "python", "--public")
    vers_org.vers("kill", "bake")
    return commit


def type_in_console(child: pexpect.spawn, line: str, wanted: str, attempts: int = 3) -> None:
    """Type a line (each one here can run twice) until its answer shows: what is typed before the guest's
    shell reads the terminal is swallowed, on a loaded machine more often."""
    for attempt in range(attempts):
        child.sendline(line)
        try:
            child.expect(wanted, timeout=20)
            return
        except pexpect.TIMEOUT:
            if attempt == attempts - 1:
                raise


def test_personal_organization(site: Site) -> None:
    me = site.user("personal")
    started = me.vers("run", "--vm-alias", "dev").stdout
    vm = STARTED.search(started)["vm"]  # type: ignore[index]

    console = me.console()  # no VM argument: the one used last
    console.expect("Connected to VM " + vm)
    type_in_console(console, "mkdir -p /root/project && echo deps-installed > /root/project/state", r"# ")
    type_in_console(console, "cat /root/project/state", "deps-installed")
    console.sendline("exit")
    console.expect(pexpect.EOF)
    console.close()
    assert console.exitstatus == 0

    committed = me.vers("commit").stdout
    assert committed.startswith(f"✓ Committed VM {vm}\n")
    commit = COMMITTED.search(committed)["commit"]  # type: ignore[index]

    assert me.vers("repo", "create", "my-app").stdout == "✓ Created repository my-app (private)\n"
    assert me.vers("repo", "tag", "create", "my-app", "latest", commit).stdout == f"✓ Tagged my-app:latest → {commit}\n"

    me.vers("kill", "dev")
    restored = me.vers("run-commit", "my-app:latest", "--ref", "--vm-alias", "dev").stdout
    assert "is running from my-app:latest (alias dev)" in restored
    assert me.vers("exec", "dev", "--", "cat", "/root/project/state").stdout == "deps-installed\n"


def test_team_ci_flow(site: Site) -> None:
    developer = site.user("team")
    developer.vers("run", "--vm-alias", "trunk")
    developer.vers("exec", "trunk", "--", "echo v1 > /srv-version")
    first = COMMITTED.search(developer.vers("commit", "trunk").stdout)["commit"]  # type: ignore[index]
    developer.vers("repo", "create", "my-app")
    developer.vers("repo", "tag", "create", "my-app", "latest", first)
    assert developer.vers("repo", "visibility", "my-app", "--public").stdout == "✓ my-app is now public\n"

    # CI on a merge to main: branch from my-app:latest, "pull and reinstall", commit, move latest.
    ci = developer
    ci.vers("run-commit", "my-app:latest", "--ref", "--vm-alias", "ci")
    ci.vers("exec", "ci", "--", 'test "$(cat /srv-version)" = v1 && echo v2 > /srv-version')
    new = COMMITTED.search(ci.vers("commit", "ci").stdout)["commit"]  # type: ignore[index]
    moved = ci.vers("repo", "tag", "update", "my-app", "latest", "--commit", new).stdout
    assert moved == f"✓ Moved my-app:latest → {new} (was {first})\n"
    ci.vers("kill", "ci")

    # A team member lands on the pre-baked VM matching trunk; a contractor forks it into their org.
    member = developer
    member.vers("run-commit", "my-app:latest", "--ref", "--vm-alias", "mine")
    assert member.vers("exec", "mine", "--", "cat /srv-version").stdout == "v2\n"
    contractor = site.user("contractor")
    forked = FORKED.match(contractor.vers("repo", "fork", "team/my-app:latest").stdout)
    assert forked and forked["reference"] == "my-app:latest"
    assert contractor.vers("exec", forked["vm"], "--", "cat /srv-version").stdout == "v2\n"

    assert developer.vers("repo", "visibility", "my-app", "--public=false").stdout == "✓ my-app is now private\n"
    gone = contractor.vers("repo", "fork", "team/my-app:latest", "--tag-name", "again", expect=1)
    assert gone.stderr == "Error: public repository 'team/my-app' not found (HTTP 404)\n"


def test_consuming_a_supported_image(site: Site, supported_python: str) -> None:
    me = site.user("consumer")
    forked = FORKED.match(me.vers("repo", "fork", "vers/python:latest", "--repo-name", "py-base", "--tag-name", "latest").stdout)
    assert forked and forked["reference"] == "py-base:latest"
    assert forked["commit"] != supported_python  # a copy owned by this organization

    console = me.console(forked["vm"])
    console.expect("Connected to VM " + forked["vm"])
    type_in_console(console, "cat /etc/flavour", "python")
    console.sendline("exit")
    console.expect(pexpect.EOF)

    later = me.vers("run-commit", forked["commit"], "--vm-alias", "my-py-env").stdout
    assert f"is running from {forked['commit']} (alias my-py-env)" in later
    assert me.vers("exec", "my-py-env", "--", "cat /etc/flavour").stdout == "python\n"
    tags = me.json("repo", "tag", "list", "py-base")["tags"]
    assert [(t["tag_name"], t["commit_id"]) for t in tags] == [("latest", forked["commit"])]


def test_release_tagging_and_rollback(site: Site) -> None:
    me = site.user("releases")
    me.vers("run", "--vm-alias", "build")
    commits = []
    for version in ("1.4.1", "1.4.2"):
        me.vers("exec", "build", "--", f"echo {version} > /release")
        commits.append(COMMITTED.search(me.vers("commit", "build").stdout)["commit"])  # type: ignore[index]
    previous, release = commits
    me.vers("repo", "create", "my-app")
    me.vers("repo", "tag", "create", "my-app", "latest", previous)

    # After a successful release build
    assert me.vers("repo", "tag", "create", "my-app", "v1.4.2", release).stdout == f"✓ Tagged my-app:v1.4.2 → {release}\n"
    me.vers("repo", "tag", "update", "my-app", "latest", "--commit", release)
    assert me.json("repo", "tag", "get", "my-app", "latest")["commit_id"] == release

    # Roll back latest in a pinch: the history says where it was.
    history = me.json("repo", "tag", "history", "my-app", "latest")["events"]
    assert next((e["action"], e["old_commit_id"], e["new_commit_id"]) for e in history) == ("moved", previous, release)
    rolled = me.vers("repo", "tag", "update", "my-app", "latest", "--commit", history[0]["old_commit_id"]).stdout
    assert rolled == f"✓ Moved my-app:latest → {previous} (was {release})\n"
    me.vers("run-commit", "my-app:latest", "--ref", "--vm-alias", "check")
    assert me.vers("exec", "check", "--", "cat /release").stdout == "1.4.1\n"
    assert me.json("repo", "tag", "get", "my-app", "v1.4.2")["commit_id"] == release


def test_connect_in_a_terminal_leaves_with_ctrl_bracket_and_restores_it(site: Site, tmp_path: Path) -> None:
    me = site.user("terminal")
    vm = STARTED.search(me.vers("run").stdout)["vm"]  # type: ignore[index]
    before, after = tmp_path / "before", tmp_path / "after"
    shell = pexpect.spawn(
        "sh",
        ["-c", f"stty -g > {before}; {VERS} connect {vm}; echo vers-exited-$?; stty -g > {after}"],
        env=me.env,
        encoding="utf-8",
        timeout=60,
        dimensions=(33, 101),
    )
    shell.expect("Connected to VM")
    type_in_console(shell, "echo typed-$((40+2)); stty size", r"typed-42\r\n33 101")
    shell.send("\x1d")  # Ctrl-]
    shell.expect("Left the console of VM")
    shell.expect("vers-exited-0")
    shell.expect(pexpect.EOF)
    assert before.read_text() == after.read_text()  # raw mode undone

    # The VM goes on; the next session gets a shell.
    again = me.console(vm)
    again.expect("Connected to VM")
    type_in_console(again, "echo still-$((1+1))", "still-2")
    again.sendline("exit")
    again.expect(pexpect.EOF)


def test_connect_with_piped_input_runs_it_and_ends(site: Site) -> None:
    me = site.user("piped")
    me.vers("run")
    piped = me.vers("connect", stdin="echo from-a-pipe-$((3*3))\n")
    assert "from-a-pipe-9" in piped.stdout


def _leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


def test_format_json_on_every_command(site: Site, supported_python: str) -> None:
    me = site.user("scripted")
    data_env = {"VERS_DATA_DIR": site.env["VERS_DATA_DIR"]}
    me.env.update(data_env)
    answers: dict[tuple[str, ...], Any] = {}

    def ask(*args: str, expect: int = 0) -> Any:
        answer = me.json(*args, expect=expect)
        answers[command_path(args)] = answer
        return answer

    vm = ask("run", "--vm-alias", "js")["vm_id"]
    assert ask("exec", "js", "--", "exit 4", expect=4)["exit_code"] == 4
    commit = ask("commit", "js", "--name", "first")["commit_id"]
    assert commit in {c["commit_id"] for c in ask("commit", "list")["commits"]}
    branched = ask("branch", "js", "--count", "2")["vms"]
    assert len(branched) == 2
    assert ask("run-commit", commit)["vm_id"]
    assert ask("pause", "js")["state"] == "paused"
    assert ask("resume", "js")["state"] == "running"
    assert ask("sleep", branched[1]["vm_id"])["state"] == "sleeping"
    assert ask("resume", branched[1]["vm_id"])["state"] == "running"
    assert ask("status", "js")["vm_id"] == vm
    assert {v["vm_id"] for v in ask("status")} >= {vm, *(b["vm_id"] for b in branched)}
    assert ask("kill", branched[0]["vm_id"]) == {"vm_id": branched[0]["vm_id"]}
    assert ask("whoami")["org"]["name"] == "scripted"
    assert ask("login", "--api-key", me_key(me))["org"]["name"] == "scripted"

    assert ask("repo", "create", "tools")["name"] == "tools"
    assert [r["name"] for r in ask("repo", "list")["repositories"]] == ["tools"]
    assert ask("repo", "get", "tools")["is_public"] is False
    assert ask("repo", "visibility", "tools", "--public")["is_public"] is True
    assert "scripted/tools" in [r["full_name"] for r in ask("repo", "list", "--public")["repositories"]]
    assert ask("repo", "tag", "create", "tools", "v1", commit)["reference"] == "tools:v1"
    assert ask("repo", "tag", "list", "tools")["tags"][0]["commit_id"] == commit
    assert ask("repo", "tag", "get", "tools", "v1")["commit_id"] == commit
    updated = ask("repo", "tag", "update", "tools", "v1", "--description", "first build")
    assert (updated["description"], updated["previous_commit_id"]) == ("first build", commit)
    assert [e["action"] for e in ask("repo", "tag", "history", "tools", "v1")["events"]] == ["updated", "created"]
    fork = ask("repo", "fork", "vers/python:latest", "--repo-name", "py")
    assert fork["reference"] == "py:latest"
    assert ask("repo", "tag", "delete", "tools", "v1", "nope", expect=1)["results"] == [
        {"name": "v1", "deleted": True, "error": None},
        {"name": "nope", "deleted": False, "error": "tag 'nope' not found in repository 'tools'"},
    ]
    assert ask("repo", "delete", "tools")["results"][0]["deleted"] is True
    assert any(o["name"] == "scripted" for o in ask("admin", "org", "list")["orgs"])
    assert ask("admin", "org", "create", "scripted-too")["token"].startswith("vers_")
    limited = ask("admin", "org", "limits", "scripted-too", "--max-vms", "3")
    assert limited["limits"]["max_vms"] == 3, limited
    fsck = ask("admin", "fsck")
    assert fsck["clean"] is True, fsck

    interactive = {("connect",)}
    baked_in_test_bake = {("admin", "images", "bake")}  # a Debian bake: tests/test_bake.py reads its JSON
    networked = {("tunnel",), ("ssh-config",), ("domain", "create"), ("domain", "list"), ("domain", "delete")}  # test_cli_network.py
    governance = {("repo", "policy"), ("retention",), ("gc",), ("audit",)}  # test_cli_governance.py
    # each in its feature's own test module
    elsewhere = {
        ("logs",),  # test_cli_exec.py
        ("copy",),  # test_vm_files.py
        ("label",), ("resize",), ("info",), ("alias",), ("checkout",),  # test_cli_vmadmin.py
        ("commit", "publish"), ("commit", "unpublish"), ("commit", "history"), ("commit", "delete"),  # test_commit_publish.py
        ("env", "list"), ("env", "set"), ("env", "delete"),  # test_env_vars.py
        ("deploy",),  # test_deploy_git.py
        ("mcp", "serve"),  # test_mcp.py: it speaks MCP on stdout, not --format
        ("admin", "hosts", "list"), ("admin", "hosts", "remove"),  # test_hosts.py
    }  # fmt: skip
    assert set(_leaf_commands(cli)) - interactive - baked_in_test_bake - networked - governance - elsewhere == set(answers)


def me_key(user: User) -> str:
    return json.loads((Path(user.env["VERS_CONFIG_DIR"]) / "config.json").read_text())["api_key"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run-commit", "my-app:latest"], "looks like a repo:tag reference; add --ref: vers run-commit my-app:latest --ref"),
        (["run-commit", "acme/my-app:latest", "--ref"], "belongs to another organization: fork it first"),
        (["run-commit", "abc", "--ref"], "is not a repo:tag reference"),
        (["run", "--vcpu-count", "0"], "Invalid value for '--vcpu-count'"),
        (["run", "--vm-alias", "no spaces"], "alias 'no spaces' is not valid"),
        (["branch", "--count", "2", "--vm-alias", "x"], "--vm-alias names one VM"),
        (["exec", "dev"], "Missing argument 'CMD...'"),
        (["exec", "dev", "--"], "no command"),
        (["repo", "visibility", "my-app"], "say --public or --public=false"),
        (["repo", "visibility", "my-app", "--public=maybe"], "'maybe' is not a valid boolean"),
        (["repo", "fork", "python:latest"], "is not ORG/REPO:TAG"),
        (["repo", "tag", "create", "my-app", "latest"], "Missing argument 'COMMIT'"),
        (["repo", "tag", "update", "my-app", "latest"], "nothing to change"),
        (["repo", "tag", "list", "a/b/c"], "is neither REPO nor ORG/REPO"),
        (["commit", "list", "--limit", "0"], "Invalid value for '--limit'"),
        (["status", "--format", "yaml"], "'yaml' is not one of 'text', 'json'"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_bad_arguments_are_usage_errors_before_any_request(tmp_path: Path, args: list[str], message: str) -> None:
    # Nothing listens on this URL: a usage error must come before any request is tried.
    env = {**os.environ, "VERS_URL": "http://127.0.0.1:9", "VERS_API_KEY": "vers_x", "VERS_CONFIG_DIR": str(tmp_path)}
    result = subprocess.run([VERS, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "cannot reach" not in result.stderr


def test_login_checks_the_key_and_keeps_nothing_wrong(site: Site, tmp_path: Path) -> None:
    env = {**site.env, "VERS_CONFIG_DIR": str(tmp_path / "config")}
    refused = subprocess.run([VERS, "login", "--api-key", "vers_wrong"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr.startswith("Error: ") and refused.stderr.count("\n") == 1
    assert not (tmp_path / "config" / "config.json").exists()
    no_key = subprocess.run([VERS, "status"], env=env, capture_output=True, text=True)
    assert (no_key.returncode, no_key.stderr) == (1, "Error: no API key: run `vers login`, or set VERS_API_KEY\n")


def test_unreachable_server_is_said_plainly(tmp_path: Path) -> None:
    env = {**os.environ, "VERS_URL": "http://127.0.0.1:9", "VERS_API_KEY": "vers_x", "VERS_CONFIG_DIR": str(tmp_path)}
    for args in (["status"], ["connect", "0b5ff8f4-7b8e-4c44-9a3b-bc0c2ec0b1f4"], ["repo", "list"]):
        result = subprocess.run([VERS, *args], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr.startswith("Error: cannot reach the Vers API at http://127.0.0.1:9"), result.stderr
        assert result.stderr.count("\n") == 1


def test_a_short_vm_prefix_is_refused_before_any_request(tmp_path: Path) -> None:
    env = {**os.environ, "VERS_URL": "http://127.0.0.1:9", "VERS_API_KEY": "vers_x", "VERS_CONFIG_DIR": str(tmp_path)}
    result = subprocess.run([VERS, "status", "2b…"], env=env, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, "Error: no VM '2b…': not an alias here; an ID prefix needs at least 4 characters\n")
