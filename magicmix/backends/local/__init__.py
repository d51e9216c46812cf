"""The local backend: SQLite jobs and keys, one worker thread; `compose` builds it."""
