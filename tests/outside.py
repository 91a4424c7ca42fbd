"""A host on "the internet" as guests see it, built on this machine: a network namespace joined to the
host by a veth pair, serving HTTP (files and git repositories over git's dumb HTTP) and DNS (git.test
resolves to it). Guests reach it only when VERS_GUEST_ALLOW names its address."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

GIT = ["git", "-c", "user.email=ci@example.test", "-c", "user.name=ci", "-c", "init.defaultBranch=main"]


def _ip(*args: str, netns: str = "") -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)


@dataclass
class Outside:
    netns: str
    address: str  # the server's address, for VERS_GUEST_ALLOW and VERS_GUEST_DNS
    host_side: str  # this host's end of the link
    folder: Path  # what the HTTP server serves

    def publish_repository(self, name: str, source: Path) -> str:
        """Push `source` (a git working tree) to a bare repository served as http://git.test:8080/<name>.git."""
        bare = self.folder / f"{name}.git"
        if not bare.exists():
            subprocess.run([*GIT, "init", "-q", "--bare", str(bare)], check=True)
        subprocess.run([*GIT, "-C", str(source), "push", "-q", "--force", str(bare), "HEAD:refs/heads/main"], check=True)
        subprocess.run([*GIT, "-C", str(bare), "update-server-info"], check=True)
        return f"http://git.test:8080/{name}.git"


@contextlib.contextmanager
def outside_world(folder: Path) -> Iterator[Outside]:
    folder.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)
    netns, host_if, inner_if = f"vt-{tag}", f"vto-{tag}", f"vti-{tag}"
    octet = int(tag[:2], 16)
    host_side, address = f"198.18.{octet}.1", f"198.18.{octet}.2"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", inner_if, "netns", netns)
        _ip("addr", "add", f"{host_side}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("addr", "add", f"{address}/30", "dev", inner_if, netns=netns)
        _ip("link", "set", inner_if, "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        _ip("route", "add", "default", "via", host_side, netns=netns)
        inside = ["ip", "netns", "exec", netns]
        processes.append(subprocess.Popen(
            [*inside, sys.executable, "-m", "http.server", "8080", "--bind", address, "--directory", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        processes.append(subprocess.Popen(
            [*inside, "/usr/sbin/dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
             f"--listen-address={address}", f"--address=/git.test/{address}", "--pid-file=", "--user=root"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        deadline = time.monotonic() + 20
        probe = [*inside, "bash", "-c", f"exec 3<>/dev/tcp/{address}/8080"]
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "the outside HTTP server did not start"
            time.sleep(0.1)
        yield Outside(netns, address, host_side, folder)
    finally:
        for process in processes:
            process.kill()
            process.wait()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
