"""Deploy (POST /api/v1/deploy, `vers deploy`): a small web app from a git server on "the outside"
(tests/outside.py, reached because VERS_GUEST_ALLOW names it) is cloned, built and started in a new VM,
and answers inside it; a failing build's exit code, a bad repository, a name in use and another org's
attach are refused. The pipeline's shell script is also run here, on this host, under busybox sh."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from vers_sdk import VersSdkClient

from services.common.errors import InvalidArgument
from services.orchestrator.deploy import DeployPlan, check_branch, check_working_directory, deploy_name, git_url, script
from tests.conftest import Org, Platform, discard, kill_vms_under
from tests.conftest import test_settings as settings_for
from tests.launcher import VERS
from tests.outside import GIT, Outside, outside_world
from tests.test_vms import out

pytestmark = pytest.mark.vm

PAGE = "<h1>deployed by vers</h1>\n"
BUILD = "mkdir -p public && cp index.html public/"
RUN = "busybox httpd -f -p 8000 -h public"

# --- without VMs: what a deploy accepts, and its script on this host ----------------------------


def test_repositories_resolve_against_the_git_base_or_are_given_whole() -> None:
    assert git_url("acme/web", "https://github.com/") == "https://github.com/acme/web.git"
    assert git_url("acme/web.git", "http://git.test:8080") == "http://git.test:8080/acme/web.git"
    for url in ("https://git.example.com/a/b.git", "http://10.0.0.1:8080/b", "git://host/b.git", "HTTPS://host/x"):
        assert git_url(url, "https://github.com/") == url
    refused = {
        "": "empty",
        "-uhttps://x/y": "starts with '-'",
        "--upload-pack=touch /x": "starts with '-'",
        "acme": "neither",
        "acme/web/extra": "neither",
        "acme/..": "neither",
        "a b/c": "space",
        "git@github.com:acme/web.git": "neither",
        "ssh://git@github.com/acme/web.git": "ssh URL",
        "file:///etc/passwd": "file URL",
        "ext::sh -c touch% /tmp/x": "space",
        "https:///nohost": "names no host",
        "https://host": "names no host",
    }
    for repo, why in refused.items():
        with pytest.raises(InvalidArgument, match=why):
            git_url(repo, "https://github.com/")


def test_names_branches_and_working_directories() -> None:
    assert deploy_name("", "https://github.com/acme/web.git") == "web"
    assert deploy_name("", "http://h/x/site/") == "site"
    assert deploy_name("my-site.v2", "https://h/a/b.git") == "my-site.v2"
    for bad in ("-x", ".hidden", "a/b", "a b", "x" * 64):
        with pytest.raises(InvalidArgument, match="name"):
            deploy_name(bad, "https://h/a/b.git")
    with pytest.raises(InvalidArgument, match="give a name"):
        deploy_name("", "https://h/a/.git")
    assert check_branch("feature/new-ui_2") == "feature/new-ui_2"
    for bad in ("-b", "--upload-pack=x", "a..b", "a b", "a:b", "x.lock", "a~1", "a\nb"):
        with pytest.raises(InvalidArgument, match="branch"):
            check_branch(bad)
    assert check_working_directory("") == ""
    assert check_working_directory("./web//app/") == "web/app"
    for bad in ("/srv", "../up", "web/../../up"):
        with pytest.raises(InvalidArgument, match="working_directory"):
            check_working_directory(bad)


@pytest.fixture(scope="module")
def app_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The web app: an index page that the build copies into public/."""
    source = tmp_path_factory.mktemp("webapp")
    subprocess.run([*GIT, "init", "-q", str(source)], check=True)
    (source / "index.html").write_text(PAGE)
    subprocess.run([*GIT, "-C", str(source), "add", "index.html"], check=True)
    subprocess.run([*GIT, "-C", str(source), "commit", "-qm", "the page"], check=True)
    return source


def run_script(plan: DeployPlan) -> subprocess.CompletedProcess[str]:
    """The deploy's script as the guest runs it: busybox sh, with the guest's PATH-found tools."""
    return subprocess.run(["busybox", "sh", "-c", script(plan)], capture_output=True, text=True, timeout=60)


