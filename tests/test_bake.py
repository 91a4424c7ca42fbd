"""Supported images baked for real (Debian root disk by debootstrap, booted, committed, published as
vers/python and vers/debian), consumed as the documentation shows, rebaked, and a bake that fails; the
documentation's Team CI recipe (examples/ci-latest.sh), its VM pulling the app from a git server "outside"."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest

from tests.conftest import IMAGES
from tests.launcher import COMMITTED, FORKED, ROOT, VERS, Site, User, running_site
from tests.outside import GIT, Outside, outside_world

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    with outside_world(tmp_path_factory.mktemp("outside")) as world:
        yield world


@pytest.fixture(scope="module")
def site(outside: Outside, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("bake")
    # The bake's cache (Debian packages, built roots) outlives the run, as the images folder does.
    cache = str(IMAGES.parent / "bake-cache")
    with running_site(folder, VERS_GUEST_ALLOW=outside.address, VERS_GUEST_DNS=outside.address, VERS_BAKE_CACHE=cache) as started:
        yield started


@pytest.fixture(scope="module")
def publisher(site: Site) -> User:
    return site.vers_org()


@pytest.fixture(scope="module")
def first_bake(publisher: User) -> dict[str, object]:
    """vers/python baked once; the root file system is cached beside the images folder between runs."""
    results = publisher.json("admin", "images", "bake", "python")["results"]
    assert len(results) == 1 and "error" not in results[0], results
    return results[0]


def test_a_baked_python_image_forks_and_runs_python(site: Site, publisher: User, first_bake: dict[str, object]) -> None:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    # The disk went up as an image of the publisher's, public, named by what went into it.
    baked = [image for image in platform_images(publisher) if image["image_name"].startswith("python-")]
    assert [(image["status"], image["is_public"], image["source_type"]) for image in baked] == [("completed", True, "upload")]
    assert str(first_bake["dated_tag"]).startswith(today)
    assert str(first_bake["versions"]["python"]).startswith("Python 3.")  # type: ignore[index]

    description = publisher.json("repo", "tag", "get", "python", "latest")
    assert description["commit_id"] == first_bake["commit_id"]
    commit = site_commit(publisher, str(first_bake["commit_id"]))
    for promised in ("python3 ", "python3-pip ", "python3-venv ", "git ", "curl ", "nginx ", "iproute2 "):
        assert promised in commit["description"], commit["description"]

    # "Consuming a supported image", as the documentation shows it.
    me = site.user("pyuser")
    forked = FORKED.match(me.vers("repo", "fork", "vers/python:latest", "--repo-name", "py-base", "--tag-name", "latest").stdout)
    assert forked and forked["reference"] == "py-base:latest"
    assert me.vers("exec", forked["vm"], "--", "python3 --version").stdout.startswith("Python 3.")
    for tool in (
        "pip3 --version",
        "python3 -m venv /tmp/env && /tmp/env/bin/python -c 'import sys; print(sys.prefix)'",
        "git --version",
        "curl --version",
        "nginx -v",
        "ip -V",
    ):
        me.vers("exec", forked["vm"], "--", tool)
    console = me.console(forked["vm"])
    console.expect("Connected to VM")
    console.sendline("python3 -c 'print(40 + 2)'")
    console.expect("42")
    console.sendline("exit")
    console.expect(pexpect.EOF)


def site_commit(user: User, commit_id: str) -> dict[str, str]:
    answer = httpx.get(
        f"{user.env['VERS_URL']}/api/v1/commits/{commit_id}", headers={"Authorization": f"Bearer {user.env['VERS_API_KEY']}"}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_rebake_moves_latest_and_keeps_dated_tags_and_forks(site: Site, publisher: User, first_bake: dict[str, object]) -> None:
    me = site.user("pinner")
    earlier = FORKED.match(me.vers("repo", "fork", "vers/python:latest", "--repo-name", "pinned").stdout)
    assert earlier

    again = publisher.json("admin", "images", "bake", "python")["results"][0]
    assert again["commit_id"] != first_bake["commit_id"]
    assert again["dated_tag"] != first_bake["dated_tag"]  # a counter on the same day

    public = {t["tag_name"]: t["commit_id"] for t in me.json("repo", "tag", "list", "vers/python")["tags"]}
    assert public["latest"] == again["commit_id"]
    assert public[str(first_bake["dated_tag"])] == first_bake["commit_id"]
    assert public[str(again["dated_tag"])] == again["commit_id"]
    # The earlier fork is the user's own copy: untouched by the rebake.
    assert me.json("repo", "tag", "get", "pinned", "latest")["commit_id"] == earlier["commit"]
    assert me.vers("exec", earlier["vm"], "--", "python3 -c 'print(7)'").stdout == "7\n"
    pinned = me.vers("run-commit", earlier["commit"]).stdout
    assert "is running from" in pinned


def platform_images(user: User) -> list[dict[str, object]]:
    """The images the user's organization sees, from the platform's images API."""
    answer = httpx.get(f"{user.env['VERS_URL']}/api/v1/images", headers={"Authorization": f"Bearer {user.env['VERS_API_KEY']}"})
    assert answer.status_code == 200, answer.text
    return list(answer.json()["images"])


def test_a_failed_bake_leaves_latest_and_says_why(publisher: User, first_bake: dict[str, object]) -> None:
    before = publisher.json("repo", "tag", "get", "python", "latest")["commit_id"]
    images = platform_images(publisher)
    failed = publisher.vers("admin", "images", "bake", "python", "--extra-package", "no-such-package-vers", expect=1)
    assert "Error: baking python:" in failed.stderr
    assert "no-such-package-vers" in failed.stderr
    assert "(latest not moved)" in failed.stderr
    assert publisher.json("repo", "tag", "get", "python", "latest")["commit_id"] == before
    assert platform_images(publisher) == images  # no image made for a bake that failed


def local_apt_repository(folder: Path) -> None:
    """A one-package apt repository (flat, unsigned) in `folder`: what a mirror serves, without the internet."""
    package = folder / "build" / "vers-hello"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "usr" / "bin").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: vers-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: ci <ci@example.test>\nDescription: says hello\n"
    )
    (package / "usr" / "bin" / "vers-hello").write_text("#!/bin/sh\necho hello from apt\n")
    (package / "usr" / "bin" / "vers-hello").chmod(0o755)
    repository = folder / "apt"
    repository.mkdir()
    deb = repository / "vers-hello_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(package), str(deb)], check=True, capture_output=True)
    control = (package / "DEBIAN" / "control").read_text()
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    (repository / "Packages").write_text(f"{control}Filename: ./{deb.name}\nSize: {deb.stat().st_size}\nSHA256: {digest}\n\n")


def test_the_debian_image_installs_packages_with_apt(site: Site, publisher: User, outside: Outside) -> None:
    results = publisher.json("admin", "images", "bake", "debian")["results"]
    assert len(results) == 1 and "error" not in results[0], results
    local_apt_repository(outside.folder)
    me = site.user("debuser")
    forked = FORKED.match(me.vers("repo", "fork", "vers/debian:latest", "--repo-name", "deb", "--tag-name", "latest").stdout)
    assert forked
    listed = "echo 'deb [trusted=yes] http://git.test:8080/apt ./' > /etc/apt/sources.list.d/local.list"
    only = "-o Dir::Etc::SourceList=/etc/apt/sources.list.d/local.list -o Dir::Etc::SourceParts=-"
    me.vers("exec", forked["vm"], "--", f"{listed} && apt-get {only} update -q && apt-get {only} install -y -q vers-hello")
    assert me.vers("exec", forked["vm"], "--", "vers-hello").stdout == "hello from apt\n"
    me.vers("exec", forked["vm"], "--", "test -x /usr/sbin/sshd && test -s /etc/ssh/ssh_host_ed25519_key")  # exit 0 or fails


def test_ci_recipe_pulls_the_new_app_into_the_vm_and_moves_latest(site: Site, outside: Outside, tmp_path: Path) -> None:
    team = site.user("citeam")
    app = tmp_path / "app"
    subprocess.run([*GIT, "init", "-q", str(app)], check=True)
    remote = "http://git.test:8080/my-app.git"
    subprocess.run([*GIT, "-C", str(app), "remote", "add", "origin", remote], check=True)
    (app / "install.sh").write_text("#!/bin/sh\nset -e\nmkdir -p /opt/app\ncp VERSION /opt/app/installed-version\n")
    (app / "install.sh").chmod(0o755)

    def release(version: str) -> None:
        (app / "VERSION").write_text(version + "\n")
        subprocess.run([*GIT, "-C", str(app), "add", "-A"], check=True)
        subprocess.run([*GIT, "-C", str(app), "commit", "-qm", version], check=True)
        assert outside.publish_repository("my-app", app) == remote

    team.vers("run", "--vm-alias", "seed")
    first = COMMITTED.search(team.vers("commit", "seed").stdout)["commit"]  # type: ignore[index]
    team.vers("repo", "create", "my-app")
    team.vers("repo", "tag", "create", "my-app", "latest", first)

    env = {**team.env, "REPO": "my-app", "APP_DIR": str(app), "PATH": f"{VERS.parent}:{os.environ['PATH']}"}
    for version in ("2.0.0", "2.1.0"):  # a clone the first time, a fetch into that clone the second
        release(version)
        before = team.json("repo", "tag", "get", "my-app", "latest")["commit_id"]
        script = subprocess.run([ROOT / "examples" / "ci-latest.sh"], env=env, capture_output=True, text=True, timeout=600)
        assert script.returncode == 0, script.stdout + script.stderr
        latest = team.json("repo", "tag", "get", "my-app", "latest")["commit_id"]
        assert f"✓ Moved my-app:latest → {latest} (was {before})" in script.stdout
        team.vers("run-commit", "my-app:latest", "--ref", "--vm-alias", f"dev-{version}")
        assert team.vers("exec", f"dev-{version}", "--", "cat /opt/app/installed-version").stdout == version + "\n"
        head = subprocess.run([*GIT, "-C", str(app), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        assert team.vers("exec", f"dev-{version}", "--", "git -C /srv/app rev-parse HEAD").stdout == head
        # the documentation's own line works in such a VM
        assert team.vers("exec", f"dev-{version}", "--", "cd /srv/app && git pull -q origin main && cat VERSION").stdout == version + "\n"
        team.vers("kill", f"dev-{version}")
    assert [vm["vm_id"] for vm in team.json("status")] == [team.json("status", "seed")["vm_id"]]  # scratch VMs killed

    # A failing install moves nothing.
    (app / "install.sh").write_text("#!/bin/sh\necho migrations failed >&2\nexit 1\n")
    release("2.1.1")
    broken = subprocess.run([ROOT / "examples" / "ci-latest.sh"], env=env, capture_output=True, text=True, timeout=600)
    assert broken.returncode != 0
    assert "migrations failed" in broken.stderr
    assert team.json("repo", "tag", "get", "my-app", "latest")["commit_id"] == latest
    assert json.dumps(team.json("status")).count("vm_id") == 1
