"""Adapters that run the service: `local` (SQLite, a worker thread) and `modal`."""
