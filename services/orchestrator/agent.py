"""Exec in the guest over the virtio-serial port "agent", where a plain `sh` reads commands.

Each command runs in the background of that shell, so several run at once and none holds the port:
its stdout and stderr go through `cat` into files it may not grow past the cap (a command that writes
more has its pipe closed, as with `| head -c`), and when it ends its output comes back in frames, each written
with one `write()` of at most 32 KiB, which the guest's virtio-console driver queues whole, so frames
of concurrent commands never interleave:

    \\n<<C:NONCE:o|e:LENGTH>>\\n  followed by LENGTH bytes of stdout (o) or stderr (e)
    \\n<<E:NONCE:EXIT_CODE:STDOUT_TRUNCATED:STDERR_TRUNCATED>>\\n

One reader per VM reads the port all the time: frames go to the exec that waits for their nonce, and
everything else (a guest writing to the port on its own, answers nobody waits for) is dropped as it
arrives, so nothing the guest writes accumulates here. Lengths are read from the headers, so output is
never searched for markers.

A streamed command (`stream=True`) sends its output as it is written instead: a reader per stream keeps the
FIFO open and reads it one `read()` at a time (`dd bs=CHUNK count=1`: a short read is a short frame, an empty
one is the end), and sends each piece as one frame at once, in the same format and with the same guarantees;
past the cap it stops reading, so the command finds its pipe closed, and the end marker says so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import Conflict, DeadlineExceeded, InvalidArgument, ResourceExhausted

# One frame's data: with its header it stays under the 32 KiB the guest driver takes in one write.
CHUNK = 32000
HEADER = re.compile(rb"\n<<(?:C:([0-9a-f]{16}):([oe]):(\d{1,5})|E:([0-9a-f]{16}):(-?\d{1,3}):([01]):([01]))>>\n")
# A header is short: a start marker with no end of header this far on is not a header.
MAX_HEADER = 64
READ_SIZE = 1 << 16
# What one VM's port may make this process read per second; a guest writing faster waits on its own
# port (the socket's buffers fill and QEMU stops taking its writes).
MAX_READ_RATE = 16 * 1024 * 1024
# ...and the time this process may spend a second reading one VM's frames and handing them on (a guest
# sending nothing but markers, or a streamed command writing a byte at a time, costs more per byte than one
# sending data): a fiftieth of a core per VM at most.
MAX_PARSE_SECONDS = 0.02
# What a command still waiting is told when its VM's port closes and nobody said why.
STOPPED = "the VM stopped while the command ran"
# How long writing one command to the port may take.
SEND_SECONDS = 30.0


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False


def guest_script(
    nonce: str,
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    working_dir: str = "",
    timeout_secs: int = 0,
    max_output: int = 1024 * 1024,
    stream: bool = False,
) -> bytes:
    if not command:
        raise InvalidArgument('command is empty: give the program and its arguments, e.g. ["sh", "-c", "ls"]')
    for key in env or {}:
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise InvalidArgument(f"environment variable name {key!r} is not a valid shell identifier")
    words = [shlex.quote(part) for part in command]
    if timeout_secs > 0:
        words = ["timeout", "-s", "KILL", str(timeout_secs), *words]
    run = " ".join(words)
    if working_dir:
        run = f"cd {shlex.quote(working_dir)} && {run}"
    files = f"/run/vers/{nonce}"
    source = "/dev/null"
    prepare = ""
    if stdin:
        source = f"{files}.in"
        prepare = f"printf %s {base64.b64encode(stdin).decode()} | base64 -d > {source}; "
    if env:
        # The variables (the org's secrets among them) reach the command through a file only root reads,
        # removed before it runs: on its command line any user of the guest would read them in /proc.
        exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())
        prepare += f"(umask 077; printf %s {base64.b64encode(exports.encode()).decode()} | base64 -d > {files}.env); "
        run = f". {files}.env && rm -f {files}.env && {run}"
    line = (
        (STREAM_JOB if stream else JOB)
        .replace("@F@", files)
        .replace("@NONCE@", nonce)
        .replace("@BLOCKS@", str(max_output // 512 + 1))
        .replace("@MAX@", str(max_output))
        .replace("@CHUNK@", str(CHUNK))
        .replace("@SOURCE@", source)
        .replace("@PREPARE@", prepare)
        .replace("@RUN@", run)  # last: the command's own text is never read for placeholders
    )
    # The leading newline ends any half line a restored or restarted guest shell may hold.
    return b"\n" + line.encode() + b"\n"


# One command as a background job of the agent shell. Its stdout and stderr go through FIFOs to `cat`, which
# writes what it reads at once (nothing is lost when it is stopped), into a file it may not grow past
# @BLOCKS@ blocks of 512 bytes, more than @MAX@: at that size `cat` ends (SIGXFSZ) and a command writing on
# finds its pipe closed; the bytes past @MAX@ say it wrote more. (`head -c` would hold its last bytes in a
# buffer, and GNU `dd` counts short reads from a pipe as whole blocks.) The answer waits for the command, not
# for processes it left running with its output open: those are read for one second more, then no longer.
# s STREAM FILE SIZE sends a file in frames.
JOB = " ".join(
    """
