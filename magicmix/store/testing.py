"""Stand-ins for trying the store without a managed database: tests, benchmarks, rehearsals.

- `TempPostgres`: a real PostgreSQL server in a temporary folder on loopback, from the
  server binaries installed on this machine (Debian's `postgresql` package, or any
  `pg_config --bindir`); fresh databases come from a migrated template in ~0.1 s.
- `add_latency`: every statement of an engine (or of all engines) waits first, as a
  database across a network does.

PostgreSQL refuses to run as root; as root the server runs as the `postgres` user
(`runuser`), in a folder that user owns.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess  # nosec B404 - fixed argument lists, no shell
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found. Install them, e.g. on"
    " Debian/Ubuntu `sudo apt-get install -y postgresql`, on macOS `brew install"
    " postgresql@15`, or put their folder in MAGICMIX_PG_BINDIR."
)


DEBIAN_ROOT = Path("/usr/lib/postgresql")  # Debian's and Ubuntu's packages install here


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine (the message says how to install)."""


def find_bindir() -> Path:
    """Where `initdb` and `pg_ctl` are: MAGICMIX_PG_BINDIR, `pg_config`, Debian's layout."""
    candidates: list[Path] = []
    if configured := os.environ.get("MAGICMIX_PG_BINDIR"):
        candidates.append(Path(configured))
    if pg_config := shutil.which("pg_config"):
        found = subprocess.run(  # nosec B603 - a fixed argument list
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        candidates.append(Path(found.stdout.strip()))
    candidates += sorted(DEBIAN_ROOT.glob("*/bin"), reverse=True)
    if found_initdb := shutil.which("initdb"):
        candidates.append(Path(found_initdb).parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise PostgresMissing(INSTALL_HINT)


def free_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TempPostgres:
    """A throwaway PostgreSQL on 127.0.0.1: `start()`, `fresh_url()`..., `stop()`."""

    USER = "magicmix"

    def __init__(self, *, max_connections: int = 300) -> None:
        self.bindir = find_bindir()
        self.port = free_port()
        self.max_connections = max_connections
        self.root = Path(tempfile.mkdtemp(prefix="magicmix-pg-"))
        self._as_postgres = os.geteuid() == 0
        self._template: str | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> TempPostgres:
        if self._as_postgres:  # the server refuses root; the folder must be its own
            self.root.chmod(0o755)
            shutil.chown(self.root, "postgres")
        self._run(
            "initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", self.USER,
            "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {self.root}",
                f"-c max_connections={self.max_connections}",
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            ]
        )
        self._run(
            "pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"),
            "-w", "-t", "60", "-o", options, "start",
        )  # fmt: skip
        log.info("temporary PostgreSQL on 127.0.0.1:%d (%s)", self.port, self.root)
        return self

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """A new, empty (or copied from `template`) database; its URL."""
        import psycopg

        name = name or f"db_{uuid.uuid4().hex[:12]}"
        copy = f" TEMPLATE {template}" if template else ""
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"{copy}')  # names made here
        return self.url(name)

    def fresh_url(self) -> str:
        """A new database already at the current schema (a copy of a migrated template)."""
        if self._template is None:
            from magicmix.store.database import open_database

            template = f"template_{uuid.uuid4().hex[:8]}"
            open_database(self.create_database(template)).close()
            self._template = template
        return self.create_database(template=self._template)

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(  # nosec B603 - a fixed argument list
            command, capture_output=True, text=True, check=False, cwd=self.root
        )
        if done.returncode != 0:
            server_log = self.root / "log"
            tail = server_log.read_text()[-2000:] if server_log.exists() else ""
            raise RuntimeError(f"{tool} failed: {done.stderr.strip()}\n{tail}")


def add_latency(target: Engine | type[Engine], seconds: float) -> None:
    """Every statement on `target` (one engine, or the `Engine` class: all) waits first."""

    def wait(*_: Any) -> None:
        time.sleep(seconds)

    event.listen(target, "before_cursor_execute", wait)


def main() -> int:
    """`python -m magicmix.store.testing`: say where the PostgreSQL server binaries are, or
    how to install them (`make test` runs this first: the suite needs a real server)."""
    import sys

    try:
        print(f"PostgreSQL server binaries: {find_bindir()}")
    except PostgresMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
