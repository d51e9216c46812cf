"""The Modal emulation behind `scripts/modal-rehearsal`, on a sample app (tests/rehearsal_app.py).

Each test drives a real rehearsal process from outside, as a laptop drives Modal: spawn,
get, cancel through `rehearsal.fake_modal`, HTTP through the front door. Waits are on
the control plane's view of an input (`wait_input`), not on the clock; where a test needs
time to pass (a timeout, an overlap), only a lower bound is asserted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rehearsal.fake_modal import Function, FunctionCall, exception
from tests.rehearsal_fixtures import ROOT, SCRIPT, Rehearsal, rehearsing, until
from tests.s3_server import DUMMY_AWS_ENV

APP = "sample"


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog does, unanswered)."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield server.getsockname()[1]


@pytest.fixture(scope="module")
def sample_env(
    tmp_path_factory: pytest.TempPathFactory, listener: int, s3_server: str
) -> dict[str, str]:
    return {
        **DUMMY_AWS_ENV,
        "SAMPLE_DIR": str(tmp_path_factory.mktemp("marks")),
        "SAMPLE_SECRET": "from-the-environment",
        "SAMPLE_LISTENER": str(listener),
        "SAMPLE_S3_ENDPOINT": s3_server,
    }


@pytest.fixture(scope="module")
def sample(
    tmp_path_factory: pytest.TempPathFactory, sample_env: dict[str, str]
) -> Iterator[Rehearsal]:
    state = tmp_path_factory.mktemp("rehearsal")
    with rehearsing(state, "--web-request-limit", "1", env=sample_env) as running:
        yield running


def fn(name: str, method: str | None = None) -> Function:
    return Function(name, method) if method else Function.from_name(APP, name)


def marks(env: dict[str, str], prefix: str) -> list[str]:
    return sorted(p.name for p in Path(env["SAMPLE_DIR"]).glob(f"{prefix}*"))


# -- calls ---------------------------------------------------------------------------------


def test_spawn_get_timeout_raises_builtin_timeout_error_and_results_stay(sample: Rehearsal) -> None:
    call = fn("hold").spawn(1.0)
    sample.control.wait_input(call.object_id, "running")
    with pytest.raises(TimeoutError) as raised:
        FunctionCall.from_id(call.object_id).get(timeout=0.05)
    assert type(raised.value) is TimeoutError  # the built-in, not modal.exception's
    pid = FunctionCall.from_id(call.object_id).get(timeout=60)
    assert FunctionCall.from_id(call.object_id).get(timeout=0) == pid  # retrievable later
    assert fn("echo").remote({"a": 1}) == {"a": 1}

    async def with_aio() -> Any:
        spawned = await fn("echo").spawn.aio(5)
        return await FunctionCall.from_id(spawned.object_id).get.aio(timeout=60)

    assert asyncio.run(with_aio()) == 5


def test_unknown_names_and_ids_raise_not_found(sample: Rehearsal) -> None:
    with pytest.raises(exception.NotFoundError):
        Function.from_name(APP, "no_such_function")
    with pytest.raises(exception.NotFoundError):
        Function.from_name("another-app", "echo")
    with pytest.raises(exception.NotFoundError):
        FunctionCall.from_id("fc-unknown").get(timeout=0)


# -- batches -------------------------------------------------------------------------------


def test_batched_inputs_run_in_groups_of_at_most_max_batch_size(sample: Rehearsal) -> None:
    calls = [fn("batch_add").spawn(x, 10) for x in range(4)]  # max_batch_size=3
    results = [call.get(timeout=60) for call in calls]
    assert [total for total, _ in results] == [10, 11, 12, 13]
    assert sorted(size for _, size in results) == [1, 3, 3, 3]  # the fourth waited alone


def test_inputs_spawned_while_a_batch_collects_join_it(sample: Rehearsal) -> None:
    first = fn("gather").spawn("a")  # max_batch_size=4, wait_ms=4000
    sample.control.wait_input(first.object_id, "collecting")
    rest = [fn("gather").spawn(x) for x in "bcd"]
    assert [call.get(timeout=60) for call in [first, *rest]] == [4, 4, 4, 4]


def test_cancelling_one_input_terminates_its_whole_batch_without_retry(
    sample: Rehearsal, sample_env: dict[str, str]
) -> None:
    calls = [fn("held").spawn(x) for x in ("c1", "c2", "c3")]  # one batch of three
    seen = sample.control.wait_input(calls[0].object_id, "running")
    assert sorted(seen["batch"]) == sorted(call.object_id for call in calls)
    calls[0].cancel()
    for call in calls:
        with pytest.raises(exception.RemoteError):
            call.get(timeout=60)
    assert marks(sample_env, "cancelled-c") == ["cancelled-c1", "cancelled-c2", "cancelled-c3"]
    stats = sample.control.function_counters("held")
    assert stats["ended.terminated"] == 3 and stats.get("retries", 0) == 0
    assert [sample.control.input(c.object_id)["attempts"] for c in calls] == [1, 1, 1]


def test_a_raise_in_a_batch_fails_and_retries_every_input_of_it(
    sample: Rehearsal, sample_env: dict[str, str]
) -> None:
    first = fn("fails_once").spawn("r1")  # max_batch_size=2, retries=1
    sample.control.wait_input(first.object_id, "collecting")
    second = fn("fails_once").spawn("r2")
    assert [first.get(timeout=60), second.get(timeout=60)] == ["r1:2", "r2:2"]
    assert sample.control.function_counters("fails_once")["retries"] == 2


def test_retries_exhausted_get_raises_the_remote_error(
    sample: Rehearsal, sample_env: dict[str, str]
) -> None:
    call = fn("always_fails").spawn("x")  # Retries(max_retries=2)
    with pytest.raises(ValueError, match="attempt 3 of x failed"):
        call.get(timeout=60)
    assert len((Path(sample_env["SAMPLE_DIR"]) / "attempts-x").read_text().split()) == 3
    assert sample.control.input(call.object_id)["retries"] == 2


# -- timeouts and crashes -----------------------------------------------------------------


def test_a_killed_container_reschedules_its_input_with_a_fresh_timeout(sample: Rehearsal) -> None:
    """timeout=3 s: 2 s in the killed attempt plus 1.5 s in the next pass only if the second
    attempt's timeout starts afresh; and a crash spends none of the retries (there are none)."""
    call = fn("slow_once").spawn("k", 60.0, 1.5)
    seen = sample.control.wait_input(call.object_id, "running")
    time.sleep(2.0)  # a lower bound on the first attempt's run time
    os.kill(seen["pid"], signal.SIGKILL)
    assert call.get(timeout=60) == 2
    stats = sample.control.function_counters("slow_once")
    assert stats["crashes"] == 1 and stats["rescheduled"] == 1
    assert stats.get("timeouts", 0) == 0 and stats.get("retries", 0) == 0


