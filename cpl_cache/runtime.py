"""Device choice and seeding, done inside commands (never at import time)."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

from cpl_cache.errors import UserError


def resolve_device(name: str = "auto") -> str:
    """Map `auto` to CUDA when present, else CPU; refuse a CUDA device that is not there."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            rank = int(os.environ.get("LOCAL_RANK", 0))
            return f"cuda:{rank}" if torch.cuda.device_count() > 1 else "cuda"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; pass --device cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return name


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def quiet_saving() -> Iterator[None]:
    """Hide transformers' per-shard progress bars while saving a checkpoint (commands print their own)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()
