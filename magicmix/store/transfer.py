"""Moving a deployment's state from one database to another (a laptop's SQLite to the
PostgreSQL its replicas or Modal will share), every row as it is.

The target must be at the same schema version and hold no rows yet; ids, hashes and
encrypted secrets are copied unchanged, so keys keep working (with the same
`MAGICMIX_SECRET_KEY`) and job ids keep counting from where they were.
"""

from __future__ import annotations

from sqlalchemy import func, insert, select, text

from magicmix.store.database import Database, current_revision
from magicmix.store.schema import metadata

CHUNK = 500  # rows per INSERT: layout images make rows large


def copy_rows(source: Database, target: Database) -> dict[str, int]:
    """Copy every table from `source` to `target` in one transaction; rows per table."""
    if current_revision(source) != current_revision(target):
        raise ValueError("the two databases are at different schema versions")
    copied: dict[str, int] = {}
    with source.read() as reading, target.transaction() as writing:
        for table in metadata.sorted_tables:
            if writing.scalar(select(func.count()).select_from(table)):
                raise ValueError(f"the target database already has rows in {table.name}")
            rows = reading.execute(select(table)).mappings()
            copied[table.name] = 0
            while chunk := rows.fetchmany(CHUNK):
                writing.execute(insert(table), [dict(row) for row in chunk])
                copied[table.name] += len(chunk)
        if target.dialect == "postgresql":  # new ids continue after the copied ones
            writing.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('jobs', 'id'),"
                    " COALESCE((SELECT MAX(id) FROM jobs), 0) + 1, false)"
                )
            )
    return copied