def test_the_script_clones_builds_and_leaves_the_app_running(app_source: Path, tmp_path: Path) -> None:
    plan = DeployPlan(
        url=str(app_source), branch="main", name="web", working_directory="", install="echo installing", build=BUILD,
        run="echo serving; exec sleep 60", folder=str(tmp_path / "web"), run_log=str(tmp_path / "log" / "run.log"),
    )  # fmt: skip
    done = run_script(plan)
    assert done.returncode == 0, done
    assert "==> install: echo installing\ninstalling\n==> build: " in done.stdout
    assert (tmp_path / "web" / "public" / "index.html").read_text() == PAGE
    pid = int(done.stdout.split("==> running (pid ")[1].split(")")[0])
    try:
        # the run command outlived the script, in a session of its own, its output in the log
        assert os.getsid(pid) == pid
        assert (tmp_path / "log" / "run.log").read_text() == "serving\n"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_the_script_stops_at_the_first_failure_with_its_exit_code(app_source: Path, tmp_path: Path) -> None:
    plan = DeployPlan(
        url=str(app_source), branch="", name="web", working_directory="", install="exit 7", build="touch built",
        run="", folder=str(tmp_path / "a"),
    )  # fmt: skip
    failed = run_script(plan)
    assert failed.returncode == 7
    assert "==> install failed (exit code 7)" in failed.stderr
    assert not (tmp_path / "a" / "built").exists()

    missing = DeployPlan(
        url=str(app_source), branch="no-such-branch", name="web", working_directory="", install="", build="", run="",
        folder=str(tmp_path / "b"),
    )  # fmt: skip
    assert run_script(missing).returncode != 0

    elsewhere = DeployPlan(
        url=str(app_source), branch="", name="web", working_directory="no/such/folder", install="", build="", run="",
        folder=str(tmp_path / "c"),
    )  # fmt: skip
    assert run_script(elsewhere).returncode != 0

    # a run command that ends at once is a failed deploy, its output shown
    crashing = DeployPlan(
        url=str(app_source), branch="", name="web", working_directory="", install="", build="",
        run="echo port in use; exit 3", folder=str(tmp_path / "d"), run_log=str(tmp_path / "run.log"),
    )  # fmt: skip
    crashed = run_script(crashing)
    assert crashed.returncode == 3
    assert "ended at once (exit code 3)" in crashed.stderr and "port in use" in crashed.stderr


# --- on VMs: the outside's git server, a platform whose guests may reach it --------------------------


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory, app_source: Path) -> Iterator[Outside]:
    with outside_world(tmp_path_factory.mktemp("deploy-outside")) as world:
        world.publish_repository("team/webapp", app_source)
        yield world


