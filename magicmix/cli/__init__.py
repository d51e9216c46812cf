"""The `magicmix` command line: thin commands over the engine, the stores and the service.

The commands live in `cli.main`; `app` (the console script's entry) is loaded from there
on first use, so that `cli.keys` (the key store's formatting, which the Modal app's
`manage_keys` prints too) loads without typer and every command, in images that lack them.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from magicmix.cli.main import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
