"""`magicmix db`: the database of this deployment (MAGICMIX_DATABASE_URL, or SQLite in the
data dir): check it, bring its schema up to date, or copy it into another one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from magicmix.cli.options import fail
from magicmix.config import get_settings

if TYPE_CHECKING:
    from magicmix.store.database import Database

db_app = typer.Typer(help="The database of jobs and keys.", no_args_is_help=True)


def _open(url: str, *, migrate: bool = True) -> Database:
    from magicmix.store.database import open_database

    try:
        return open_database(url, migrate_schema=migrate)
    except Exception as err:  # any driver error: said plainly, with the URL's password cut
        raise _unusable(url, err) from err


def _unusable(url: str, err: Exception) -> typer.Exit:
    from magicmix.store.database import redact

    cause = err.__cause__ or err  # the driver's own words say what is wrong
    why = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
    return fail(f"cannot use the database at {redact(url)}: {why}")


@db_app.command("check")
def check() -> None:
    """Connect, and say where the database is, its schema version and what it holds."""
    from sqlalchemy import func, select

    from magicmix.store.database import current_revision, head, redact
    from magicmix.store.schema import api_keys, jobs

    url = get_settings().effective_database_url
    database = _open(url, migrate=False)
    try:
        revision = current_revision(database)
        counts = {}
        if revision:
            with database.read() as connection:
                for table in (api_keys, jobs):
                    counts[table.name] = connection.scalar(select(func.count()).select_from(table))
    except Exception as err:  # the server is away, the credentials are refused...
        raise _unusable(url, err) from err
    wanted = head()
    state = "up to date" if revision == wanted else f"at {revision or 'nothing'} ({wanted} wanted)"
    typer.echo(f"{database.dialect} database at {redact(url)}: schema {state}")
    for name, count in counts.items():
        typer.echo(f"  {name}: {count} rows")


@db_app.command("upgrade")
def upgrade() -> None:
    """Bring the schema up to date (every process also does this when it starts)."""
    from magicmix.store.database import current_revision, redact

    url = get_settings().effective_database_url
    database = _open(url)
    typer.echo(f"{redact(url)}: schema at {current_revision(database)}")


@db_app.command("copy")
def copy(
    to: Annotated[str, typer.Option(help="The database to fill (empty): postgresql://...")],
) -> None:
    """Copy every key, job and Idempotency-Key from this deployment's database into another."""
    from magicmix.store.database import redact
    from magicmix.store.transfer import copy_rows

    source = _open(get_settings().effective_database_url)
    target = _open(to)
    try:
        copied = copy_rows(source, target)
    except ValueError as err:
        raise fail(str(err)) from err
    typer.echo(
        f"copied into {redact(to)}: "
        + ", ".join(f"{count} {name}" for name, count in copied.items())
    )
