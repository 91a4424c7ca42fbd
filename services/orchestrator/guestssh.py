"""SSH into a guest, as root with the VM's own key, over the engine's connection to the guest's port 22.

The connection never leaves this host (it is a host forward of the VM's user-mode network stack), so the
guest's host key is not checked. asyncssh cannot take the asyncio streams `Engine.connect_port` gives, so
they are handed to it as a "tunnel": an object whose `create_connection` feeds the SSH protocol what the
stream reads and writes what it sends. What arrives is bounded by the SSH channels' windows, which asyncssh
opens again only as a reader consumes the data, so neither side buffers more than a window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from services.common.errors import FailedPrecondition
from services.orchestrator.engine import SSH_PORT

if TYPE_CHECKING:
    from services.orchestrator.engine import Engine
    from services.orchestrator.models import VmRow

log = logging.getLogger(__name__)

# Ciphers the guest's CPU runs fastest under TCG first: OpenSSH's AES-GCM, then ChaCha20 (dropbear has no
# GCM; under TCG it moved 64 MiB out of the guest in 6.5 s against 7.8 s for aes128-ctr, and in the same
# 11 s the other way).
CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr")
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-256", "hmac-sha1")
# How long the SSH handshake and login may take (a guest under TCG on a busy host is slow, not this slow).
LOGIN_SECONDS = 60.0
READ_SIZE = 1 << 16


class _StreamTransport(asyncio.Transport):
    """The transport asyncssh writes to: the writer of the engine's connection."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self._writer = writer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._writer.get_extra_info(name, default)


class _StreamTunnel:
    """What asyncssh.connect(tunnel=...) asks for: the SSH connection runs over these streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pump: asyncio.Task[None] | None = None

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        protocol = session_factory()
        transport = _StreamTransport(self.writer)
        protocol.connection_made(transport)
        self.pump = asyncio.create_task(self._pump(protocol))
        return transport, protocol

    async def _pump(self, protocol: asyncio.Protocol) -> None:
        error: Exception | None = None
        try:
            while data := await self.reader.read(READ_SIZE):
                protocol.data_received(data)
        except (ConnectionError, OSError) as failure:
            error = failure
        protocol.connection_lost(error)

    async def close(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.pump


@contextlib.asynccontextmanager
async def guest_ssh(engine: Engine, vm: VmRow) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """An SSH connection to the guest as root, closed when the block ends."""
    if not vm.network:
        raise FailedPrecondition(
            f"VM {vm.id} has no network card (it was made before VMs had one), and files of any size travel over "
            f"SSH to it: use GET/PUT /vm/{vm.id}/files for small files, or start a new VM"
        )
    key = asyncssh.import_private_key((await engine.ssh_key(vm)).private_key)
    async with engine.connect_port(vm, SSH_PORT) as (reader, writer):
        tunnel = _StreamTunnel(reader, writer)
        try:
            try:
                connection = await asyncio.wait_for(
                    asyncssh.connect(
                        "guest", SSH_PORT, tunnel=tunnel, username="root", client_keys=[key], known_hosts=None,
                        agent_path=None, config=[], preferred_auth=["publickey"], encryption_algs=list(CIPHERS),
                        mac_algs=list(MACS), compression_algs=None, keepalive_interval=0,
                    ),
                    LOGIN_SECONDS,
                )  # fmt: skip
            except (asyncssh.Error, OSError, TimeoutError, EOFError) as error:
                raise FailedPrecondition(
                    f"the SSH server of VM {vm.id} did not let the platform in ({describe(error)}): files of any size "
                    f"travel over SSH, so the guest must run its SSH server on port {SSH_PORT} and accept root's key "
                    f"in /root/.ssh/authorized_keys"
                ) from None
            try:
                yield connection
            finally:
                connection.abort()
                with contextlib.suppress(Exception):
                    await connection.wait_closed()
        finally:
            await tunnel.close()


def describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {LOGIN_SECONDS:.0f} s"
    if isinstance(error, asyncssh.Error):
        return error.reason or type(error).__name__
    return str(error) or type(error).__name__
