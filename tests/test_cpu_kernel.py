"""The CPU kernel of the closed-form gradients: the same gradient as the losses' torch forms (held to the
formulas in test_losses.py), on random rows of a target table, ties, odd sizes and any thread count;
its build, cache and fallback; and training with it against training without it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from cpl_cache.losses import LOSSES
from cpl_cache.train import cpu_kernel
from cpl_cache.train.losses import LOGIT_GRADS

COMPILER = shutil.which(os.environ.get("CC", "cc"))
needs_kernel = pytest.mark.skipif(COMPILER is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The kernel built anew into an empty cache directory (and the process's own build restored after)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cpu_kernel._library.cache_clear()
    yield tmp_path / "cache" / "cpl-cache" / "kernels"
    cpu_kernel._library.cache_clear()


def table(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A target table as the trainer holds it: the softmax and argmax of weak logits per train row."""
    w = 4 * torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return torch.softmax(w, dim=1), w.argmax(dim=1)


def both(name: str, s: torch.Tensor, probs, top, idx, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's gradient from its torch form (rows gathered) and from the kernel (rows read in place)."""
    form = LOGIT_GRADS[LOSSES[name]]
    p, t = (probs if form.probs else None), (top if form.top else None)
    want = form(s.clone(), p[idx] if p is not None else None, t[idx] if t is not None else None, progress)
    got = cpu_kernel.logit_grad_(s.clone(), p, t, idx, *form.kernel(progress))
    return got, want


@needs_kernel
def test_the_kernel_builds_where_a_compiler_is():
    assert cpu_kernel.available()


@needs_kernel
@pytest.mark.parametrize("progress", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(n for n, fn in LOSSES.items() if fn in LOGIT_GRADS))
def test_kernel_equals_the_torch_form(name: str, progress: float):
    probs, top = table(300, 37, seed=1)
    g = torch.Generator().manual_seed(2 + round(100 * progress))
    s = 6 * torch.randn(64, 37, generator=g)
    idx = torch.randperm(300, generator=g)[:64]  # unsorted, as a batch may be
    got, want = both(name, s, probs, top, idx, progress)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-7)
    assert (got - want).abs().max() > 0 or name == "hard"  # computed apart, not copied: rounding differs


@needs_kernel
@pytest.mark.parametrize("name", ["auxconf-argmax", "augconf-argmax", "adaptconf"])
def test_kernel_takes_the_first_of_tied_maxima(name: str):
    probs, top = table(50, 9, seed=3)
    s = 3 * torch.randn(12, 9, generator=torch.Generator().manual_seed(4))
    s[:4, 6] = s[:4, 2] = s[:4].max(dim=1).values + 1.0  # rows 0-3: a tie at columns 2 and 6
    s[4, [1, 5, 8]] = s[4].max() + 0.5  # row 4: three tied
    idx = torch.arange(12) * 4
    got, want = both(name, s, probs, top, idx, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-7)
    if name != "adaptconf":  # at a fixed weight 0.5 the one-hot outweighs the weak rows' difference
        assert (got[:4, 2] < got[:4, 6]).all()  # the one-hot went to column 2, the first


@needs_kernel
@pytest.mark.parametrize(("rows", "classes"), [(1, 1), (1, 345), (3, 2), (7, 17), (130, 1000)])
def test_kernel_on_odd_sizes_and_any_thread_count(rows: int, classes: int):
    """Sizes that are no multiple of a vector width or of the thread count; threads split rows, so the
    result is the same bit for bit with one thread or two."""
    probs, top = table(2 * rows + 1, classes, seed=5)
    s = 5 * torch.randn(rows, classes, generator=torch.Generator().manual_seed(6))
    idx = torch.randperm(2 * rows + 1, generator=torch.Generator().manual_seed(7))[:rows]
    threads = torch.get_num_threads()
    for name in sorted(n for n, fn in LOSSES.items() if fn in LOGIT_GRADS):
        got, want = both(name, s, probs, top, idx, 0.7)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-7)
        try:
            torch.set_num_threads(1)
            one, _ = both(name, s, probs, top, idx, 0.7)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, got)


@needs_kernel
def test_kernel_leaves_the_callers_subnormal_mode_alone():
    """The kernel flushes subnormal floats in its own threads only: the calling thread's mode is restored."""
    tiny = torch.tensor([1e-39])  # a subnormal float32
    probs, top = table(10, 5, seed=8)
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        try:
            cpu_kernel.logit_grad_(torch.randn(4, 5), probs, top, torch.arange(4), cpu_kernel.ADAPT, tau=0.5)
            assert bool((tiny * 1.0 == 0).item()) == flush
        finally:
            torch.set_flush_denormal(False)


