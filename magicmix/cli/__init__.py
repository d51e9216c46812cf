"""The `magicmix` command line: thin commands over the engine, the stores and the service."""

from magicmix.cli.main import app, main

__all__ = ["app", "main"]
