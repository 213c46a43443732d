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
