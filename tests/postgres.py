"""A PostgreSQL server of the suite's own: Debian's server binaries (scripts/bootstrap.sh installs the
`postgresql` package), a cluster made with initdb in a temporary folder, reached only through a Unix
socket in that folder, stopped and removed at the end. Also used by bench/db.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

POSTGRES_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"


def server_binaries() -> Path:
    """The newest installed server's bin folder (initdb and pg_ctl are not on PATH in Debian's package)."""
    found = [
        folder / "bin" for folder in POSTGRES_ROOT.glob("*") if (folder / "bin" / "pg_ctl").exists() and re.fullmatch(r"\d+", folder.name)
    ]
    if not found:
        raise RuntimeError(
            f"no PostgreSQL server in {POSTGRES_ROOT}/<version>/bin: install Debian's postgresql package (make install does)"
        )
    return max(found, key=lambda path: int(path.parent.name))


class TempPostgres:
    """A running server. `durable=False` (the tests) turns off fsync: its data never outlives the run."""

    def __init__(self, durable: bool = False) -> None:
        self.bin = server_binaries()
        # Not under pytest's temporary folders: those are private to this user, and the server runs as `postgres`
        # when this is root (it refuses to run as root).
        self.folder = Path(tempfile.mkdtemp(prefix="vers-postgres-"))
        self.data = self.folder / "data"
        self._as_owner = ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []
        if self._as_owner:
            shutil.chown(self.folder, SUPERUSER)
        self.port = 5432  # names the socket file only: the server listens on no TCP address
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        options = f"-c listen_addresses='' -k {self.folder} -p {self.port} -c max_connections=300"
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-o", options, "-w", "start")
        except subprocess.CalledProcessError:
            log = (self.folder / "server.log").read_text(errors="replace") if (self.folder / "server.log").exists() else ""
            shutil.rmtree(self.folder, ignore_errors=True)
            raise RuntimeError(f"PostgreSQL did not start:\n{log}") from None

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([*self._as_owner, str(self.bin / program), *args], check=True, capture_output=True, text=True, cwd=self.folder)

    def create_database(self, name: str) -> str:
        """A new empty database, and its SQLAlchemy URL."""
        self._run("createdb", "-h", str(self.folder), "-p", str(self.port), "-U", SUPERUSER, name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@/{database}?host={self.folder}&port={self.port}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