@needs_kernel
def test_kernel_refuses_what_it_cannot_read():
    probs, top = table(10, 5, seed=9)
    s = torch.randn(4, 5)
    with pytest.raises(IndexError, match="out of range"):
        cpu_kernel.logit_grad_(s.clone(), probs, top, torch.tensor([0, 1, 10, 2]), cpu_kernel.SOFT)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernel.logit_grad_(s.double(), probs, top, torch.arange(4), cpu_kernel.SOFT)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernel.logit_grad_(torch.randn(5, 4).T, probs, top, torch.arange(4), cpu_kernel.SOFT)
    with pytest.raises(ValueError, match="do not match"):
        cpu_kernel.logit_grad_(s.clone(), probs, top, torch.arange(3), cpu_kernel.SOFT)
    with pytest.raises(ValueError, match="reads top"):
        cpu_kernel.logit_grad_(s.clone(), probs, None, torch.arange(4), cpu_kernel.ADAPT)
    with pytest.raises(ValueError, match="reads top"):
        cpu_kernel.logit_grad_(s.clone(), None, None, torch.arange(4), cpu_kernel.HARD)
    with pytest.raises(ValueError, match="reads probs"):
        cpu_kernel.logit_grad_(s.clone(), None, top, torch.arange(4), cpu_kernel.SELF_MIX)


@needs_kernel
def test_build_is_cached_per_source(fresh_build: Path, monkeypatch: pytest.MonkeyPatch):
    assert cpu_kernel.available()
    built = sorted(fresh_build.glob("*.so"))
    assert len(built) == 1  # and no temporary file left beside it
    stamp = built[0].stat().st_mtime_ns
    cpu_kernel._library.cache_clear()
    assert cpu_kernel.available()  # a second process: loads the same file, builds nothing
    assert sorted(fresh_build.glob("*.so")) == built and built[0].stat().st_mtime_ns == stamp
    # Another source (an upgrade of the package) builds beside it under another name.
    changed = fresh_build.parent / "changed.c"
    changed.write_text(cpu_kernel.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", changed)
    cpu_kernel._library.cache_clear()
    assert cpu_kernel.available()
    assert len(list(fresh_build.glob("*.so"))) == 2


def test_without_a_compiler_or_when_turned_off_it_is_unavailable(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CC", "no-such-compiler")
    assert not cpu_kernel.available()
    monkeypatch.setenv("CC", COMPILER or "cc")
    monkeypatch.setenv("CPL_CACHE_CPU_KERNEL", "0")
    cpu_kernel._library.cache_clear()
    assert not cpu_kernel.available()
    assert not fresh_build.exists()
    with pytest.raises(RuntimeError, match="not available"):
        cpu_kernel.logit_grad_(torch.randn(2, 3), *table(4, 3, seed=0), torch.arange(2), cpu_kernel.SOFT)


def test_a_compiler_that_fails_warns_and_falls_back(fresh_build: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    with pytest.warns(UserWarning, match="could not be built"):
        assert not cpu_kernel.available()


@needs_kernel
@pytest.mark.parametrize(("rows", "dim"), [(1, 1), (5, 3), (345, 512), (7, 1000)])
def test_normalisation_kernels_equal_torch(rows: int, dim: int):
    """The prototypes' scaled normalisation and its backward: the kernel against the head's torch code."""
    from cpl_cache.train.heads import _scaled_rows, _scaled_rows_backward

    g = torch.Generator().manual_seed(rows + dim)
    p, up = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    p[0] = 0.0  # a zero row: the norm is clamped at 1e-12, as in torch's code
    w, f = cpu_kernel.scaled_rows(p, 42.0)
    with cpu_kernel.turned_off():
        w_ref, f_ref = _scaled_rows(p, 42.0)
        back_ref = _scaled_rows_backward(w_ref, f_ref, 42.0, up, 0.25, overwrite=True)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(f, f_ref, rtol=2e-6, atol=0.0)
    back = cpu_kernel.scaled_rows_backward_(w, f, 42.0, up.clone(), 0.25)
    torch.testing.assert_close(back, back_ref, rtol=1e-5, atol=1e-6)
    # The head takes the kernel on the CPU: the same numbers as calling it directly.
    assert torch.equal(_scaled_rows(p, 42.0)[0], w)


@needs_kernel
def test_a_cache_directory_that_cannot_be_written_falls_back_to_a_private_one(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """`$XDG_CACHE_HOME` a file (as good as read-only, even for root): the kernel is built in a fresh
    temporary directory, used, and that directory removed."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert cpu_kernel.available()
    probs, top = table(10, 5, seed=10)
    s = torch.randn(4, 5)
    got = cpu_kernel.logit_grad_(s.clone(), probs, top, torch.arange(4), cpu_kernel.SOFT)
    torch.testing.assert_close(got, torch.softmax(s, dim=1) - probs[:4], rtol=1e-5, atol=1e-7)
    assert list((tmp_path / "tmp").iterdir()) == []
