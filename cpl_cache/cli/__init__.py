"""cpl-cache command line: thin typer commands that parse, build a config, call a stage, print one line.

Examples:
    cpl-cache synth demo/data
    cpl-cache extract --domain quickdraw --data-root data/domainnet --weak ckpt/quickdraw --cache-dir cache
    cpl-cache train --method cpl --domain quickdraw --cache-dir cache
    cpl-cache info --cache-dir cache

torch and transformers are imported inside the commands, so `cpl-cache --help` is instant.
"""

from __future__ import annotations

from cpl_cache.cli import stage_one, stage_two, whole  # noqa: F401  (each registers its commands)
from cpl_cache.cli.app import app, command, main

__all__ = ["app", "command", "main"]

# `cpl-cache --help` lists the commands in the order a user meets them, not the order of this file.
COMMAND_ORDER = (
    "synth", "train-weak", "extract", "info", "methods", "train", "run", "table", "plot", "reproduce", "demo",
    "synth-cache", "bench-regret",
)  # fmt: skip
app.registered_commands.sort(
    key=lambda c: COMMAND_ORDER.index(c.name) if c.name in COMMAND_ORDER else len(COMMAND_ORDER)
)
