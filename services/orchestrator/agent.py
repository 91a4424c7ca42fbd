"""Exec in the guest over the virtio-serial port "agent", where a plain `sh` reads commands.

Each command is wrapped between markers that carry a random nonce, so output of an earlier, abandoned
command can never be taken for this one's; stderr goes to a file in the guest and follows stdout.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import DeadlineExceeded, InvalidArgument


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


def guest_script(
    nonce: str,
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    working_dir: str = "",
    timeout_secs: int = 0,
) -> bytes:
    if not command:
        raise InvalidArgument("command is empty: give the program and its arguments, e.g. [\"sh\", \"-c\", \"ls\"]")
    for key in env or {}:
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise InvalidArgument(f"environment variable name {key!r} is not a valid shell identifier")
    words = [shlex.quote(part) for part in command]
    if env:
        words = ["env", *(shlex.quote(f"{k}={v}") for k, v in env.items()), *words]
    if timeout_secs > 0:
        words = ["timeout", "-s", "KILL", str(timeout_secs), *words]
    run = " ".join(words)
    if working_dir:
        run = f"cd {shlex.quote(working_dir)} && {run}"
    # Commands run one at a time, so one stderr file serves; it is only read when not empty. Every
    # fork counts right after a restore, when the emulator's translation cache is still cold.
    err = "/run/vers/stderr"
    source = "/dev/null"
    prepare = ""
    if stdin:
        source = "/run/vers/stdin"
        prepare = f"printf %s {base64.b64encode(stdin).decode()} | base64 -d > {source}; "
    line = (
        f"{prepare}printf '\\n<<B:{nonce}>>\\n'; ( {run} ) <{source} 2>{err}; vers_rc=$?; "
        f"printf '\\n<<O:{nonce}>>\\n'; [ -s {err} ] && cat {err}; "
        f"printf '\\n<<E:{nonce}:%s>>\\n' \"$vers_rc\"\n"
    )
    # The leading newline ends any half line a restored or restarted guest shell may hold.
    return b"\n" + line.encode()


def parse_output(buffer: bytes, nonce: str) -> ExecResult | None:
    begin, middle = f"<<B:{nonce}>>\n".encode(), f"\n<<O:{nonce}>>\n".encode()
    end_prefix = f"\n<<E:{nonce}:".encode()
    end = buffer.find(end_prefix)
    if end < 0:
        return None
    closing = buffer.find(b">>\n", end)
    if closing < 0:
        return None
    start = buffer.find(begin)
    split = buffer.find(middle, start)
    if start < 0 or split < 0:
        return None
    return ExecResult(
        exit_code=int(buffer[end + len(end_prefix) : closing]),
        stdout=buffer[start + len(begin) : split],
        stderr=buffer[split + len(middle) : end],
    )


class Agent:
    """One connection to a VM's agent port; commands run one at a time."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._handshake = False

    async def connect(self, handshake: bool = False) -> None:
        """Open the port. With `handshake`, for a guest that is already running (adopted), the first
        command waits until a ping is answered: the guest may still believe the host side closed, and
        would drop an answer, so only idempotent pings are risked until one comes back."""
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path), limit=64 * 1024 * 1024)
            self._handshake = handshake

    async def _roundtrip(self, script: bytes, nonce: str, timeout: float | None) -> ExecResult:
        assert self._reader is not None and self._writer is not None
        self._writer.write(script)
        await self._writer.drain()
        buffer = bytearray()
        end_marker = f"\n<<E:{nonce}:".encode()

        async def read_until_done() -> ExecResult:
            assert self._reader is not None
            while True:
                chunk = await self._reader.read(1 << 20)
                if not chunk:
                    raise ConnectionError("the VM's agent port closed")
                buffer.extend(chunk)
                if end_marker in buffer and (result := parse_output(bytes(buffer), nonce)):
                    return result

        try:
            return await asyncio.wait_for(read_until_done(), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"the guest did not answer within {timeout:.0f} s") from None

    async def _ping_until_answered(self, timeout: float, attempt: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            nonce = secrets.token_hex(8)
            try:
                await self._roundtrip(guest_script(nonce, ["true"]), nonce, attempt)
                self._handshake = False
                return
            except DeadlineExceeded:
                if asyncio.get_running_loop().time() > deadline:
                    raise DeadlineExceeded(f"the guest did not answer within {timeout:.0f} s") from None

    async def exec(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        working_dir: str = "",
        timeout_secs: int = 0,
        wait: float | None = None,
    ) -> ExecResult:
        nonce = secrets.token_hex(8)
        script = guest_script(nonce, command, env, stdin, working_dir, timeout_secs)
        if wait is None and timeout_secs > 0:
            wait = timeout_secs + 10.0
        async with self.lock:
            await self.connect()
            if self._handshake:
                await self._ping_until_answered(timeout=60.0, attempt=1.0)
            return await self._roundtrip(script, nonce, wait)

    async def wait_ready(self, timeout: float, attempt: float = 1.0) -> None:
        """Ping until the guest answers. The guest driver drops what arrives after it loads but before
        the agent shell opens the port, so one ping may vanish: each attempt has its own nonce."""
        async with self.lock:
            await self.connect()
            await self._ping_until_answered(timeout, attempt)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None
