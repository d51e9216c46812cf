"""The tables, as the queries see them (SQLAlchemy Core).

`migrations/` makes them; a test checks that a migrated database matches these
definitions, so the two cannot drift apart.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", Text, primary_key=True),
    Column("key_hash", Text, nullable=False, unique=True),
    Column("admin", Integer, nullable=False, server_default="0"),
    Column("webhook_secret", Text, nullable=False),  # encrypted with the service secret
    Column("s3_details", Text),  # encrypted JSON, NULL when not set
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # never reused
    Column("key_id", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("params", Text, nullable=False),  # JSON of jobs.JobParams
    Column("image", LargeBinary),  # the layout image, dropped when the job ends
    Column("output_token", Text, nullable=False),
    Column("result", Text),  # JSON of jobs.JobResult
    Column("error", Text),
    Column("webhook_phase", Text),  # pending | delivered | failed | stopped; NULL: no webhook
    Column("webhook_attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("webhook_next_at", Float),
    Column("webhook_last_status", Integer),
    Column("webhook_last_error", Text),
    Column("claimant", Text),
    # 0002: claims with leases, batch claims, spawned calls, webhook leases and bodies
    Column("batch_key", Text),  # jobs with equal keys share UNet batches
    Column("lease_until", Float),  # a claim lapses then unless its worker renews it
    Column("run_attempts", Integer, nullable=False, server_default="0"),
    Column("call_id", Text),  # the dispatcher's handle of the run (Modal's FunctionCall id)
    Column("webhook_lease_until", Float),  # one sender at a time per job
    Column("webhook_body", Text),  # fixed when a success is recorded: the same on every attempt
    Index("jobs_status", "status", "id"),
    Index("jobs_key_status", "key_id", "status"),
    Index("jobs_webhooks", "webhook_phase", "webhook_next_at"),
    Index("jobs_batch", "status", "batch_key", "id"),
    Index("jobs_lease", "status", "lease_until"),
    sqlite_autoincrement=True,
)

idempotency = Table(
    "idempotency",
    metadata,
    Column("key_id", Text, nullable=False),
    Column("idem_hash", Text, nullable=False),  # sha256 of the client's Idempotency-Key
    Column("fingerprint", Text, nullable=False),  # sha256 of the request body
    Column("job_id", Integer),  # NULL while the request is being accepted
    Column("created_at", Float, nullable=False),
    Column("claim_token", Text),  # 0002: whose acceptance holds the key
    PrimaryKeyConstraint("key_id", "idem_hash"),
)