( @PREPARE@ mkfifo @F@.po @F@.pe;
( ulimit -f @BLOCKS@; exec cat <@F@.po >@F@.o ) 2>/dev/null & a=$!;
( ulimit -f @BLOCKS@; exec cat <@F@.pe >@F@.e ) 2>/dev/null & b=$!;
( @RUN@ ) <@SOURCE@ >@F@.po 2>@F@.pe; r=$?;
( sleep 1; kill $a $b ) 2>/dev/null & w=$!; wait $a $b; kill $w;
s() { i=0; while [ $i -lt $3 ]; do n=$(($3-i)); [ $n -gt @CHUNK@ ] && n=@CHUNK@;
{ printf '\\n<<C:%s:%s:%s>>\\n' @NONCE@ $1 $n; dd if=$2 bs=@CHUNK@ skip=$((i/@CHUNK@)) count=1 2>/dev/null; } >@F@.f;
dd if=@F@.f bs=32768 count=1 2>/dev/null; i=$((i+n)); done; };
set -- $(stat -c %s @F@.o @F@.e); so=$1; se=$2; ot=0; et=0;
[ "$so" -gt @MAX@ ] && { truncate -s @MAX@ @F@.o; so=@MAX@; ot=1; };
[ "$se" -gt @MAX@ ] && { truncate -s @MAX@ @F@.e; se=@MAX@; et=1; };
s o @F@.o $so; s e @F@.e $se; rm -f @F@.o @F@.e @F@.po @F@.pe @F@.f @F@.in @F@.env;
printf '\\n<<E:%s:%s:%s:%s>>\\n' @NONCE@ "$r" $ot $et ) </dev/null 2>/dev/null &
""".split()  # noqa: SIM905 - the script reads as shell; one space between its words
)


# A streamed command: each stream's FIFO is read by `p o|e FIFO`, which sends what one read() gives as one
# frame at once (the frame is made in a file first, so it leaves in one write); past @MAX@ bytes it marks the
# stream cut (FIFO.t) and stops reading, so the command finds its pipe closed. The answer waits for the
# command and its readers, and for processes it left running with its output open one second more.
STREAM_JOB = " ".join(
    """
