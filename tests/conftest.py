"""Shared fixtures: an offline session and one small synthetic DomainNet made once per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before any test imports transformers: nothing may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYNTH_CLASSES = 5
SYNTH_PER_CLASS = 8


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cpl-cache synth` output with 5 classes x 8 images x 6 domains (read-only: copy before changing).

    Layout: synth_dir/domainnet (the data root), synth_dir/models/clip-tiny, synth_dir/models/resnet-tiny.
    The CLIP keeps its random weights (no pretraining: loadable and fast, not good at zero-shot).
    """
    from cpl_cache.synth.images import ImageSetConfig, synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, ImageSetConfig(classes=SYNTH_CLASSES, per_class=SYNTH_PER_CLASS, seed=0), pretrain=None)
    return out


class _FullDiskFile:
    """A file opened for writing on a disk that is full: it exists (0 bytes), and every write fails."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch):
    """`full_disk(name, after=0)`: from then on, the cache's writes of files whose final name is `name`
    fail as on a full disk (ENOSPC), once `after` of them went through; `full_disk(None)` makes room
    again. No real disk fills up: the `open` that cpl_cache.cache writes with is replaced, so torch
    and the rest write as usual."""
    import builtins

    import cpl_cache.cache as cache

    state = {"name": None, "after": 0, "seen": 0}

    def fake_open(path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)
        final = Path(path).name.lstrip(".").split(".tmp-")[0]  # .shard-00003.h5.tmp-123 -> shard-00003.h5
        if "w" in mode and final == state["name"]:
            state["seen"] += 1
            if state["seen"] > state["after"]:
                return _FullDiskFile(fh)
        return fh

    def arm(name: str | None, after: int = 0) -> None:
        state.update(name=name, after=after, seen=0)

    monkeypatch.setattr(cache, "open", fake_open, raising=False)
    return arm
