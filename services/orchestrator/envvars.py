"""The org's environment variables (ListEnvVars, SetEnvVars, DeleteEnvVar), kept encrypted, set in every new VM and exec.

Values are secrets: each is stored as a Fernet token (the key is `env-vars.key` in the data folder, made on
first use, readable by the platform's user only), and neither values nor names are ever logged. A new root
VM gets them in /etc/environment once it has booted; a branch or a restored commit keeps what its commit
had there; every exec gets the org's current ones (`_exec_env`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from cryptography.fernet import Fernet, InvalidToken
from sqlmodel import col, delete, select

from services.common.auth import current_principal
from services.common.db import Database, serialize
from services.common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted
from services.common.files import write_atomic
from services.common.settings import Settings
from services.common.timestamps import utcnow
from services.orchestrator.models import EnvVarRow
from vers.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from services.orchestrator.agent import Agent
    from services.orchestrator.engine import Engine
    from services.orchestrator.store import OrchestratorStore

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME_CHARS = 256
MAX_VALUE_CHARS = 8192
KEY_FILE = "env-vars.key"
# Made by the platform in a new VM once /etc/environment holds the org's variables: vers-init starts the
# console's shell only then, so the first console session has them too.
READY_MARKER = "/run/vers/environment-ready"
# How long writing /etc/environment in a new VM may take.
WRITE_SECONDS = 30


def validate_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_CHARS or not NAME.fullmatch(name):
        shown = name if len(name) <= 64 else name[:64] + "…"
        raise InvalidArgument(
            f"environment variable name {shown!r} is not valid: names are shell identifiers "
            f"([A-Za-z_][A-Za-z0-9_]*) of 1 to {MAX_NAME_CHARS} characters"
        )
    return name


def validate_value(name: str, value: str) -> str:
    """The message names the variable, never its value."""
    if len(value) > MAX_VALUE_CHARS:
        raise InvalidArgument(f"the value of {name} is {len(value)} characters long: values may have {MAX_VALUE_CHARS} at most")
    if "\x00" in value:
        raise InvalidArgument(f"the value of {name} holds a NUL character, which no process environment can carry")
    return value


def shell_value(value: str) -> str:
    """The value quoted so that a shell's `.` and pam_env read the same string: single quotes, or double
    quotes around a value with a single quote and nothing a shell would expand. A value with a newline, or
    with both kinds of quotes, is quoted for the shell (pam_env reads such a value other than as set)."""
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    if not any(c in value for c in '"$`\\\n'):
        return f'"{value}"'
    return shlex.quote(value)


def environment_lines(variables: Mapping[str, str]) -> str:
    return "".join(f"{name}={shell_value(value)}\n" for name, value in sorted(variables.items()))


# Writes the variables (stdin) into /etc/environment in place of lines that set the same names (an image's
# own lines stay), readable by root only, renamed over the old file; then tells vers-init (READY_MARKER).
# With no variables the file is left as it is.
WRITE_SCRIPT = (
    "set -e; f=/etc/environment; t=/etc/.environment.vers; umask 077; "
    'if [ -n "$1" ]; then { [ -f $f ] && grep -Ev "^[[:space:]]*(export[[:space:]]+)?($1)=" $f || true; cat; } > $t; '
    f"mv -f $t $f; fi; mkdir -p /run/vers; touch {READY_MARKER}"
)


class EnvVars:
    """An org's variables in the orchestrator's database, their values encrypted."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.key_file = Path(settings.data_dir) / KEY_FILE
        # Several hosts share one key (they read the same rows): VERS_ENV_VARS_KEY, where it is set.
        self.key = settings.env_vars_key.encode()
        self.max_vars = settings.org_max_env_vars
        self.db = db
        self._fernet: Fernet | None = None

    def check_key(self) -> None:
        """At start: VERS_ENV_VARS_KEY must be a Fernet key, and the same as the data folder's env-vars.key when
        there is one (made before the setting was given): the values stored so far could not be read otherwise."""
        if not self.key:
            return
        try:
            Fernet(self.key)
        except ValueError:
            raise RuntimeError("VERS_ENV_VARS_KEY is not a Fernet key (32 bytes in URL-safe base64): see deploy/vers.env") from None
        if self.key_file.exists() and self.key_file.read_bytes().strip() != self.key:
            raise RuntimeError(
                f"VERS_ENV_VARS_KEY is not the key in {self.key_file}, which encrypted the environment variables stored so far: "
                f"set VERS_ENV_VARS_KEY to that file's content, or unset it"
            )

    def _cipher(self) -> Fernet:
        """The key, made on first use: written whole and private from its first byte; when two processes make
        one at once, the first written is the one both use."""
        if self._fernet is None and self.key:
            self._fernet = Fernet(self.key)
        if self._fernet is None:
            if not self.key_file.exists():
                write_atomic(self.key_file, Fernet.generate_key(), 0o600, exclusive=True)
            mode = stat.S_IMODE(self.key_file.stat().st_mode)
            if mode & 0o077:
                log.warning("%s was readable by others (mode %o): made private (0600)", self.key_file, mode)
                os.chmod(self.key_file, 0o600)
            self._fernet = Fernet(self.key_file.read_bytes().strip())
        return self._fernet

    def digest_key(self) -> bytes:
        """A key for digests of values (the secret scan's record of which values it looked for), derived from
        the encryption key: no one without it can try guesses, even of short values, against a digest."""
        self._cipher()  # the key file, made if it is not yet
        key = self.key or self.key_file.read_bytes().strip()
        return hashlib.sha256(b"vers env-vars digest key\x00" + key).digest()

    def _seal(self, org_id: str, name: str, value: str) -> str:
        return self._cipher().encrypt(json.dumps([org_id, name, value]).encode()).decode()

    def _open(self, row: EnvVarRow) -> str:
        try:
            org_id, name, value = json.loads(self._cipher().decrypt(row.token.encode()))
        except (InvalidToken, ValueError):
            org_id = name = value = None
        if org_id != row.org_id or name != row.name or not isinstance(value, str):
            # the host's path is for the operator's log, not for the tenant
            log.error("environment variable %s of org %s cannot be decrypted with %s", row.name, row.org_id, self.key_file)
            raise DataLoss(
                f"environment variable {row.name} cannot be decrypted: the platform's key ({KEY_FILE} in its data "
                f"folder) is not the one it was stored with; set the variable again, or ask the operator to restore the key"
            )
        return value

    async def get(self, org_id: str) -> dict[str, str]:
        async with self.db.read() as session:
            rows = await session.exec(select(EnvVarRow).where(EnvVarRow.org_id == org_id).order_by(col(EnvVarRow.name)))
            return {row.name: self._open(row) for row in rows}

    async def set(self, org_id: str, variables: Mapping[str, str], replace: bool) -> dict[str, str]:
        """Every variable given set (over one of the same name), or with `replace` only those, in one
        transaction, within VERS_ORG_MAX_ENV_VARS; the org's variables afterwards."""
        for name, value in variables.items():
            validate_value(validate_name(name), value)
        async with self.db.write() as session:
            await serialize(session, f"env:{org_id}")  # two sets at once: one after the other (PostgreSQL)
            mine = col(EnvVarRow.org_id) == org_id
            if replace:
                await session.exec(delete(EnvVarRow).where(mine))
            present = set(await session.exec(select(EnvVarRow.name).where(mine)))
            total = len(present | set(variables))
            if total > self.max_vars:
                raise ResourceExhausted(
                    f"your organization would have {total} environment variables, more than the {self.max_vars} it may "
                    f"have (VERS_ORG_MAX_ENV_VARS): delete some first (DELETE /api/v1/env_vars/{{key}}, vers env delete)"
                )
            for name, value in variables.items():
                row = await session.get(EnvVarRow, (org_id, name)) if name in present else None
                if row is None:
                    row = EnvVarRow(org_id=org_id, name=name, token="")
                row.token, row.updated_at = self._seal(org_id, name, value), utcnow()
                session.add(row)
        return await self.get(org_id)

    async def delete(self, org_id: str, name: str) -> None:
        validate_name(name)
        async with self.db.write() as session:
            row = await session.get(EnvVarRow, (org_id, name))
            if row is None:
                raise NotFound(f"no environment variable {name} in your organization")
            await session.delete(row)

    async def install(self, agent: Agent, org_id: str, vm_id: str) -> None:
        """Write the org's variables into a new VM's /etc/environment (over lines setting the same names), and
        tell vers-init the console may start. A failure is logged (never what was written) and the VM runs
        on without them: the console starts anyway after a while (vers-init), and execs get them regardless."""
        try:
            variables = await self.get(org_id)
            names = "|".join(sorted(variables))
            result = await agent.exec(
                ["sh", "-c", WRITE_SCRIPT, "sh", names], stdin=environment_lines(variables).encode() or None,
                timeout_secs=WRITE_SECONDS, wait=WRITE_SECONDS + 10.0,
            )  # fmt: skip
            if result.exit_code != 0:
                log.warning("VM %s did not take its organization's environment variables (exit code %d)", vm_id, result.exit_code)
        except Exception as error:
            log.warning("the environment variables of VM %s could not be written: %s", vm_id, type(error).__name__)


