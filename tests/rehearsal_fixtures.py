"""Run `scripts/modal-rehearsal` as a real process and connect to it, as a laptop would.

`rehearsing` runs any app (the sample app by default); `deployed` runs `modal_app.py`
(or a module wrapping it) on a loopback S3 bucket and a PostgreSQL database, as the
Modal secrets would name them, and gives a `Deployment` to drive it over HTTP and to
look into its database.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from magicmix.http.links import EDITING
from magicmix.http.schemas import SEED_EXAMPLE
from magicmix.jobs import JobRecord
from magicmix.keys import static_principals
from magicmix.store.database import open_database
from magicmix.store.jobs import SqlJobStore
from rehearsal import client
from rehearsal.cli import READY
from rehearsal.local import BUCKET_LINE, DATABASE_LINE
from rehearsal.loopback import DUMMY_AWS_ENV, s3_client
from tests.conftest import make_layout_image
from tests.http_fixtures import free_port
from tests.service_fixtures import MIX, png

ROOT = client.ROOT
SCRIPT = ROOT / "scripts" / "modal-rehearsal"
ADMIN, OTHER = "mm_static_rehearsal_key_one", "mm_static_rehearsal_key_two"
SECRET_KEY = "rehearsal-secret-key-0123456789"
LAYOUT = "data:image/png;base64," + base64.b64encode(png(make_layout_image(256, 256))).decode()


def until(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll `check` until it is truthy (a bound for a broken build, not a budget)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
    return value


@dataclass
class Rehearsal:
    """A running rehearsal: its process, its control connection, its web URL, its log."""

    launched: client.Launched
    control: client.Control
    base_url: str
    state_dir: Path

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.launched.proc

    @property
    def lines(self) -> list[str]:
        return self.launched.lines

    @property
    def log(self) -> str:
        return self.launched.log


@contextmanager
def rehearsing(
    state_dir: Path,
    *flags: str,
    env: dict[str, str],
    app: str = "tests.rehearsal_app",
    start_timeout: float = 120.0,
) -> Iterator[Rehearsal]:
    """`scripts/modal-rehearsal --app APP --port P FLAGS` until the block ends (SIGTERM)."""
    port = free_port()
    command = [sys.executable, str(SCRIPT), "--app", app, "--port", str(port)]
    launched = client.launch([*command, "--state-dir", str(state_dir), *flags], env, ready_at=READY)
    try:
        assert launched.wait_ready(start_timeout), launched.log
        control = client.connect(state_dir)
        try:
            yield Rehearsal(launched, control, f"http://127.0.0.1:{port}", state_dir)
        finally:
            control.close()
    finally:
        launched.stop()


# -- modal_app.py, deployed on loopback ---------------------------------------------------


def app_env(s3_server: str, model_dir: Path, database_url: str, **knobs: str) -> dict[str, str]:
    """The `magicmix` and `magicmix-s3` secrets and the deploy-time knobs, as environment;
    a new bucket. Keys are static (`MAGICMIX_API_KEYS`), both admins."""
    bucket = f"rehearsal-{uuid.uuid4().hex[:12]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    return {
        **DUMMY_AWS_ENV,
        "HF_HUB_OFFLINE": "1",
        "MAGICMIX_MODEL": str(model_dir),
        "MAGICMIX_SECRET_KEY": SECRET_KEY,
        "MAGICMIX_DATABASE_URL": database_url,
        "MAGICMIX_STORE_URL": f"s3://{bucket}/out",
        "MAGICMIX_S3_ENDPOINT_URL": s3_server,
        "MAGICMIX_API_KEYS": f"{ADMIN},{OTHER}",
        **knobs,
    }


def webhook_secret(key: str) -> str:
    """The Standard Webhooks signing secret of a static key."""
    return next(iter(static_principals([key], SECRET_KEY.encode()).values())).webhook_secret


@dataclass
class Deployment:
    """modal_app.py under the rehearsal: its HTTP API, its database, its counters."""

    running: Rehearsal
    http: httpx.Client
    env: dict[str, str]
    jobs: SqlJobStore

    @property
    def control(self) -> client.Control:
        return self.running.control

    def post(self, path: str, key: str, **fields: Any) -> httpx.Response:
        return self.http.post(path, json={"key": key, **fields})

    @staticmethod
    def body(**fields: Any) -> dict[str, Any]:
        """A magic_mix body: 256 px, 4 steps, unless `fields` say otherwise."""
        example = {k: v for k, v in SEED_EXAMPLE.items() if k != "key"}
        return {**example, "width": 256, "height": 256, "steps": 4, "image": LAYOUT, **fields}

    def mix(self, key: str, **fields: Any) -> dict[str, Any]:
        """A magic_mix request; its reply."""
        reply = self.post(MIX, key, **self.body(**fields))
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def fetch(self, job_id: int, key: str) -> dict[str, Any]:
        return dict(self.post(f"{EDITING}/fetch/{job_id}", key).json())

    def until_done(self, job_id: int, key: str, timeout: float = 120.0) -> dict[str, Any]:
        """Fetch the job until it is no longer `processing` (bounded for a broken build)."""
        deadline = time.monotonic() + timeout
        reply = self.fetch(job_id, key)
        while reply["status"] == "processing" and time.monotonic() < deadline:
            time.sleep(0.25)
            reply = self.fetch(job_id, key)
        return reply

    def job(self, job_id: int) -> JobRecord:
        found = self.jobs.get(job_id)
        assert found is not None, f"no job {job_id}"
        return found

    def call_of(self, job_id: int) -> str:
        """The id of the GPU call spawned for the job (waits for the spawn)."""
        return str(until(lambda: self.job(job_id).call_id))

    def sql(self, statement: str, *params: Any) -> None:
        """One statement on the deployment's database, as an operator would run it."""
        with psycopg.connect(self.env["MAGICMIX_DATABASE_URL"], autocommit=True) as connection:
            connection.execute(statement, params or None)  # type: ignore[arg-type]