def test_an_input_past_its_timeout_fails_the_attempt_and_is_retried(sample: Rehearsal) -> None:
    call = fn("too_slow").spawn("t")  # timeout=1, retries=1
    with pytest.raises(exception.FunctionTimeoutError):
        call.get(timeout=60)
    stats = sample.control.function_counters("too_slow")
    assert stats["timeouts"] == 2 and stats["retries"] == 1
    assert stats["containers_started"] == 2  # each timed-out container was killed


def test_max_containers_caps_concurrent_containers(sample: Rehearsal) -> None:
    calls = [fn("hold").spawn(0.5) for _ in range(6)]  # max_containers=2
    pids = {call.get(timeout=60) for call in calls}
    assert len(pids) <= 2
    assert sample.control.function_counters("hold")["peak_containers"] == 2
    until(lambda: not [c for c in sample.control.containers() if c["function"] == "hold"])


def test_min_containers_are_started_and_kept_idle(sample: Rehearsal) -> None:
    warm = until(lambda: [c for c in sample.control.containers() if c["function"] == "warm"])
    assert len(warm) == 1
    assert fn("warm").remote() == warm[0]["pid"]  # scaledown_window=2 s: it stayed anyway


# -- container lifecycle ----------------------------------------------------------------


def test_a_connection_open_at_snapshot_time_fails_the_container_loudly(
    sample: Rehearsal, listener: int
) -> None:
    call = fn("Leaky", "run").spawn()
    failures = until(lambda: sample.control.counters()["failures"].get("Leaky"))
    assert "network connection(s) open" in failures[0] and f":{listener}" in failures[0]
    assert "network connection(s) open" in sample.log
    call.cancel()  # else it crash-loops (with backoff) for as long as the rehearsal runs
    with pytest.raises(exception.RemoteError):
        call.get(timeout=10)


def test_enter_snap_true_runs_before_snap_false_and_secrets_come_from_the_environment(
    sample: Rehearsal, sample_env: dict[str, str]
) -> None:
    assert fn("Tidy", "run").remote() == ["snap=True", "snap=False", "from-the-environment"]
    until(lambda: marks(sample_env, "exited-"))  # @modal.exit, when it scaled down


def test_containers_of_a_snapshotted_function_are_forks_of_one_snapshot(sample: Rehearsal) -> None:
    first = fn("Restored", "run").spawn(2.0)
    sample.control.wait_input(first.object_id, "running")  # busy: the next needs a container
    second = fn("Restored", "run").spawn(0.0)
    (snap_a, pid_a), (snap_b, pid_b) = [call.get(timeout=60) for call in (first, second)]
    assert snap_a == snap_b and pid_a != pid_b and snap_a not in (pid_a, pid_b)