class EnvVarMethods:
    """Methods of OrchestratorServicer (a mixin: `self` is the servicer)."""

    engine: Engine
    store: OrchestratorStore

    async def _exec_env(self, org_id: str, requested: Mapping[str, str]) -> dict[str, str]:
        """The environment of an exec: the org's variables, then the request's own over them."""
        return {**await self.engine.env_vars.get(org_id), **requested}

    async def ListEnvVars(self, request: pb.ListEnvVarsRequest, context: grpc.aio.ServicerContext) -> pb.ListEnvVarsResponse:
        return pb.ListEnvVarsResponse(vars=await self.engine.env_vars.get(current_principal().org_id))

    async def SetEnvVars(self, request: pb.SetEnvVarsRequest, context: grpc.aio.ServicerContext) -> pb.SetEnvVarsResponse:
        found = await self.engine.env_vars.set(current_principal().org_id, dict(request.vars), request.replace)
        return pb.SetEnvVarsResponse(vars=found)

    async def DeleteEnvVar(self, request: pb.DeleteEnvVarRequest, context: grpc.aio.ServicerContext) -> pb.DeleteEnvVarResponse:
        await self.engine.env_vars.delete(current_principal().org_id, request.key)
        return pb.DeleteEnvVarResponse(key=request.key)