@contextmanager
def rehearsed_locally(env: dict[str, str], *flags: str) -> Iterator[Deployment]:
    """`make rehearse`'s entry (`python -m rehearsal.local`) with `env` and FLAGS, until the
    block ends (then Ctrl-C, unless a test stopped it); the deployment it printed."""
    port = free_port()
    command = [sys.executable, "-m", "rehearsal.local", "--port", str(port), *flags]
    launched = client.launch(command, env, ready_at=STOPS)
    try:
        assert launched.wait_ready(180), launched.log
        lines = launched.lines
        printed = {
            "MAGICMIX_DATABASE_URL": _after(lines, DATABASE_LINE).split()[0],
            "MAGICMIX_STORE_URL": _after(lines, BUCKET_LINE).split()[0],
            "MAGICMIX_S3_ENDPOINT_URL": _after(lines, BUCKET_LINE).split()[2],
        }
        state_dir = Path(_after(lines, READY).rpartition(" state ")[2])
        database = open_database(printed["MAGICMIX_DATABASE_URL"], migrate_schema=False)
        control = client.connect(state_dir)
        running = Rehearsal(launched, control, f"http://127.0.0.1:{port}", state_dir)
        try:
            with client_of(running) as http:
                yield Deployment(running, http, {**env, **printed}, SqlJobStore(database))
        finally:
            control.close()
            database.close()
    finally:
        launched.stop(signal.SIGINT)


def client_of(running: Rehearsal) -> httpx.Client:
    """An HTTP client of the rehearsed web function (Modal's 303s followed)."""
    return httpx.Client(base_url=running.base_url, timeout=200, follow_redirects=True)


STOPS = "Ctrl-C stops"  # the last line `make rehearse` prints once ready


def _after(lines: list[str], prefix: str) -> str:
    """The rest of the first line starting with `prefix`."""
    return next(line for line in lines if line.startswith(prefix))[len(prefix) :].strip()


def printed_curl(lines: list[str]) -> dict[str, Any]:
    """The JSON body of the curl `make rehearse` printed."""
    text = "".join(lines)
    start = text.index("-d '") + len("-d '")
    return dict(json.loads(text[start : text.index("'\n", start)]))


@contextmanager
def deployed(
    state_dir: Path, env: dict[str, str], *flags: str, app: str = "modal_app"
) -> Iterator[Deployment]:
    """modal_app.py (or `app`) under `scripts/modal-rehearsal FLAGS` with `env`."""
    database = open_database(env["MAGICMIX_DATABASE_URL"], migrate_schema=False)
    try:
        with (
            rehearsing(state_dir, *flags, env=env, app=app) as running,
            client_of(running) as http,
        ):
            yield Deployment(running, http, env, SqlJobStore(database))
    finally:
        database.close()