( @PREPARE@ mkfifo @F@.po @F@.pe;
p() { exec 3<$2; t=0; while :; do dd bs=@CHUNK@ count=1 <&3 >$2.d 2>/dev/null; n=$(stat -c %s $2.d);
[ "$n" -gt 0 ] || break; c=0; [ $((t+n)) -gt @MAX@ ] && { n=$((@MAX@-t)); truncate -s $n $2.d; : >$2.t; c=1; };
[ "$n" -gt 0 ] && { printf '\\n<<C:%s:%s:%s>>\\n' @NONCE@ $1 $n; cat $2.d; } >$2.f && dd if=$2.f bs=32768 count=1 2>/dev/null;
t=$((t+n)); [ $c = 1 ] && break; done; };
( p o @F@.po ) 2>/dev/null & a=$!; ( p e @F@.pe ) 2>/dev/null & b=$!;
( @RUN@ ) <@SOURCE@ >@F@.po 2>@F@.pe; r=$?;
( sleep 1; kill $a $b ) 2>/dev/null & w=$!; wait $a $b; kill $w;
ot=0; et=0; [ -e @F@.po.t ] && ot=1; [ -e @F@.pe.t ] && et=1;
rm -f @F@.po @F@.pe @F@.po.d @F@.pe.d @F@.po.f @F@.pe.f @F@.po.t @F@.pe.t @F@.in @F@.env;
printf '\\n<<E:%s:%s:%s:%s>>\\n' @NONCE@ "$r" $ot $et ) </dev/null 2>/dev/null &
""".split()  # noqa: SIM905 - the script reads as shell; one space between its words
)

# Receives a streamed command's output as it comes: ("stdout" or "stderr", bytes).
OnOutput = Callable[[str, bytes], None]


@dataclass
class _Pending:
    limit: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    done: asyncio.Future[ExecResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # A streamed command: its output goes here as it comes, and only its size is kept (the cap holds here
    # too, whatever a guest that knows the nonce sends).
    on_output: OnOutput | None = None
    sizes: dict[bytes, int] = field(default_factory=lambda: {b"o": 0, b"e": 0})

    def add(self, stream: bytes, data: bytes) -> None:
        if self.on_output is not None:
            room = self.limit - self.sizes[stream]
            if room > 0 and data:
                self.sizes[stream] += min(room, len(data))
                self.on_output("stdout" if stream == b"o" else "stderr", data[:room])
            return
        target = self.stdout if stream == b"o" else self.stderr
        room = self.limit - len(target)
        if room > 0:
            target += data[:room]


class FrameReader:
    """Splits what the port sends into frames; everything outside a frame is dropped. Holds at most one
    unfinished header and one frame's data, whatever the guest sends."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.body: tuple[bytes, bytes, int] | None = None  # nonce, stream, bytes still to come

    def feed(self, data: bytes) -> list[tuple[str, bytes, bytes | tuple[int, bool, bool]]]:
        """The frames `data` completes. The buffer is scanned by position and cut once, so the cost stays
        linear in what arrives whatever it holds."""
        frames: list[tuple[str, bytes, bytes | tuple[int, bool, bool]]] = []
        buffer = self.buffer
        buffer += data
        at = 0
        while at < len(buffer):
            if self.body is not None:
                nonce, stream, missing = self.body
                take = bytes(buffer[at : at + missing])
                at += len(take)
                frames.append(("chunk", nonce + b":" + stream, take))
                self.body = (nonce, stream, missing - len(take)) if missing > len(take) else None
                continue
            match = HEADER.search(buffer, at)
            if match is None:
                # Only a header still arriving is kept: one that begins in the last bytes.
                partial = buffer.rfind(b"\n<<", max(at, len(buffer) - MAX_HEADER))
                at = partial if partial >= 0 else max(at, len(buffer) - 2)
                break
            # The groups are read before the buffer changes: a match on a bytearray reads it when asked.
            chunk_nonce, stream, length, end_nonce, code, out_cut, err_cut = (bytes(g) if g else b"" for g in match.groups())
            at = match.end()
            if chunk_nonce:
                if int(length) <= CHUNK and int(length):  # no frame of ours is longer: such data is dropped as it comes
                    self.body = (chunk_nonce, stream, int(length))
            else:
                frames.append(("end", end_nonce, (int(code), out_cut == b"1", err_cut == b"1")))
        del buffer[:at]
        return frames

    def reset(self) -> None:
        self.buffer.clear()
        self.body = None


