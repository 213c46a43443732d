"""Device choice and seeding, done inside commands (never at import time)."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

from cpl_cache.errors import UserError


def resolve_device(name: str = "auto") -> str:
    """Map `auto` to CUDA when present, else CPU; refuse a CUDA device that is not there.

    Under torchrun (LOCAL_RANK set), `auto` and `cuda` give each local rank its own GPU, sharing
    them round-robin when there are fewer GPUs than ranks.
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; pass --device cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return name


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def quiet_transformers(*, errors_only: bool = False) -> Iterator[None]:
    """Hide transformers' per-file progress bars while loading or saving (commands print their own);
    with `errors_only`, its warnings too (e.g. weights skipped on purpose)."""
    from transformers.utils import logging

    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    if errors_only:
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
