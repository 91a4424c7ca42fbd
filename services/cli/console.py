"""`vers connect`: the VM's console in this terminal, over the gateway's WebSocket.

The terminal is put in raw mode so keys (Ctrl-C, arrows, Tab) reach the guest's shell, and is restored
however the session ends. Ctrl-] leaves; so does `exit`, which the server reports by closing the socket.
With stdin not a terminal, its lines are typed into the console and its end is a Ctrl-D.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from types import FrameType

import websockets
from websockets.sync.client import ClientConnection, connect

from services.client import ApiError, Unreachable, seg, unreachable

DETACH = b"\x1d"  # Ctrl-]
END_OF_INPUT = b"\x04"  # Ctrl-D: the shell's own "no more input"


def websocket_url(base_url: str, path: str) -> str:
    scheme, _, rest = base_url.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"


def console_url(base_url: str, vm_id: str) -> str:
    return websocket_url(base_url, f"/api/v1/vm/{seg(vm_id)}/console")


def refusal(error: websockets.InvalidStatus, what: str = "the console") -> ApiError:
    """A refused handshake as the REST calls' error: the server's JSON message and its HTTP status."""
    response = error.response
    try:
        body = json.loads(response.body or b"")
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        return ApiError(response.status_code, str(body["error"]), str(body.get("code", "")))
    return ApiError(response.status_code, f"{what} was refused with HTTP {response.status_code}")


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _send_size(socket: ClientConnection) -> None:
    size = shutil.get_terminal_size()
    socket.send(json.dumps({"rows": size.lines, "cols": size.columns}))


class Session:
    def __init__(self, socket: ClientConnection, stdin: int, stdout: int) -> None:
        self.socket = socket
        self.stdin = stdin
        self.stdout = stdout
        self.detached = False
        self._wake_read, self._wake_write = os.pipe()

    def _print_output(self) -> None:
        try:
            for message in self.socket:
                if isinstance(message, bytes):
                    os.write(self.stdout, message)
        except websockets.ConnectionClosed:
            pass
        finally:
            os.write(self._wake_write, b"x")

    def _type_input(self) -> None:
        """Keystrokes to the VM until Ctrl-], the end of stdin, or the server ending the session."""
        while True:
            ready, _, _ = select.select([self.stdin, self._wake_read], [], [])
            if self._wake_read in ready:
                return
            data = os.read(self.stdin, 4096)
            if not data:
                self.socket.send(END_OF_INPUT)
                os.read(self._wake_read, 1)  # wait for the shell to exit and the server to close
                return
            before, detach, _ = data.partition(DETACH)
            if before:
                self.socket.send(before)
            if detach:
                self.detached = True
                return

    def run(self) -> None:
        printer = threading.Thread(target=self._print_output, daemon=True)
        printer.start()
        interactive = os.isatty(self.stdin)
        previous = None
        if interactive:
            _send_size(self.socket)
            previous = signal.signal(signal.SIGWINCH, self._resized)
            self.socket.send(b"\r")  # a fresh prompt, since the last one was drawn before we came
        try:
            with raw_terminal(self.stdin):
                self._type_input()
        finally:
            if previous is not None:
                signal.signal(signal.SIGWINCH, previous)
            self.socket.close()
            printer.join(timeout=5)
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _resized(self, _signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            _send_size(self.socket)


def open_console(base_url: str, api_key: str, vm_id: str) -> Session:
    try:
        socket = connect(
            console_url(base_url, vm_id),
            additional_headers={"Authorization": f"Bearer {api_key}"},
            open_timeout=120,
            max_size=None,
        )
    except websockets.InvalidStatus as error:
        raise refusal(error) from None
    except (OSError, TimeoutError, websockets.InvalidHandshake) as error:
        raise Unreachable(unreachable(base_url, error)) from None
    return Session(socket, sys.stdin.fileno(), sys.stdout.fileno())
