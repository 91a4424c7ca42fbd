"""`make run`: start the three services and the gateway on the embedded defaults, stop them together.

The first start also creates an organization for the person at the keyboard and keeps its key in the
data folder (mode 0600), so every start can print what to export.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time

import httpx

from services.common.files import write_atomic
from services.common.server import PROCESS_UMASK
from services.common.settings import SERVICES, Settings, get_settings

PROCESSES = (*SERVICES, "gateway")
FIRST_ORG_KEY_FILE = "first-org.key"


def start_processes(settings: Settings) -> dict[str, subprocess.Popen[bytes]]:
    env = {**os.environ, "VERS_DATA_DIR": str(settings.data_dir.resolve())}
    return {name: subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env) for name in PROCESSES}


def gateway_url(settings: Settings) -> str:
    return settings.http_url


def own_gateway_tls(settings: Settings) -> ssl.SSLContext | bool:
    """How this process checks the gateway it started: it must present the very certificate it was given
    (its name is the public host's, not the loopback address this process reaches it on)."""
    if not settings.http_tls_cert_file:
        return True
    context = ssl.create_default_context(cafile=settings.http_tls_cert_file)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def wait_healthy(settings: Settings, children: dict[str, subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [name for name, child in children.items() if child.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited during start-up; see the log above")
        try:
            if httpx.get(f"{gateway_url(settings)}/healthz", timeout=2, verify=own_gateway_tls(settings)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the platform was not healthy within {timeout:.0f} s")


def first_org_key(settings: Settings) -> tuple[str, str]:
    """(org name, API key) of the first organization, created on the first start."""
    key_file = settings.data_dir / FIRST_ORG_KEY_FILE
    if not key_file.exists():
        answer = httpx.post(
            f"{gateway_url(settings)}/api/v1/admin/orgs",
            json={"name": settings.first_org},
            headers={"Authorization": f"Bearer {settings.admin_key_file.read_text().strip()}"},
            timeout=60,
            verify=own_gateway_tls(settings),
        )
        if answer.status_code != 201:
            raise RuntimeError(f"cannot create the organization {settings.first_org!r}: {answer.text}")
        # whole or absent after a crash, 0600 from the first byte; a file already there is kept
        write_atomic(key_file, f"{settings.first_org} {answer.json()['token']}\n", 0o600, exclusive=True)
    name, _, key = key_file.read_text().strip().partition(" ")
    return name, key


# How long the orchestrator may take on a stop, beyond the grace period: it puts running VMs to sleep.
ORCHESTRATOR_STOP_SECONDS = 300


def stop(children: dict[str, subprocess.Popen[bytes]], grace: float) -> int:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    started = time.monotonic()
    for name, child in children.items():
        deadline = started + grace + 5 + (ORCHESTRATOR_STOP_SECONDS if name == "orchestrator" else 0)
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly
    failed = [name for name, child in children.items() if child.returncode not in (0, -signal.SIGTERM)]
    if failed:
        print(f"vers: {', '.join(failed)} did not stop cleanly", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    os.umask(PROCESS_UMASK)  # inherited by every service it starts
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    children = start_processes(settings)
    try:
        wait_healthy(settings, children)
        org, key = first_org_key(settings)
    except Exception as error:
        print(f"vers: {error}", file=sys.stderr)
        stop(children, settings.shutdown_grace_seconds)
        return 1
    print(
        f"\nVers is running (data in {settings.data_dir.resolve()}). Organization {org!r} is ready:\n\n"
        f"  export VERS_URL={gateway_url(settings)}\n"
        f"  export VERS_API_KEY={key}\n\n"
        f"Ctrl-C stops every process.\n",
        flush=True,
    )
    while not stopping:
        exited = [name for name, child in children.items() if child.poll() is not None]
        if exited:
            print(f"vers: {', '.join(exited)} exited; stopping the platform", file=sys.stderr)
            stop(children, settings.shutdown_grace_seconds)
            return 1
        time.sleep(0.2)
    print("vers: stopping", file=sys.stderr)
    return stop(children, settings.shutdown_grace_seconds)


if __name__ == "__main__":
    sys.exit(main())
