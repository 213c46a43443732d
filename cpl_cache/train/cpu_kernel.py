"""The CPU kernels of stage two's step (cpu_kernel.c), built on first use and cached.

    from cpl_cache.train import cpu_kernel
    if cpu_kernel.available():
        cpu_kernel.logit_grad_(s, probs, top, idx, cpu_kernel.SELF_MIX, coef=0.3)

On the CPU, a step is the matrix products plus memory-bound passes over the (B, K) logits and the
(K, D) prototypes; torch runs a loss's closed-form gradient as 5-8 of them after a gather of the weak
softmax's rows, and the prototypes' normalisation as 4 forward and 3 backward. Each kernel here makes
one pass: `logit_grad_` (every loss's gradient, reading the weak rows in place), `scaled_rows` and
`scaled_rows_backward_` (the proto head's). Measured in README, Benchmarks.

They are compiled with the machine's C compiler (`$CC`, else `cc`) and OpenMP into
`$XDG_CACHE_HOME/cpl-cache/kernels` (default `~/.cache`), under a name that hashes the source, the
flags and the CPU, so machines sharing a home directory each build their own. Where no compiler works,
`available()` is false and the trainer and heads run torch's operations: the same results up to
float32 rounding. Setting `CPL_CACHE_CPU_KERNEL=0` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_kernel.c")
SOFT, SELF_MIX, ADAPT, HARD = 0, 1, 2, 3  # the modes of cpu_kernel.c
# Tried in order until one builds: -march=native for the machine's vector width; OpenMP for threads.
# The finite-math flags let the row maximum vectorise; the kernel bounds its scans should a NaN appear.
_FLAGS = "-O3 -shared -fPIC -ffinite-math-only -fno-signed-zeros -fno-trapping-math"
ATTEMPTS = (f"{_FLAGS} -march=native -fopenmp", f"{_FLAGS} -fopenmp", f"{_FLAGS} -march=native", _FLAGS)


def cache_dir() -> Path:
    """Where built kernels are kept: `$XDG_CACHE_HOME/cpl-cache/kernels`, default under `~/.cache`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cpl-cache" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags where Linux lists them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _build(cc: str, flags: str, src: bytes, where: Path) -> Path | None:
    """The library built from `src` with `flags` in `where` (reused if there); None if it does not compile."""
    key = hashlib.sha256(b"\0".join([src, flags.encode(), cc.encode(), _cpu_id().encode()])).hexdigest()
    lib = where / f"cpu_kernel-{platform.machine()}-{key[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once (torchrun, a grid) never
    # load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags.split(), str(SOURCE), "-o", tmp, "-lm"]
        if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
            return None
        os.replace(tmp, lib)
        return lib
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("CPL_CACHE_CPU_KERNEL", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    src = SOURCE.read_bytes()
    errors, dll = [], None
    # A home directory that cannot be written (some clusters' compute nodes) falls back to a fresh private
    # directory (mode 0700) for this process, removed once the library is loaded: a shared, fixed one
    # could be planted with a library by another user.
    for private in (False, True):
        where: Path | str = "a temporary directory" if private else cache_dir()
        try:
            if private:
                where = Path(tempfile.mkdtemp(prefix="cpl-cache-kernels-"))
            lib = None
            for flags in ATTEMPTS:
                if (lib := _build(cc, flags, src, where)) is not None:
                    break
            if lib is None:
                errors.append(f"{cc} compiles none of {len(ATTEMPTS)} flag sets")
                break
            dll = ctypes.CDLL(str(lib))
            if private:
                shutil.rmtree(where, ignore_errors=True)  # the loaded library stays mapped
            break
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{where}: {e}")
    if dll is None:
        warnings.warn(
            f"the CPU kernel could not be built ({'; '.join(errors)}); stage two runs torch's forms",
            stacklevel=2,
        )
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    dll.cpl_logit_grad.restype = i64
    dll.cpl_logit_grad.argtypes = [p, i64, i64, p, p, i64, p, i32, f32, f32, i32]
    dll.cpl_scaled_rows.restype = None
    dll.cpl_scaled_rows.argtypes = [p, i64, i64, f32, p, p, i32]
    dll.cpl_scaled_rows_backward.restype = None
    dll.cpl_scaled_rows_backward.argtypes = [p, p, f32, p, i64, i64, f32, i32]
    return dll


_turned_off = False


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    return not _turned_off and _library() is not None


@contextlib.contextmanager
def turned_off() -> Iterator[None]:
    """Within this block `available()` is false: torch's forms run, as without a compiler (for side-by-side
    measurements in one process)."""
    global _turned_off
    before, _turned_off = _turned_off, True
    try:
        yield
    finally:
        _turned_off = before


def takes(*tensors: Tensor) -> bool:
    """Whether the kernel is available and these tensors are what it reads: contiguous float32 on the CPU."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
        and available()
    )


def _dll() -> ctypes.CDLL:
    dll = _library()
    if dll is None or _turned_off:
        raise RuntimeError("the CPU kernel is not available; check cpu_kernel.available() first")
    return dll


def _check(*tensors: tuple[Tensor | None, torch.dtype]) -> None:
    for t, dtype in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous()):
            layout = "" if t.is_contiguous() else "non-contiguous "
            got = f"a {layout}{t.dtype} one on {t.device}"
            raise ValueError(f"the CPU kernel takes contiguous {dtype} CPU tensors, not {got}")


def scaled_rows(p: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """`heads._scaled_rows` in one pass: w = scale * p / ||p|| per row of p (K, D), and f = scale / ||p||
    as (K, 1), both fresh."""
    _check((p, torch.float32))
    K, D = p.shape
    w, f = torch.empty_like(p), p.new_empty(K, 1)
    _dll().cpl_scaled_rows(p.data_ptr(), K, D, scale, w.data_ptr(), f.data_ptr(), torch.get_num_threads())
    return w, f


def scaled_rows_backward_(w: Tensor, f: Tensor, scale: float, g: Tensor, alpha: float = 1.0) -> Tensor:
    """`heads._scaled_rows_backward` in one pass, over g (K, D): alpha f (g - u (u . g)), u = w / scale."""
    _check((w, torch.float32), (f, torch.float32), (g, torch.float32))
    K, D = g.shape
    if w.shape != g.shape or f.numel() != K:
        raise ValueError(f"shapes do not match: w {tuple(w.shape)}, f {tuple(f.shape)}, g {tuple(g.shape)}")
    _dll().cpl_scaled_rows_backward(
        w.data_ptr(), f.data_ptr(), scale, g.data_ptr(), K, D, alpha, torch.get_num_threads()
    )
    return g


def logit_grad_(
    s: Tensor,
    probs: Tensor | None,
    top: Tensor | None,
    idx: Tensor,
    mode: int,
    coef: float = 0.0,
    tau: float = 1.0,
) -> Tensor:
    """Over the student logits s (B, K), in place: the loss's gradient summed over rows (`LogitGrad`'s
    contract), with the targets' softmax `probs` (N, K) and argmax `top` (N,) read at rows `idx` (B,).

    Every tensor must be on the CPU and contiguous, s and probs float32, top and idx int64; a mode that
    does not read probs (HARD) or top (SOFT, SELF_MIX) may be given None for it.
    """
    dll = _dll()
    _check((s, torch.float32), (probs, torch.float32), (top, torch.int64), (idx, torch.int64))
    for name, t, needed in (("probs", probs, mode != HARD), ("top", top, mode in (ADAPT, HARD))):
        if needed and t is None:
            raise ValueError(f"mode {mode} reads {name}, which is None")
    B, K = s.shape
    n = len(probs) if probs is not None else len(top)
    if len(idx) != B or (probs is not None and probs.shape != (n, K)) or (top is not None and len(top) != n):
        raise ValueError(f"shapes do not match: s {tuple(s.shape)}, idx {len(idx)}, targets of {n} rows")
    bad = dll.cpl_logit_grad(
        s.data_ptr(), B, K, probs.data_ptr() if probs is not None else None,
        top.data_ptr() if top is not None else None, n, idx.data_ptr(), mode, coef, tau,
        torch.get_num_threads(),
    )  # fmt: skip
    if bad:
        raise IndexError(f"{bad} row index(es) or target classes out of range (rows 0..{n - 1})")
    return s
