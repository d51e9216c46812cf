"""Issue 24's findings 1-6, each pinned on today's modal_app.py under the rehearsal.

Each test runs modal_app.py unmodified (finding 3 on a GPU with little memory,
`tests/rehearsal_oom_app.py`) under `scripts/modal-rehearsal`, with the deploy-time
knobs and flags its scenario needs, and drives it as a client would: HTTP through the
rehearsed web function, Modal calls from outside, the database as an operator sees it.
Every one of them failed on the previous release (Modal state in Dicts); docs/rehearsal.md
says how. Each starts its own rehearsal (a GPU snapshot loads torch once), so they are
`slow`; the check on every landing is tests/test_rehearse.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from magicmix.http.links import EDITING
from magicmix.jobs import JobStatus
from magicmix.store.testing import TempPostgres
from rehearsal.fake_modal import Function, FunctionCall
from tests.http_fixtures import LoopbackServer, Recorded, respond
from tests.rehearsal_fixtures import (
    ADMIN,
    OTHER,
    Deployment,
    app_env,
    deployed,
    until,
    webhook_secret,
)
from tests.service_fixtures import MIX

pytestmark = pytest.mark.slow  # a rehearsal each, with its own knobs
NOW = {"MAGICMIX_SYNC_WAIT_S": "0"}  # requests answer at once; tests fetch


EnvFor = Callable[..., dict[str, str]]


@pytest.fixture
def env_for(s3_server: str, tiny_model_dir: Path, postgres: TempPostgres) -> EnvFor:
    """`env_for(**knobs)`: the app's environment on a new database and bucket."""

    def make(**knobs: str) -> dict[str, str]:
        return app_env(s3_server, tiny_model_dir, postgres.fresh_url(), **knobs)

    return make


@pytest.fixture(scope="module")
def receiver() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        server.route("/hook", respond(200))
        yield server


def test_clear_queue_mid_batch_never_terminates_another_keys_job_in_that_batch(
    tmp_path: Path, env_for: EnvFor
) -> None:
    """Finding 1. Six queued jobs of one key wait in a GPU container for a batch of seven;
    clear_queue cancels them (every Modal, database and bucket call pays 200 ms); a
    seventh job, of another key, arrives after that and fills the batch, which runs.
    Nothing may terminate that batch: the seventh job ends `success`, and no Modal call
    is ever cancelled."""
    knobs = {"MAGICMIX_BATCH_SIZE": "7", "MAGICMIX_BATCH_WAIT_MS": "600000", **NOW}
    env = env_for(**knobs)
    with (
        deployed(tmp_path, env, "--gpus", "1", "--latency-ms", "200") as app,
        ThreadPoolExecutor(6) as pool,
    ):
        queued = [reply["id"] for reply in pool.map(lambda _: app.mix(OTHER), range(6))]
        app.control.wait_input(app.call_of(queued[0]), "collecting", timeout=300)
        cleared = pool.submit(app.post, f"{EDITING}/clear_queue", ADMIN)
        until(lambda: any(app.job(i).status is JobStatus.CANCELLED for i in queued), 120)
        last = app.mix(ADMIN)["id"]  # after clear_queue's read: not among its cancels
        assert cleared.result().json()["message"].startswith("cancelled")
        reply = app.until_done(last, ADMIN, timeout=60)
        stats = app.control.function_counters("MagicMix")
        totals = app.control.counters()["totals"]
    assert reply["status"] == "success", f"job {last} is {reply}; GPU class: {stats}"
    assert {app.job(i).status for i in queued} == {JobStatus.CANCELLED}
    assert totals.get("modal.cancel", 0) == 0 and stats.get("ended.terminated", 0) == 0


