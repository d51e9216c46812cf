"""The schema of the first two releases (SQLite's `user_version` 2), made or adopted.

A database made by an earlier release has these tables and no `alembic_version`: its
own numbered steps (from `PRAGMA user_version`) are finished here, so it is adopted with
every row kept. A new database gets the same tables, on SQLite or PostgreSQL.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The earlier releases' steps after their first schema (`backends/local/db.py` there).
LEGACY_STEPS: list[list[str]] = [
    [
        "ALTER TABLE jobs RENAME COLUMN webhook_state TO webhook_phase",
        "ALTER TABLE jobs ADD COLUMN webhook_next_at REAL",
        "ALTER TABLE jobs ADD COLUMN webhook_last_status INTEGER",
        "ALTER TABLE jobs ADD COLUMN webhook_last_error TEXT",
        "ALTER TABLE jobs ADD COLUMN claimant TEXT",
        "CREATE INDEX IF NOT EXISTS jobs_webhooks ON jobs (webhook_phase, webhook_next_at)",
        "ALTER TABLE api_keys ADD COLUMN revoked_at REAL",
    ],
    [
        """CREATE TABLE IF NOT EXISTS idempotency (
            key_id TEXT NOT NULL,
            idem_hash TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            job_id INTEGER,
            created_at REAL NOT NULL,
            PRIMARY KEY (key_id, idem_hash)
        )""",
    ],
]


def upgrade() -> None:
    bind = op.get_bind()
    if sa.inspect(bind).has_table("jobs"):
        _adopt(bind)
        return
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("key_hash", sa.Text, nullable=False, unique=True),
        sa.Column("admin", sa.Integer, nullable=False, server_default="0"),
        sa.Column("webhook_secret", sa.Text, nullable=False),
        sa.Column("s3_details", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("image", sa.LargeBinary),
        sa.Column("output_token", sa.Text, nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("webhook_phase", sa.Text),
        sa.Column("webhook_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("webhook_next_at", sa.Float),
        sa.Column("webhook_last_status", sa.Integer),
        sa.Column("webhook_last_error", sa.Text),
        sa.Column("claimant", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index("jobs_status", "jobs", ["status", "id"])
    op.create_index("jobs_key_status", "jobs", ["key_id", "status"])
    op.create_index("jobs_webhooks", "jobs", ["webhook_phase", "webhook_next_at"])
    op.create_table(
        "idempotency",
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("idem_hash", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("job_id", sa.Integer),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("key_id", "idem_hash"),
    )


def _adopt(bind: sa.Connection) -> None:
    """Finish an earlier release's own steps on its SQLite file (only SQLite had them)."""
    done = bind.exec_driver_sql("PRAGMA user_version").scalar() or 0
    for number, step in enumerate(LEGACY_STEPS[done:], start=done + 1):
        for statement in step:
            bind.exec_driver_sql(statement)
        bind.exec_driver_sql(f"PRAGMA user_version = {number}")


def downgrade() -> None:
    raise NotImplementedError("the first schema has no earlier version to go back to")
