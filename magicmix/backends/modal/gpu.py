"""The GPU class's body: batches of jobs through the engine.

`modal_app.py` loads the engine with `magicmix.engine.configure` (the snapshot half, then
the CUDA half) in the GPU image alone; this module builds on `compose.modal_parts` (the
same lifecycle and runner as every container) and builds no service.
"""

from __future__ import annotations

from dataclasses import dataclass

from magicmix.backends.modal.compose import ModalParts, job_runner
from magicmix.backends.modal.dispatch import parse_job_input
from magicmix.jobs import JobRecord
from magicmix.runner import Engine


@dataclass
class GpuWorker:
    """Runs the jobs of one `@modal.batched` call: claim, mix as one batch, end each."""

    parts: ModalParts
    engine: Engine

    def run(self, inputs: list[str]) -> list[str]:
        """Each input is `JOB:TOKEN`; returns each job's status, in input order.

        A job another input claimed, or that ended (cancelled), is skipped. If Modal
        cancels the batch (a cancel of any of its calls does that), the jobs claimed
        here go back to the queue for the sweep to spawn again.
        """
        lifecycle = self.parts.lifecycle
        claimed: list[JobRecord] = []
        try:
            for value in inputs:
                job_id, token = parse_job_input(value)
                job = lifecycle.claim(job_id, claimant=token)
                if job is not None:
                    claimed.append(job)
            if claimed:
                job_runner(self.parts).run(self.engine, claimed)
        except BaseException:  # modal's InputCancellation is a BaseException
            for job in claimed:
                lifecycle.requeue(job.id)
            raise
        finally:
            self.parts.nudges.flush()
        return [_status(self.parts, parse_job_input(value)[0]) for value in inputs]


def _status(parts: ModalParts, job_id: int) -> str:
    job = parts.jobs.get(job_id)
    return job.status.value if job is not None else "unknown"