def test_a_run_failing_on_its_last_attempt_fails_its_job_at_once_with_its_webhook(
    tmp_path: Path, env_for: EnvFor, receiver: LoopbackServer
) -> None:
    """Finding 2. The database refuses one job's result (a trigger), so its GPU run raises
    on every attempt; Modal retries it twice. On the last attempt the job must end
    `failed` then and there, its webhook sent once and signed, with no sweep run (the
    sweep is due in an hour)."""
    env = env_for(MAGICMIX_ALLOW_PRIVATE_URLS="true", **NOW)
    with deployed(tmp_path, env, "--gpus", "1", "--sweep-every", "3600") as app:
        app.sql(REFUSE_SUCCESS)
        hook = receiver.url("/hook")
        job_id = app.mix(ADMIN, seed=VICTIM_SEED, webhook=hook, track_id="victim")["id"]
        reply = app.until_done(job_id, ADMIN, timeout=120)
        until(lambda: posts_for(receiver, job_id), 60)
        stats = app.control.function_counters("MagicMix")
        totals = app.control.counters()["totals"]
    assert reply["status"] == "failed" and "failed 3 times" in reply["message"], reply
    assert stats["retries"] == 2 and stats["ended.failure"] == 1
    assert totals.get("scheduled_runs", 0) == 0
    posts = posts_for(receiver, job_id)
    assert len(posts) == 1
    body = Webhook(webhook_secret(ADMIN)).verify(posts[0].body, posts[0].headers)
    assert body["status"] == "failed" and body["id"] == job_id and body["track_id"] == "victim"


def posts_for(receiver: LoopbackServer, job_id: int) -> list[Recorded]:
    return [r for r in receiver.requests if r.headers.get("webhook-id") == f"magicmix-job-{job_id}"]


VICTIM_SEED = 424242
REFUSE_SUCCESS = f"""
CREATE FUNCTION refuse_success() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'could not write the result (injected by the test)'; END $$;
CREATE TRIGGER refuse_success BEFORE UPDATE ON jobs FOR EACH ROW
WHEN (NEW.status = 'success' AND NEW.params LIKE '%"seed":{VICTIM_SEED}%')
EXECUTE FUNCTION refuse_success();
"""


def test_one_failing_size_group_fails_only_its_own_jobs_each_with_its_own_time(
    tmp_path: Path, env_for: EnvFor
) -> None:
    """Finding 3. One Modal batch of four jobs, two keys, three sizes; the GPU has memory
    for the 256 px group and the 264 px one, not for the 512 px job. Only that job fails;
    each group's jobs report that group's generation time."""
    knobs = {"MAGICMIX_BATCH_SIZE": "4", "MAGICMIX_BATCH_WAIT_MS": "600000", **NOW}
    env = env_for(**knobs)
    sizes = [(ADMIN, 256), (OTHER, 256), (ADMIN, 264), (OTHER, 512)]
    with (
        deployed(tmp_path, env, "--gpus", "1", app="tests.rehearsal_oom_app") as app,
        ThreadPoolExecutor(4) as pool,
    ):
        ids = list(pool.map(lambda ks: app.mix(ks[0], width=ks[1], height=ks[1])["id"], sizes))
        replies = [app.until_done(i, key) for i, (key, _) in zip(ids, sizes, strict=True)]
        batches = app.control.function_counters("MagicMix")["batches"]
    assert batches == 1, "the four jobs ran in one Modal batch"
    assert [r["status"] for r in replies] == ["success", "success", "success", "failed"]
    times = [r["generationTime"] for r in replies[:3]]
    assert times[0] == times[1] != times[2], "each group reports its own generation time"


