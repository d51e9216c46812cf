"""One store for many processes: claims with leases, batch claims, webhook leases.

- `jobs.batch_key`: compatible queued jobs are claimed together in one statement;
- `jobs.lease_until`, `jobs.run_attempts`: a claim lapses unless its worker renews it;
  a lapsed claim is requeued by whichever process sweeps, or failed after a few attempts;
- `jobs.call_id`: the dispatcher's handle of a run (a Modal `FunctionCall` id);
- `jobs.webhook_lease_until`, `jobs.webhook_body`: one sender at a time per webhook, and
  a success's body fixed when it is recorded;
- `idempotency.claim_token`: whose acceptance holds an Idempotency-Key.

Jobs a process of the previous release left running were its own (it ran one process
and requeued them at start); they get a lapsed lease, so the first sweep requeues them.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from magicmix.jobs import JobParams

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("batch_key", sa.Text))
        jobs.add_column(sa.Column("lease_until", sa.Float))
        jobs.add_column(sa.Column("run_attempts", sa.Integer, nullable=False, server_default="0"))
        jobs.add_column(sa.Column("call_id", sa.Text))
        jobs.add_column(sa.Column("webhook_lease_until", sa.Float))
        jobs.add_column(sa.Column("webhook_body", sa.Text))
    op.create_index("jobs_batch", "jobs", ["status", "batch_key", "id"])
    op.create_index("jobs_lease", "jobs", ["status", "lease_until"])
    with op.batch_alter_table("idempotency") as idempotency:
        idempotency.add_column(sa.Column("claim_token", sa.Text))
    bind = op.get_bind()
    active = bind.execute(
        sa.text("SELECT id, params FROM jobs WHERE status IN ('queued', 'processing')")
    ).all()
    for job_id, params in active:
        key = JobParams.model_validate_json(params).batch_key_text()
        bind.execute(
            sa.text("UPDATE jobs SET batch_key = :key WHERE id = :id"), {"key": key, "id": job_id}
        )
    bind.execute(sa.text("UPDATE jobs SET lease_until = 0 WHERE status = 'processing'"))


def downgrade() -> None:
    op.drop_index("jobs_lease", "jobs")
    op.drop_index("jobs_batch", "jobs")
    with op.batch_alter_table("idempotency") as idempotency:
        idempotency.drop_column("claim_token")
    with op.batch_alter_table("jobs") as jobs:
        for name in (
            "webhook_body",
            "webhook_lease_until",
            "call_id",
            "run_attempts",
            "lease_until",
            "batch_key",
        ):
            jobs.drop_column(name)
