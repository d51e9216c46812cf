"""Alembic's environment: always run on a connection handed over by `database.migrate`.

That connection is already inside a transaction holding the migration lock, so the
revisions run in it and commit (or roll back) with it: a crash mid-migration leaves the
previous version whole, and a second process starting at the same moment waits for the
lock, then finds nothing left to do.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=True, transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