def test_a_job_outlives_crashes_beyond_modals_retries_and_its_lease_outlasts_a_long_run(
    tmp_path: Path, env_for: EnvFor
) -> None:
    """Finding 4. The GPU container running a job is killed four times (crashes spend none
    of Modal's two retries, and are more than MAGICMIX_MAX_RUN_ATTEMPTS); then the run
    takes about three times the claim's lease (4 s) while the sweep runs every second.
    The job must end `success`: neither the crashes nor the length of the run fail it."""
    knobs = {"MAGICMIX_LEASE_S": "4", "MAGICMIX_BATCH_SIZE": "1", **NOW}
    env = env_for(**knobs)
    with deployed(tmp_path, env, "--gpus", "1", "--sweep-every", "1") as app:
        job_id = app.mix(ADMIN, width=768, height=768, steps=50, kmax=1.0)["id"]
        call_id = app.call_of(job_id)
        claimed_at = None
        for _ in range(4):  # each time once the attempt holds the job's claim
            seen = app.control.wait_input(call_id, "running", timeout=120)
            claimed_at = until(lambda at=claimed_at: claimed_anew(app, job_id, at), 60)
            os.kill(seen["pid"], signal.SIGKILL)
            until(lambda pid=seen["pid"]: app.control.input(call_id)["pid"] != pid, 60)
        reply = app.until_done(job_id, ADMIN, timeout=300)
        stats = app.control.function_counters("MagicMix")
        attempts = app.control.input(call_id)["attempts"]
    assert reply["status"] == "success", reply
    assert stats["crashes"] == 4 and stats.get("retries", 0) == 0 and attempts == 5
    assert app.job(job_id).run_attempts == 5


def claimed_anew(app: Deployment, job_id: int, before: float | None) -> float | None:
    """When the job was claimed, if by an attempt after the one claimed at `before`."""
    job = app.job(job_id)
    held = job.status is JobStatus.PROCESSING and job.started_at != before
    return job.started_at if held else None


def test_a_queued_job_whose_call_was_lost_to_a_restart_is_spawned_again_by_the_sweep(
    tmp_path: Path, env_for: EnvFor
) -> None:
    """Finding 5. A job is queued while no GPU may start (`--gpus 0`); the app is stopped
    and deployed again (its calls are gone, as after `modal app stop`), and the job has
    waited 10 minutes. The sweep must spawn it again, and it ends `success`."""
    env = env_for(**NOW)
    with deployed(tmp_path / "first", env, "--gpus", "0") as app:
        job_id = app.mix(ADMIN)["id"]
        lost = app.call_of(job_id)
    app.sql("UPDATE jobs SET created_at = created_at - 600 WHERE id = %s", job_id)
    with deployed(tmp_path / "again", env, "--gpus", "1", "--sweep-every", "1") as app:
        reply = app.until_done(job_id, ADMIN, timeout=120)
        stats = app.control.function_counters("MagicMix")
    assert reply["status"] == "success", reply
    assert app.job(job_id).call_id != lost and stats["inputs"] == 1


def test_waiting_on_a_job_whose_call_already_returned_polls_instead_of_spinning(
    tmp_path: Path, env_for: EnvFor
) -> None:
    """Finding 6. A queued job (no GPU may start) whose call has already returned (here:
    the job points at a finished call); a client resends its request with the same
    Idempotency-Key and waits the 4 s sync window. It must ask Modal about the call at
    most about once a second, not in a loop."""
    env = env_for(MAGICMIX_SYNC_WAIT_S="4")
    with deployed(tmp_path, env, "--gpus", "0", "--sweep-every", "3600") as app:
        key = {"Idempotency-Key": "finding-6"}
        body = {**app.body(), "key": ADMIN}
        first = app.http.post(MIX, json=body, headers=key).json()  # waits 4 s on a live call
        finished = Function.from_name("magicmix", "manage_keys").spawn("list")
        FunctionCall.from_id(finished.object_id).get(timeout=120)
        app.sql("UPDATE jobs SET call_id = %s WHERE id = %s", finished.object_id, first["id"])
        before = app.control.counters()["totals"]
        started = time.monotonic()
        again = app.http.post(MIX, json=body, headers=key).json()
        waited = time.monotonic() - started
        after = app.control.counters()["totals"]
    assert again["id"] == first["id"] and again["status"] == "processing"
    gets_per_s = (after["modal.get"] - before["modal.get"]) / waited
    assert waited >= 3.5 and gets_per_s <= 2.0, f"{gets_per_s:.0f} Modal get calls a second"
