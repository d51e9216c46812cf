"""The GPU class's body: the jobs of one `@modal.batched` call through the engine.

`modal_app.py` loads the engine with `magicmix.engine.configure` (the snapshot half, then
the device half) in the GPU image alone; this module builds on `compose.modal_parts` (the
same lifecycle and runner as every container) and builds no service.

Modal's batcher hands over inputs of any kind together; the runner groups them by
schedule, so jobs that cannot share a UNet batch run one group after another and a group
that fails fails only its own jobs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from magicmix.backends.modal.compose import ModalParts, job_runner
from magicmix.backends.modal.dispatch import parse_job_input
from magicmix.jobs import JobRecord
from magicmix.runner import Engine

log = logging.getLogger(__name__)


@dataclass
class GpuWorker:
    """Runs the jobs of one `@modal.batched` call: claim, mix, end each."""

    parts: ModalParts
    engine: Engine

    def run(self, inputs: list[str]) -> list[str]:
        """Each input is `JOB:TOKEN`; returns each job's status, in input order.

        A job that another input holds, or that ended (clear_queue cancelled it), is
        skipped. If the run is cut short (an error escaping the runner, Modal's
        `InputCancellation`), the jobs still held go back to the queue for Modal's retry
        or the sweep's re-spawn, except on their last allowed attempt: those fail now,
        with their webhooks, instead of waiting for a sweep.
        """
        lifecycle = self.parts.lifecycle
        parsed = [parse_job_input(value) for value in inputs]
        claims = dict(parsed)
        with self.parts.nudges.batch():
            jobs = lifecycle.claim(claims)
            try:
                if jobs:
                    with lifecycle.holding(jobs):
                        job_runner(self.parts).run(self.engine, jobs)
            except BaseException:  # modal's InputCancellation is a BaseException
                self._give_back(jobs)
                raise
        return [_status(self.parts, job_id) for job_id, _ in parsed]

    def _give_back(self, jobs: list[JobRecord]) -> None:
        for job in jobs:
            self.parts.lifecycle.give_back(
                job,
                f"the GPU run of this job failed {job.run_attempts} times; please submit it again",
            )


def _status(parts: ModalParts, job_id: int) -> str:
    job = parts.stores.jobs.get(job_id)
    return job.status.value if job is not None else "unknown"
