"""`make rehearse`: the Modal app rehearsed on this machine, with everything it needs.

    python -m rehearsal.local [--port 8000] [REHEARSAL FLAGS ...]

Starts a throwaway PostgreSQL (`magicmix.store.testing.TempPostgres`) and an S3-protocol
store (moto's server) on 127.0.0.1, makes the bucket, an admin key in the database (as
`magicmix keys create` with the deployment's database URL would), and runs
`scripts/modal-rehearsal --port PORT` with them in the environment the Modal secrets
would give. The model is `MAGICMIX_MODEL` if set, else the shipped toy model. Once the
rehearsal is ready it prints the key, the playground's address and a curl, as `make run`
does. Ctrl-C (or SIGTERM) stops the rehearsal, the store and the database, and deletes
them: nothing outlives it. Other flags go to `scripts/modal-rehearsal` (`--gpus`,
`--crash-gpu-every`, `--latency-ms`, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from rehearsal.cli import READY
from rehearsal.loopback import DUMMY_AWS_ENV, s3_client, s3_server

if TYPE_CHECKING:
    from magicmix.config import Settings

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "rehearse"
DATABASE_LINE, BUCKET_LINE = "Database:", "Bucket:"  # printed once ready (tests read them)


class Stop(Exception):
    """SIGTERM: stop as Ctrl-C does."""


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL on loopback; the URL of a migrated database on it."""
    from magicmix.store.testing import PostgresMissing, TempPostgres

    try:
        server = TempPostgres().start()
    except PostgresMissing as err:
        raise SystemExit(f"make rehearse: {err}") from err
    try:
        yield server.fresh_url()
    finally:
        server.stop()


def app_environment(database_url: str, endpoint: str) -> dict[str, str]:
    """What the `magicmix` and `magicmix-s3` secrets would hold, for loopback."""
    s3_client(endpoint).create_bucket(Bucket=BUCKET)
    return {
        **DUMMY_AWS_ENV,
        "HF_HUB_OFFLINE": "1",
        "MAGICMIX_MODEL": os.environ.get("MAGICMIX_MODEL", "toy"),  # or tiny, or a folder
        "MAGICMIX_SECRET_KEY": os.environ.get("MAGICMIX_SECRET_KEY", secrets.token_hex(32)),
        "MAGICMIX_DATABASE_URL": database_url,
        "MAGICMIX_STORE_URL": f"s3://{BUCKET}/out",
        "MAGICMIX_S3_ENDPOINT_URL": endpoint,
        # as `make run`: the bundled sample layout is served on loopback
        "MAGICMIX_ALLOW_PRIVATE_URLS": os.environ.get("MAGICMIX_ALLOW_PRIVATE_URLS", "true"),
    }


def admin_key(env: dict[str, str], public_url: str) -> tuple[str, Settings]:
    """A new admin key in the deployment's database, and the settings to describe it with."""
    from magicmix.config import Settings
    from magicmix.store.database import PoolSize
    from magicmix.store.stores import open_stores

    settings = Settings(
        model=env["MAGICMIX_MODEL"],
        secret_key=env["MAGICMIX_SECRET_KEY"],
        database_url=env["MAGICMIX_DATABASE_URL"],
        public_url=public_url,
        allow_private_urls=env["MAGICMIX_ALLOW_PRIVATE_URLS"] == "true",
    )
    stores = open_stores(settings, pool=PoolSize(size=1, overflow=0))
    try:
        return stores.keys.create(admin=True).key, settings
    finally:
        stores.database.close()


def run(port: int, flags: list[str]) -> int:
    """The rehearsal on its database and store until Ctrl-C; its exit status."""
    with postgres() as database_url, s3_server() as endpoint:
        env = app_environment(database_url, endpoint)
        public_url = f"http://127.0.0.1:{port}"
        key, settings = admin_key(env, public_url)
        state = tempfile.mkdtemp(prefix="magicmix-rehearse-")
        command = [sys.executable, str(ROOT / "scripts" / "modal-rehearsal"), "--port", str(port)]
        proc = subprocess.Popen(
            [*command, "--state-dir", state, *flags],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def welcome() -> None:
            from magicmix.cli.main import print_quickstart

            print_quickstart(key, settings)
            print(f"{DATABASE_LINE} {database_url}  (MAGICMIX_DATABASE_URL: `magicmix keys` on it)")
            print(f"{BUCKET_LINE} s3://{BUCKET}/out on {endpoint}")
            print("Ctrl-C stops the rehearsal, the database and the bucket, and deletes them.\n")

        try:
            return follow(proc, welcome)
        except (KeyboardInterrupt, Stop):
            return stop(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            shutil.rmtree(state, ignore_errors=True)


def follow(proc: subprocess.Popen[str], welcome: Callable[[], None] | None = None) -> int:
    """Pass the rehearsal's output through to its end; `welcome` once it is ready."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith(READY) and welcome is not None:
            welcome()
        sys.stdout.flush()
    return proc.wait()


def stop(proc: subprocess.Popen[str]) -> int:
    """SIGTERM to the rehearsal (it stops its containers and prints its counters);
    a second Ctrl-C kills it."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(KeyboardInterrupt, Stop):
        return follow(proc)
    proc.kill()
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rehearsal.local", description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="web function on 127.0.0.1:PORT")
    args, flags = parser.parse_known_args(argv)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise Stop

    signal.signal(signal.SIGTERM, on_term)
    return run(args.port, flags)


if __name__ == "__main__":
    sys.exit(main())