class Agent:
    """One connection to a VM's agent port; any number of commands run at once, each known by its nonce."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        # Held while a command is written, so commands reach the guest whole and one after another (a
        # commit holds it too: the snapshot never has half a command on the way).
        self.lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[str, _Pending] = {}
        self._handshake = False
        self._handshake_lock = asyncio.Lock()
        self._closed_because = ""

    @contextlib.asynccontextmanager
    async def sending(self) -> AsyncIterator[None]:
        """The turn to write to the port (a command is written whole, and a commit snapshots none half
        written); a guest that does not read makes the wait end with DeadlineExceeded, never hang."""
        try:
            async with asyncio.timeout(SEND_SECONDS * 2):
                await self.lock.acquire()
        except TimeoutError:
            raise DeadlineExceeded("the guest does not read its agent port: its commands cannot be sent") from None
        try:
            yield
        finally:
            self.lock.release()

    @property
    def running(self) -> int:
        """Commands sent and not answered yet."""
        return len(self._pending)

    async def connect(self, handshake: bool = False) -> None:
        """Open the port. With `handshake`, for a guest that is already running (adopted), the first
        command waits until a ping is answered: the guest may still believe the host side closed, and
        would drop an answer, so only idempotent pings are risked until one comes back."""
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path), limit=READ_SIZE)
            self._handshake = handshake
            self._closed_because = ""
            self._reading = asyncio.create_task(self._read(self._reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        frames = FrameReader()
        loop = asyncio.get_running_loop()
        window_start, window_bytes, window_cpu = loop.time(), 0, 0.0
        try:
            while chunk := await reader.read(READ_SIZE):
                window_bytes += len(chunk)
                parsing = time.perf_counter()
                if not self._pending:  # nobody waits for an answer: what the guest sends goes unread
                    frames.reset()
                else:
                    # The time this costs counts, what a streamed command's output is handed to included (its
                    # log, its events): a guest sending many tiny frames pays for them in its own budget.
                    self._dispatch(frames.feed(chunk))
                    window_cpu += time.perf_counter() - parsing
                elapsed = loop.time() - window_start
                if window_bytes >= MAX_READ_RATE or window_cpu >= MAX_PARSE_SECONDS:
                    # A flooding guest: read no more of it this second (it waits on its own port).
                    if elapsed < 1.0:
                        await asyncio.sleep(1.0 - elapsed)
                    window_start, window_bytes, window_cpu = loop.time(), 0, 0.0
                elif elapsed >= 1.0:
                    window_start, window_bytes, window_cpu = loop.time(), 0, 0.0
        except (ConnectionError, OSError):
            pass
        finally:
            self._fail_pending(self._closed_because or STOPPED)

    def _dispatch(self, found: list[tuple[str, bytes, bytes | tuple[int, bool, bool]]]) -> None:
        # Adjacent pieces of one command's stream (one read may hold many small frames) go on as one.
        merged: list[tuple[str, bytes, bytes | tuple[int, bool, bool]]] = []
        for kind, key, value in found:
            if kind == "chunk" and merged and merged[-1][0] == "chunk" and merged[-1][1] == key:
                previous = merged[-1][2]
                assert isinstance(previous, bytes) and isinstance(value, bytes)
                merged[-1] = (kind, key, previous + value)
            else:
                merged.append((kind, key, value))
        for kind, key, value in merged:
            if kind == "chunk":
                nonce, stream = key.split(b":")
                if (pending := self._pending.get(nonce.decode())) is not None:
                    assert isinstance(value, bytes)
                    pending.add(stream, value)
            elif (pending := self._pending.pop(key.decode(), None)) is not None and not pending.done.done():
                assert isinstance(value, tuple)
                code, out_cut, err_cut = value
                pending.done.set_result(ExecResult(code, bytes(pending.stdout), bytes(pending.stderr), out_cut, err_cut))

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if not waiter.done.done():
                waiter.done.set_exception(Conflict(reason))

    async def _send(self, script: bytes, nonce: str, limit: int, timeout: float | None, on_output: OnOutput | None = None) -> ExecResult:
        pending = _Pending(limit, on_output=on_output)
        self._pending[nonce] = pending
        try:
            async with self.sending():
                await self.connect()
                assert self._writer is not None
                if self._writer.transport.get_write_buffer_size():
                    # An earlier command is still on its way: the guest does not read; nothing more is queued.
                    raise DeadlineExceeded("the guest does not read its agent port: the command could not be sent")
                self._writer.write(script)
                try:
                    await asyncio.wait_for(self._writer.drain(), SEND_SECONDS)
                except TimeoutError:
                    raise DeadlineExceeded("the guest does not read its agent port: the command could not be sent") from None
            try:
                return await asyncio.wait_for(asyncio.shield(pending.done), timeout)
            except TimeoutError:
                raise DeadlineExceeded(f"the guest did not answer within {timeout:.0f} s") from None
        finally:
            self._pending.pop(nonce, None)

    async def _ping_until_answered(self, timeout: float, attempt: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            nonce = secrets.token_hex(8)
            try:
                await self._send(guest_script(nonce, ["true"]), nonce, 0, attempt)
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
        max_output: int = 1024 * 1024,
        max_running: int = 0,
        on_output: OnOutput | None = None,
    ) -> ExecResult:
        """Run a command; with `max_running`, refused when that many already run on this VM. With
        `on_output`, its output goes there as the command writes it (the result then holds none)."""
        if max_running and self.running >= max_running:
            raise ResourceExhausted(
                f"{self.running} commands already run in this VM, the most at once (VERS_VM_MAX_EXECS): wait for "
                f"one to end, or raise VERS_VM_MAX_EXECS"
            )
        nonce = secrets.token_hex(8)
        script = guest_script(nonce, command, env, stdin, working_dir, timeout_secs, max_output, stream=on_output is not None)
        if wait is None and timeout_secs > 0:
            wait = timeout_secs + 10.0
        if self._handshake:
            async with self._handshake_lock:
                if self._handshake:
                    await self.connect()
                    await self._ping_until_answered(timeout=60.0, attempt=1.0)
        return await self._send(script, nonce, max_output, wait, on_output)

    async def wait_ready(self, timeout: float, attempt: float = 1.0) -> None:
        """Ping until the guest answers. The guest driver drops what arrives after it loads but before
        the agent shell opens the port, so one ping may vanish: each attempt has its own nonce."""
        await self.connect()
        await self._ping_until_answered(timeout, attempt)

    def closing(self, reason: str) -> None:
        """The VM is about to stop (sleep, delete): commands still waiting will fail with `reason`."""
        self._closed_because = reason

    async def close(self, reason: str = "") -> None:
        """Close the port; commands still waiting fail with `reason` (what happened to the VM)."""
        self._closed_because = reason or self._closed_because
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reading
            self._reading = None
        self._fail_pending(self._closed_because or STOPPED)
