"""Alembic revisions of the schema; `database.migrate` runs them (see its docstring)."""
