"""Where jobs, keys, per-key S3 details, Idempotency-Keys and webhook deliveries live.

One SQL store serves every deployment: SQLite on a laptop (embedded, the default) and
PostgreSQL wherever more than one process serves (replicas of `magicmix serve`, Modal).

- `base.py`: the contracts the lifecycle and the service program against;
- `database.py`: opening a database by URL, migrating it, transactions and locks;
- `schema.py` and `migrations/`: the tables, and how each version of them came to be;
- `jobs.py`, `keys.py`: the implementations over SQLAlchemy Core;
- `testing.py`: a throwaway PostgreSQL server and fault injection, for tests and rehearsals.
"""
