"""Device choice, seeding and progress bars, done inside commands (never at import time)."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

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
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "device 'mps' requested but Apple's MPS is not available here; pass --device cpu or auto"
        )
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return name


PRECISIONS = ("auto", "bf16", "fp32")
# `auto` takes bf16 only for heads of at least this many weights (dim x classes, e.g. 512 x 256). Below
# it the matrix products are too small to gain on a CPU (the zoo's caches of 64 to 256 dims train 0.73x to
# 1.08x as fast in bf16 on 2 cores) and rounding moves a small cache's choices by up to 1.2 points;
# at 512 x 345 (DomainNet's classes) bf16 trains the default protocol 1.34x as fast and moves no method
# by more than 0.12 point, while at 768 x 100 (1.28x) one method moved 0.45, above the 0.3 we allow
# (benchmarks/bench_precision.py, bench-results/precision.json).
BF16_MIN_WEIGHTS = 2**17


def resolve_precision(name: str, device: str, weights: int | None = None) -> str:
    """How stage two's matrix products run on `device`: `bf16` (autocast: bfloat16 products with float32
    accumulation, float32 weights, losses and optimiser state) or `fp32`. `auto` takes bf16 where the
    device computes it natively (a CUDA GPU with bfloat16, a CPU with AVX512-BF16 or AMX: on other CPUs
    it is emulated and slower) and the head has at least BF16_MIN_WEIGHTS `weights` (dim x classes; None:
    unknown yet), and fp32 elsewhere; `bf16` where it is not native is refused."""
    import torch

    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}; use {', '.join(PRECISIONS)}")
    if name == "fp32":
        return name
    if device.startswith("cuda"):
        native = torch.cuda.is_bf16_supported()
    elif device == "cpu":
        native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    else:
        native = False
    if name == "bf16" and not native:
        raise UserError(f"{device} has no native bfloat16 matrix products; pass --precision fp32 or auto")
    if name == "auto" and weights is not None and weights < BF16_MIN_WEIGHTS:
        return "fp32"
    return "bf16" if native else "fp32"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators; a seed NumPy cannot take is refused."""
    import numpy as np
    import torch

    check_seed(seed, "seed")
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


# ------------------------------------------------------------------------------------ seeds

SEED_MAX = 2**32 - 1  # NumPy's legacy seeding takes 0..2**32-1, and every run seeds NumPy


def check_seed(seed: int, flag: str = "--seed") -> int:
    """Refuse a seed NumPy cannot take (negative, or over 2**32-1) in one line that names `flag`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{flag} {seed} is out of range; a seed is an integer from 0 to 2**32-1 ({SEED_MAX})")
    return seed


# ------------------------------------------------------------------------------------ progress


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def quiet_transformers_bars(progress: bool = False, file: Any = None) -> None:
    """Where bars are off (`progress` false) or stderr (`file`) is no terminal, turn transformers'
    own bars ("Loading weights", downloads) off for the rest of the process."""
    if progress and _is_tty(sys.stderr if file is None else file):
        return
    from transformers.utils import logging

    logging.disable_progress_bar()


def progress(iterable: Any = None, *args: Any, disable: bool = False, file: Any = None, **kwargs: Any) -> Any:
    """tqdm, called as tqdm is, for every bar of the package: a live bar on a terminal; where stderr
    (or `file`) is not a terminal (a log file, a pipe), one plain line when the stage ends instead of
    a bar whose redraws fill the log; nothing when `disable`.

    With `disable` or no terminal, transformers' own bars are turned off too (`quiet_transformers_bars`).
    """
    out = sys.stderr if file is None else file
    tty = _is_tty(out)
    quiet_transformers_bars(not disable, out)
    if disable:
        return PlainProgress(iterable, *args, disable=True, file=out, **kwargs)
    if not tty:
        return PlainProgress(iterable, *args, file=out, **kwargs)
    from tqdm import tqdm

    return tqdm(iterable, *args, file=out, **kwargs)


class PlainProgress:
    """The part of tqdm's interface the package uses, written as one line at `close` (unless
    `leave=False`, as a bar that vanishes leaves no line): `desc: n/total unit in Ts (postfix)`."""

    def __init__(
        self,
        iterable: Any = None,
        desc: str | None = None,
        total: float | None = None,
        leave: bool | None = True,
        file: Any = None,
        *,
        unit: str = "it",
        initial: float = 0,
        disable: bool = False,
        **_ignored: Any,
    ):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except (TypeError, AttributeError):
                total = None
        self.iterable, self.desc, self.total, self.leave = iterable, desc or "", total, leave
        self.file, self.unit, self.n, self.disable = file, unit, initial, disable
        self.postfix = ""
        self._start, self._closed = time.perf_counter(), disable

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        pass

    def clear(self, *args: Any, **kwargs: Any) -> None:
        pass

    def write(self, s: str, file: Any = None, end: str = "\n", nolock: bool = False) -> None:
        """A line of its own, as tqdm.write prints it (to `file`, else stdout)."""
        out = sys.stdout if file is None else file
        out.write(s + end)
        out.flush()

    def line(self) -> str:
        """The stage's one line, e.g. `extract real: 1200/1200 img in 3.4s`."""
        done = f"{_count(self.n)}/{_count(self.total)}" if self.total is not None else _count(self.n)
        head = f"{self.desc}: " if self.desc else ""
        tail = f" ({self.postfix})" if self.postfix else ""
        return f"{head}{done} {self.unit} in {time.perf_counter() - self._start:.1f}s{tail}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave is not False and self.file is not None:
            self.file.write(self.line() + "\n")
            self.file.flush()


def _count(n: float | None) -> str:
    return str(int(n)) if n is not None and float(n).is_integer() else f"{n:g}"