@pytest_asyncio.fixture(scope="module")
async def deploy_platform(outside: Outside, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    """A platform whose guests reach the outside git server, and whose owner/repo resolve against it."""
    settings = settings_for(tmp_path_factory.mktemp("deploy-data")).model_copy(
        update={"guest_allow": outside.address, "guest_dns": outside.address, "deploy_git_base": "http://git.test:8080/"}
    )
    platform = await Platform.start(settings)
    yield platform  # type: ignore[misc]
    kill_vms_under(platform.settings.vm_run_dir)
    await asyncio.sleep(0.3)
    await platform.stop()
    discard(platform.settings.data_dir)


@pytest_asyncio.fixture(scope="module")
async def deployer(deploy_platform: Platform) -> Org:
    return await deploy_platform.new_org("deployer")


async def follow(http: httpx.AsyncClient, vm_id: str, exec_id: str) -> tuple[bytes, bytes, dict[str, Any]]:
    """The deploy session's output (stdout, stderr) and its exit event, attached from the start."""
    output = {"stdout": bytearray(), "stderr": bytearray()}
    body = {"exec_id": exec_id}
    async with http.stream("POST", f"/api/v1/vm/{vm_id}/exec/stream/attach", json=body, timeout=900) as answer:
        assert answer.status_code == 200, await answer.aread()
        async for line in answer.aiter_lines():
            if not line:
                continue
            event = json.loads(line)
            assert "error" not in event, event
            if event["type"] == "chunk":
                output[event["stream"]] += base64.b64decode(event["data_b64"])
            else:
                assert event["type"] == "exit", event
                return bytes(output["stdout"]), bytes(output["stderr"]), event
    raise AssertionError(f"the stream ended without an exit event: {output}")


async def test_deploy_over_rest_serves_the_app_and_refuses_what_it_must(deploy_platform: Platform, deployer: Org, outside: Outside) -> None:
    async with deploy_platform.client(deployer) as http:
        body = {"repo": "team/webapp", "settings": {"build_command": BUILD, "run_command": RUN}}
        answer = await http.post("/api/v1/deploy", json=body)
        assert answer.status_code == 202, answer.text
        started = answer.json()
        assert started["status"] == "deploying" and started.keys() == {"project_id", "status", "vm_id"}
        vm = started["vm_id"]
        listed = (await http.get(f"/api/v1/vm/{vm}/metadata")).json()
        assert listed["labels"] == {"vers.deploy": "webapp", "vers.deploy.project": started["project_id"]}

        # a second deploy of that name, while the first one's VM exists
        again = await http.post("/api/v1/deploy", json=body)
        assert again.status_code == 409, again.text
        assert again.json()["error"].startswith(f"a deploy named 'webapp' exists (VM {vm})")

        # another org can neither follow the deploy nor see its VM
        other = await deploy_platform.new_org("outsider")
        async with deploy_platform.client(other) as stranger:
            peek = await stranger.post(f"/api/v1/vm/{vm}/exec/stream/attach", json={"exec_id": started["project_id"]})
            assert peek.status_code == 404, peek.text

        stdout, stderr, exit_event = await follow(http, vm, started["project_id"])
        assert exit_event["exit_code"] == 0, (stdout, stderr)
        assert b"==> clone http://git.test:8080/team/webapp.git into /root/webapp" in stdout
        assert b"==> build: " + BUILD.encode() in stdout and stdout.endswith(b"==> deployed\n")
        # the outside serves git's dumb HTTP protocol, which cannot clone shallow: the whole history came
        assert b"the server cannot clone shallow: cloning the whole history" in stderr
        # the app answers inside the VM, after the session that started it ended
        assert await out(http, vm, "wget -qO- http://127.0.0.1:8000/") == PAGE
        assert "busybox httpd" in await out(http, vm, "ps -o pid,args 2>/dev/null || ps")

        for bad, status in (
            ({"repo": "file:///etc"}, 400),
            ({"repo": "-oProxyCommand=x/y"}, 400),
            ({"repo": "team/webapp", "branch": "--upload-pack=x"}, 400),
            ({"repo": "team/webapp", "name": "bad name"}, 400),
            ({"repo": "team/webapp", "settings": {"working_directory": "../.."}}, 400),
            ({}, 400),
        ):
            refused = await http.post("/api/v1/deploy", json=bad)
            assert refused.status_code == status, (bad, refused.text)
        # none of the refusals left a VM behind
        vms = (await http.get("/api/v1/vm")).json()
        assert [v["vm_id"] for v in vms] == [vm]

        # a failing build ends the session with its exit code (and nothing is started); through the official
        # SDK, with a VM config of ours beside its fields
        failing = {
            "repo": "http://git.test:8080/team/webapp.git", "name": "broken",
            "settings": {"build_command": "echo compiling; exit 7", "run_command": RUN},
            "vm_config": {"vcpu_count": 1, "labels": {"team": "web"}},
        }  # fmt: skip
        async with VersSdkClient(base_url=deploy_platform.url, api_key=deployer.key, max_retries=0) as sdk:
            broken = await sdk.deploy_handler(failing)
        assert broken["status"] == "deploying"
        metadata = (await http.get(f"/api/v1/vm/{broken['vm_id']}/metadata")).json()
        assert metadata["labels"] == {"team": "web", "vers.deploy": "broken", "vers.deploy.project": broken["project_id"]}
        assert metadata["vcpu_count"] == 1
        stdout, stderr, exit_event = await follow(http, broken["vm_id"], broken["project_id"])
        assert exit_event["exit_code"] == 7, (stdout, stderr)
        assert b"compiling" in stdout and b"==> build failed (exit code 7)" in stderr and b"==> run" not in stdout
        for vm_id in (vm, broken["vm_id"]):
            assert (await http.delete(f"/api/v1/vm/{vm_id}")).status_code == 200
        # once its VM is gone, the name is free again (checked without starting another VM)
        assert not [v for v in (await http.get("/api/v1/vm")).json() if v["labels"].get("vers.deploy") == "webapp"]


async def test_vers_deploy_wait_follows_the_build_and_the_app_answers(deploy_platform: Platform, deployer: Org, tmp_path: Path) -> None:
    env = {**os.environ, "VERS_URL": deploy_platform.url, "VERS_API_KEY": deployer.key, "VERS_CONFIG_DIR": str(tmp_path)}
    command = [
        str(VERS), "deploy", "http://git.test:8080/team/webapp.git", "--branch", "main", "--name", "site",
        "--install", "echo installing deps", "--build", BUILD, "--run", RUN, "--wait",
    ]  # fmt: skip
    # the platform runs in this event loop: the CLI runs beside it, not blocking it
    process = await asyncio.create_subprocess_exec(*command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=900)
    text = stdout.decode()
    assert process.returncode == 0, (text, stderr.decode())
    assert "Traceback" not in stderr.decode()
    assert text.startswith("✓ Deploying http://git.test:8080/team/webapp.git to VM ")
    assert "==> install: echo installing deps\ninstalling deps\n" in text
    assert "Cloning into '/root/site'" in stderr.decode()  # git's own progress, on stderr as the guest wrote it
    vm = text.split(" to VM ", 1)[1].split()[0]
    assert text.rstrip().endswith(f"✓ Deployed to VM {vm} (the run command goes on in the background)")
    async with deploy_platform.client(deployer) as http:
        assert await out(http, vm, "wget -qO- http://127.0.0.1:8000/") == PAGE
        assert await out(http, vm, "cat /root/site/public/index.html") == PAGE
        # the deploy's VM is the one `vers` acts on next, and the deploy's output is in its exec log
        logs = await asyncio.create_subprocess_exec(
            str(VERS), "logs", "--format", "json", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        printed, complaint = await logs.communicate()
        logged = json.loads(printed)
        assert logged["vm_id"] == vm, complaint.decode()
        assert "installing deps" in "".join(entry["data"] for entry in logged["entries"])
        assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200
