"""Options and arguments that several commands share, declared once, and their parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cpl_cache.errors import UserError
from cpl_cache.runtime import check_seed

CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Root folder of the feature cache.")]
DomainOpt = Annotated[str, typer.Option("--domain", help="Domain name, e.g. quickdraw.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
GridArg = Annotated[Path, typer.Argument(help="Grid file, e.g. pipelines/table2.toml.")]
SeedsOpt = Annotated[str | None, typer.Option(help="Only these seeds (comma list), e.g. 0.")]
SplitSeedOpt = Annotated[int, typer.Option("--split-seed", help="Seed of the hold/test split.")]


FollowSymlinksOpt = Annotated[
    bool,
    typer.Option(
        "--follow-symlinks", help="Read images through symbolic links that lead out of --data-root."
    ),
]


SelectOpt = Annotated[
    str,
    typer.Option(
        "--select",
        help="How each trained cell's step size (and other declared candidates) and stopping point are "
        "chosen: hold (accuracy on the hold rows' ground truth, every candidate at every checkpoint), "
        "weak (agreement with the weak labels of 10% of train held out) or none (the registry's fixed "
        "values). Test rows are never read before the choice.",
    ),
]


PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Stage two's matrix products: auto (bfloat16 where the device computes it natively: a CPU "
        "with AVX512-BF16 or AMX, a CUDA GPU; float32 elsewhere), bf16 or fp32. Weights, losses and the "
        "optimiser stay float32; every result records which was used.",
    ),
]


def _settings(pairs: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs as a dict; values read as TOML scalars (4, 0.5, "x"), else as text."""
    from cpl_cache.pipeline import _toml_loads

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {pair!r} must be KEY=VALUE, e.g. --set tau=4 (see `cpl-cache methods`)")
        try:
            value = _toml_loads(f"v = {text.strip()}")["v"]
        except ValueError:
            value = text.strip()
        out[key.strip()] = value
    return out


def _names(text: str | None, what: str) -> tuple[str, ...] | None:
    """A comma list from the command line (`a,b`), or None when not given."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"--{what} is empty; give a comma list such as --{what} a,b")
    return names


def _seeds(text: str | None) -> tuple[int, ...] | None:
    names = _names(text, "seeds")
    if names is None:
        return None
    try:
        seeds = tuple(int(n) for n in names)
    except ValueError:
        raise UserError(f"--seeds {text!r} must be a comma list of integers, e.g. --seeds 0,1,2") from None
    for s in seeds:
        check_seed(s, "--seeds")
    return seeds


ResultsDir = Annotated[
    Path, typer.Option("--results", help="Folder of results: {domain}/{method}-seed{seed}.json.")
]


ProgressOpt = Annotated[
    bool,
    typer.Option(
        "--progress/--no-progress",
        help="Progress on stderr (a bar on a terminal, a line per stage in a log); --no-progress is "
        "silent but for warnings and errors. Commands that only print a result accept it too.",
    ),
]