def test_a_container_imports_only_what_its_image_installs(sample: Rehearsal) -> None:
    seen = fn("only_boto3").remote()
    assert seen["boto3"] == "boto3"
    assert seen["numpy"] == "No module named 'numpy'" and seen["numpy_spec"]


def test_the_control_plane_never_loads_an_images_imports() -> None:
    """modal_app.py imports torch inside `gpu_image.imports()`: not in the control plane."""
    probe = "import sys; from rehearsal import fake_modal; fake_modal.install(plane=True);"
    probe += " import modal_app; print(sorted({'torch', 'fastapi'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_missing_required_secret_key_refuses_to_start(
    tmp_path: Path, sample_env: dict[str, str]
) -> None:
    env = {k: v for k, v in {**os.environ, **sample_env}.items() if k != "SAMPLE_SECRET"}
    command = [sys.executable, str(SCRIPT), "--app", "tests.rehearsal_app"]
    done = subprocess.run(
        [*command, "--state-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "Secret 'sample' is missing required key(s) SAMPLE_SECRET" in done.stderr


# -- the web function ------------------------------------------------------------------------


def test_web_requests_share_a_container_up_to_max_inputs(sample: Rehearsal) -> None:
    with httpx.Client(base_url=sample.base_url, timeout=60, follow_redirects=True) as http:
        http.get("/slow").raise_for_status()  # one warm container (max_containers=1)
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: http.get("/slow?s=0.4").json(), range(4)))
    assert {reply["pid"] for reply in replies} == {replies[0]["pid"]}
    assert max(reply["peak"] for reply in replies) == 2  # @modal.concurrent(max_inputs=2)
    assert replies[0]["secret"] == "from-the-environment"


def test_a_web_request_past_the_limit_gets_a_303_to_its_result(sample: Rehearsal) -> None:
    with httpx.Client(base_url=sample.base_url, timeout=60) as http:
        first = http.get("/slow", params={"s": 1.5})  # --web-request-limit 1
        assert first.status_code == 303
        result_url = first.headers["location"]
        assert "__rehearsal_result=" in result_url
        final = http.get(result_url, follow_redirects=True)
        assert final.status_code == 200 and final.json()["secret"] == "from-the-environment"
        again = http.get(result_url)  # reloading it runs nothing again
        assert again.status_code == 200 and again.json() == final.json()


# -- whole-rehearsal flags ---------------------------------------------------------------


def test_scheduled_runs_may_overlap(tmp_path: Path, sample_env: dict[str, str]) -> None:
    with rehearsing(tmp_path, "--sweep-every", "0.4", env=sample_env) as running:
        until(lambda: running.control.function_counters("tick").get("peak_running", 0) >= 2)
        assert running.control.counters()["totals"]["scheduled_runs"] >= 2


def test_latency_is_added_to_database_bucket_and_modal_calls(
    tmp_path: Path, sample_env: dict[str, str]
) -> None:
    with rehearsing(tmp_path, "--latency-ms", "200", env=sample_env) as running:
        timings = fn("timed_calls").remote(3)
        assert timings["db"] >= 3 * 0.2
        assert timings["bucket"] >= 0.2 and timings["modal"] >= 0.2
        # containers report their counts every second
        until(lambda: "bucket.requests" in running.control.counters()["totals"])
        totals = running.control.counters()["totals"]
        assert totals["db.statements"] >= 3 and totals["bucket.requests"] >= 1


def test_crash_gpu_every_kills_mid_batch_and_the_inputs_still_complete(
    tmp_path: Path, sample_env: dict[str, str]
) -> None:
    flags = ("--gpus", "1", "--crash-gpu-every", "2")
    with rehearsing(tmp_path, *flags, env=sample_env) as running:
        calls = [fn("Gpu", "run").spawn(x) for x in range(4)]  # max_batch_size=2
        pids = [call.get(timeout=120) for call in calls]
        stats = running.control.function_counters("Gpu")
        totals = running.control.counters()["totals"]
    assert totals["crashes_injected"] >= 1 and stats["crashes"] >= 1
    assert stats["rescheduled"] >= 2 and stats.get("retries", 0) == 0
    assert stats["peak_containers"] == 1 and len(set(pids)) >= 1


def test_stopping_the_rehearsal_stops_every_container(
    tmp_path: Path, sample_env: dict[str, str]
) -> None:
    with rehearsing(tmp_path, env=sample_env) as running:
        call = fn("hold").spawn(60)
        running.control.wait_input(call.object_id, "running")
        httpx.get(f"{running.base_url}/slow", timeout=60).raise_for_status()
        pids = [c["pid"] for c in running.control.containers()]
        assert len(pids) == 3  # hold's, web's, and warm's (min_containers=1)
        running.proc.send_signal(signal.SIGINT)
        assert running.proc.wait(60) == 0
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    assert (tmp_path / "counters.json").is_file()
