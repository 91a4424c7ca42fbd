"""`vers tunnel`, `vers ssh-config`, `vers connect --ssh`, `vers run --network` and `vers domain` against the
platform as `make run` starts it, on real VMs, with real clients: HTTP through a tunnel, OpenSSH and scp
through `vers tunnel --stdio`, a branch with a key of its own."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_ports
from tests.launcher import STARTED, VERS, Site, User, running_site

pytestmark = pytest.mark.vm

READY = re.compile(r"\A✓ 127\.0\.0\.1:(?P<port>\d+) → VM (?P<vm>\S+):(?P<remote>\d+) \(Ctrl-C stops\)\n\Z")
FILES = 20
# A CGI answer that takes a while, so the requests of one test are all open at the same time.
SLOW_CGI = "#!/bin/sh\nsleep 3\nprintf 'Content-Type: application/octet-stream\\r\\n\\r\\n'\nexec cat /www/f$QUERY_STRING\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with running_site(tmp_path_factory.mktemp("cli-network")) as started:
        yield started


@pytest.fixture(scope="module")
def me(site: Site) -> User:
    return site.user("netops")


@pytest.fixture(scope="module")
def web(me: User) -> str:
    """A VM `web` serving FILES random files (also slowly, /cgi-bin/slow?N) and an index page with busybox httpd on port 8000."""
    vm = STARTED.search(me.vers("run", "--vm-alias", "web").stdout)["vm"]  # type: ignore[index]
    me.vers("exec", "-i", "web", "--", "mkdir -p /www/cgi-bin && cat > /www/cgi-bin/slow && chmod +x /www/cgi-bin/slow", stdin=SLOW_CGI)
    me.vers(
        "exec",
        "web",
        "--",
        f"echo hello-from-the-vm > /www/index.html && "
        f"for i in $(seq 1 {FILES}); do head -c $((100000 + i * 7919)) /dev/urandom > /www/f$i; done && httpd -p 8000 -h /www",
    )
    return vm


def config_dir(user: User) -> Path:
    return Path(user.env["VERS_CONFIG_DIR"])


def http() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=120)


def _first_output(process: subprocess.Popen[str], timeout: float = 120) -> str:
    """What the tunnel prints when it listens: one line, or with --format json one document."""
    assert process.stdout is not None
    lines: list[str] = []

    def read() -> None:
        while line := process.stdout.readline():  # type: ignore[union-attr]
            lines.append(line)
            if not line.startswith(("{", " ")):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return "".join(lines)


@contextlib.contextmanager
def tunnel(user: User, *args: str) -> Iterator[tuple[int, str]]:
    """`vers tunnel ARGS` running: the local port and what it printed; Ctrl-C afterwards must end it cleanly."""
    process = subprocess.Popen([VERS, "tunnel", *args], env=user.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = _first_output(process)
        if "--format" in args:
            port = json.loads(printed)["local_port"]
        else:
            match = READY.match(printed)
            assert match, f"{printed!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"  # type: ignore[union-attr]
            port = int(match["port"])
        yield port, printed
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, errors = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, errors
    assert "Traceback" not in errors, errors


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def guest_sums(user: User, vm: str, pattern: str) -> dict[str, str]:
    listed = user.vers("exec", vm, "--", f"sha256sum {pattern}").stdout
    return {Path(name).name: digest for digest, name in (line.split() for line in listed.splitlines())}


def test_a_tunnel_carries_many_http_requests_at_once(me: User, web: str) -> None:
    sums = guest_sums(me, "web", "/www/f*")
    assert len(sums) == FILES
    with tunnel(me, "--format", "json", "web", "0:8000") as (port, printed):
        assert json.loads(printed) == {"vm_id": web, "port": 8000, "local_address": "127.0.0.1", "local_port": port}
        together = threading.Barrier(FILES)

        def fetch(number: int) -> tuple[httpx.Response, float, float]:
            together.wait(60)
            # Every request on its own connection, arriving 50 ms apart: busybox httpd listens with a backlog of 9,
            # and a guest whose accept queue overflows takes its time (a minute, behind QEMU's user-mode stack).
            time.sleep(number * 0.05)
            started = time.monotonic()
            with http() as client:
                answer = client.get(f"http://127.0.0.1:{port}/cgi-bin/slow?{number}")
            return answer, started, time.monotonic()

        with ThreadPoolExecutor(FILES) as pool:
            answers = list(pool.map(fetch, range(1, FILES + 1)))
        for number, (answer, _, _) in enumerate(answers, 1):
            assert answer.status_code == 200
            assert sha256(answer.content) == sums[f"f{number}"], f"f{number}"
            assert len(answer.content) == 100000 + number * 7919
        assert max(started for _, started, _ in answers) < min(ended for _, _, ended in answers)  # all open at once


def test_a_tunnel_listens_on_the_remote_port_by_default_and_stops_with_connections_open(me: User, web: str) -> None:
    (port,) = free_ports(1)
    me.vers("exec", "web", "--", f"httpd -p {port} -h /www")
    with tunnel(me, "web", str(port)) as (listening, printed):
        assert listening == port
        assert printed == f"✓ 127.0.0.1:{port} → VM {web}:{port} (Ctrl-C stops)\n"
        with http() as client:
            assert client.get(f"http://127.0.0.1:{port}/").text == "hello-from-the-vm\n"
        held = socket.create_connection(("127.0.0.1", port), timeout=60)
        held.sendall(b"GET / HTTP/1.1\r\n")  # a request half sent when Ctrl-C comes
        time.sleep(1)
    assert held.recv(100) == b""  # the tunnel closed it on its way out
    held.close()


@contextlib.contextmanager
def stdio_tunnel(me: User, port: str) -> Iterator[subprocess.Popen[bytes]]:
    """`vers tunnel --stdio web PORT`, killed if it outlives two minutes or the block."""
    process = subprocess.Popen(
        [VERS, "tunnel", "--stdio", "web", port], env=me.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    watchdog = threading.Timer(120, process.kill)
    watchdog.start()
    try:
        yield process
    finally:
        watchdog.cancel()
        if process.stdin is not None:
            process.stdin.close()
        if process.poll() is None:
            process.kill()


def test_tunnel_stdio_carries_one_connection_both_ways(me: User, web: str) -> None:
    me.vers(
        "exec",
        "web",
        "--",
        "nc -ll -p 7000 -e /bin/cat </dev/null >/dev/null 2>&1 & "
        "for i in $(seq 100); do netstat -ltn | grep -q ':7000 ' && exit 0; sleep 0.1; done; exit 1",
    )
    payload = os.urandom(300_000)
    with stdio_tunnel(me, "7000") as process:
        assert process.stdin and process.stdout and process.stderr
        process.stdin.write(b"ping\n")
        process.stdin.flush()
        assert process.stdout.read(5) == b"ping\n"
        writer = threading.Thread(target=lambda: (process.stdin.write(payload), process.stdin.flush()))  # type: ignore[union-attr]
        writer.start()
        assert process.stdout.read(len(payload)) == payload
        writer.join()
        process.stdin.close()  # the end of stdin ends the connection and the command
        assert process.wait(30) == 0
        assert b"Traceback" not in process.stderr.read()

    # The guest's end ends it too: httpd answers an HTTP/1.0 request and closes the connection; stdin stays open.
    with stdio_tunnel(me, "8000") as process:
        assert process.stdin and process.stdout and process.stderr
        process.stdin.write(b"GET / HTTP/1.0\r\n\r\n")
        process.stdin.flush()
        answer = process.stdout.read()
        assert process.wait() == 0, process.stderr.read()
        assert answer.startswith(b"HTTP/1.") and answer.endswith(b"hello-from-the-vm\n"), answer


def test_another_organizations_vm_is_not_found(site: Site, web: str) -> None:
    outsider = site.user("outsider")
    for args in (
        ["tunnel", web, "0:8000"],
        ["tunnel", "--stdio", web, "8000"],
        ["ssh-config", web],
        ["connect", "--ssh", web],
        ["domain", "create", "stolen", web],
    ):
        refused = outsider.vers(*args, expect=1, stdin="")
        assert refused.stderr.startswith("Error: ") and refused.stderr.endswith("(HTTP 404)\n"), (args, refused.stderr)
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stdout == ""


def _ssh(
    user: User, config: Path, host: str, *command: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", host, *command],
        env=env or user.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ssh_config_lets_openssh_scp_rsync_and_git_in(me: User, web: str, tmp_path: Path) -> None:
    block = me.vers("ssh-config", "web").stdout
    key = config_dir(me) / "keys" / web
    assert block.startswith(f"Host web\n  HostName {web}\n  User root\n  IdentityFile {key}\n")
    assert f"{VERS.resolve()} tunnel --stdio %h 22\n" in block
    for line in ("IdentitiesOnly yes", "StrictHostKeyChecking no", "UserKnownHostsFile /dev/null", "LogLevel ERROR"):
        assert f"\n  {line}\n" in block
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert me.json("ssh-config", "web") == {"host": "web", "vm_id": web, "identity_file": str(key), "config": block}

    config = tmp_path / "ssh_config"
    config.write_text(block)
    # Pasted into a config that a shell without VERS_* in its environment uses.
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    hello = _ssh(me, config, "web", "echo hi-$((40+2)); cat /www/index.html", env=bare)
    assert (hello.returncode, hello.stdout) == (0, "hi-42\nhello-from-the-vm\n"), hello.stderr

    sent = tmp_path / "big"
    sent.write_bytes(os.urandom(50 << 20))
    scp = ["scp", "-F", str(config), "-o", "BatchMode=yes"]
    subprocess.run([*scp, str(sent), "web:/root/big"], env=me.env, check=True, capture_output=True, timeout=900)
    assert guest_sums(me, "web", "/root/big") == {"big": sha256(sent.read_bytes())}
    back = tmp_path / "back"
    subprocess.run([*scp, "web:/root/big", str(back)], env=me.env, check=True, capture_output=True, timeout=900)
    assert sha256(back.read_bytes()) == sha256(sent.read_bytes())
    me.vers("exec", "web", "--", "rm /root/big")

    # rsync and git over the same Host block
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("alpha\n")
    (tree / "run.sh").write_text("#!/bin/sh\n")
    (tree / "run.sh").chmod(0o755)
    rsync = ["rsync", "-a", "-e", f"ssh -F {config} -o BatchMode=yes"]
    subprocess.run([*rsync, f"{tree}/", "web:/root/tree/"], env=me.env, check=True, capture_output=True, timeout=300)
    assert me.vers("exec", "web", "--", "cat /root/tree/sub/a.txt && stat -c %a /root/tree/run.sh").stdout == "alpha\n755\n"
    subprocess.run([*rsync, "web:/root/tree/", f"{tmp_path}/again/"], env=me.env, check=True, capture_output=True, timeout=300)
    assert (tmp_path / "again" / "sub" / "a.txt").read_text() == "alpha\n"
    me.vers("exec", "web", "--", "git init -q --bare /srv/repo.git")
    git_env = {**me.env, "GIT_SSH_COMMAND": f"ssh -F {config} -o BatchMode=yes"}
    cloned = subprocess.run(["git", "clone", "-q", "web:/srv/repo.git", str(tmp_path / "clone")], env=git_env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cloned.returncode == 0, cloned.stderr


def test_connect_ssh_runs_ssh_with_the_arguments_after_the_separator(me: User, web: str) -> None:
    answered = me.vers("connect", "--ssh", "web", "--", "-o", "BatchMode=yes", "echo via-ssh-$((6*7))")
    assert answered.stdout == "via-ssh-42\n"
    written = config_dir(me) / "ssh" / f"{web}.config"
    assert written.read_text().startswith(f"Host web\n  HostName {web}\n")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_a_branch_takes_its_own_key_and_refuses_its_sources(me: User, web: str, tmp_path: Path) -> None:
    source_block = me.vers("ssh-config", "web").stdout
    branch = me.json("branch", "web", "--vm-alias", "web-copy")["vms"][0]["vm_id"]

    # The source's key, offered to the branch before anyone asked for the branch's key.
    stolen = tmp_path / "stolen"
    stolen.write_text(source_block.replace("Host web\n", "Host web-copy\n").replace(f"HostName {web}\n", f"HostName {branch}\n"))
    refused = _ssh(me, stolen, "web-copy", "echo in")
    assert refused.returncode == 255 and "Permission denied" in refused.stderr, refused

    block = me.vers("ssh-config", "web-copy").stdout
    assert block.startswith(f"Host web-copy\n  HostName {branch}\n")
    keys = config_dir(me) / "keys"
    assert (keys / branch).read_text() != (keys / web).read_text()
    config = tmp_path / "branch"
    config.write_text(block)
    inside = _ssh(me, config, "web-copy", "cat /www/index.html")
    assert (inside.returncode, inside.stdout) == (0, "hello-from-the-vm\n"), inside.stderr

    # The source still takes its own key.
    config.write_text(source_block)
    assert _ssh(me, config, "web", "echo source").stdout == "source\n"
    me.vers("kill", "web-copy")
    assert not (keys / branch).exists()  # a deleted VM's key is not kept


def test_run_network_none_is_reached_by_tunnels(me: User, web: str) -> None:
    assert me.json("run", "--network", "none", "--vm-alias", "offline")["alias"] == "offline"
    assert me.json("status", "offline")["network"] == "none"
    assert me.json("status", "web")["network"] == "nat"
    me.vers("exec", "offline", "--", "mkdir -p /www && echo offline-ok > /www/index.html && httpd -p 8000 -h /www")
    with tunnel(me, "offline", "0:8000") as (port, _), http() as client:
        assert client.get(f"http://127.0.0.1:{port}/").text == "offline-ok\n"
    me.vers("kill", "offline")


def test_domains_are_created_listed_and_deleted_by_name_or_id(me: User, web: str) -> None:
    created = me.json("domain", "create", "my-site", "web", "--port", "8000")
    assert created["domain"].startswith("my-site.")
    assert (created["vm_id"], created["port"], created["is_public"]) == (web, 8000, False)
    suffix = created["domain"].removeprefix("my-site.")
    shown = me.vers("domain", "create", "Open", "web", "--public").stdout
    other = re.fullmatch(rf"✓ open\.{re.escape(suffix)} → VM {web}:80 \(public\)\n  ID: (?P<id>\S+)\n", shown)
    assert other, shown

    listed = me.json("domain", "list", "--vm", "web")
    assert {(d["domain"], d["port"], d["is_public"]) for d in listed} == {(created["domain"], 8000, False), (f"open.{suffix}", 80, True)}
    table = me.vers("domain", "list").stdout
    assert created["domain"] in table and f"{web}:8000" in table and "public" in table

    results = me.json("domain", "delete", "my-site", other["id"], "nope", expect=1)["results"]
    assert [(r["name"], r["deleted"]) for r in results] == [("my-site", True), (other["id"], True), ("nope", False)]
    assert "no domain 'nope'" in results[2]["error"]
    assert me.json("domain", "list") == []
    assert me.vers("domain", "list").stdout == "No domains: `vers domain create NAME` makes one.\n"


def test_a_domain_reaches_the_vm_port(site: Site, me: User, web: str) -> None:
    created = me.json("domain", "create", "hello", "web", "--port", "8000")
    key = json.loads((config_dir(me) / "config.json").read_text())["api_key"]
    with http() as client:
        answer = client.get(site.env["VERS_URL"] + "/", headers={"Host": created["domain"], "Authorization": f"Bearer {key}"})
    assert (answer.status_code, answer.text) == (200, "hello-from-the-vm\n")
    assert me.vers("domain", "delete", created["domain"]).stdout == f"✓ Deleted domain {created['domain']}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tunnel", "dev", "x"], "remote port 'x' is not a port number (1-65535)"),
        (["tunnel", "dev", "0"], "remote port '0' is not a port number"),
        (["tunnel", "dev", "65536"], "remote port '65536' is not a port number"),
        (["tunnel", "dev", "a:80"], "local port 'a' is not a port number (0-65535)"),
        (["tunnel", "dev"], "Missing argument '[LOCAL:]REMOTE'"),
        (["tunnel", "--stdio", "dev", "8080:80"], "--stdio takes the VM's port alone"),
        (["tunnel", "--stdio", "--format", "json", "dev", "22"], "no --format"),
        (["run", "--network", "bridge"], "'bridge' is not one of 'nat', 'none'"),
        (["domain", "create", "x", "--port", "0"], "Invalid value for '--port'"),
        (["domain", "delete"], "Missing argument 'DOMAIN_ID_OR_NAME...'"),
        (["connect", "dev", "--", "-v"], "arguments after -- are for ssh: add --ssh"),
    ],
)
def test_bad_arguments_are_usage_errors_before_any_request(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "VERS_URL": "http://127.0.0.1:9", "VERS_API_KEY": "vers_x", "VERS_CONFIG_DIR": str(tmp_path)}
    result = subprocess.run([VERS, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "cannot reach" not in result.stderr
