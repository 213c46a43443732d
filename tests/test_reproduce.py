"""Images to table: train-weak and extract run where missing, and a second run does no work at all."""

from __future__ import annotations

import json

import pytest

from cpl_cache.errors import UserError
from cpl_cache.reproduce import ReproduceConfig, reproduce

GRID = """
domains = ["real", "sketch"]
seeds = [0]
methods = [
    "weak",
    "zeroshot",
    "naive-lp",
    "cpl",
    "ceiling",
]
"""


@pytest.fixture
def config(synth_dir, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    return ReproduceConfig(
        pipeline=grid,
        data_root=synth_dir / "domainnet",
        strong=str(synth_dir / "models" / "clip-tiny"),
        weak_model=str(synth_dir / "models" / "resnet-tiny"),
        weak_dir=tmp_path / "weak",
        cache_dir=tmp_path / "cache",
        results=tmp_path / "results",
        device="cpu",
        weak_epochs=1,
        workers=0,
        progress=False,
    )


def test_second_run_does_no_work(config, monkeypatch):
    first = reproduce(config)
    assert first["did"] == {"train-weak": ["real", "sketch"], "extract": ["real", "sketch"], "cells": 10}
    for domain in ("real", "sketch"):
        assert json.loads((config.weak_dir / domain / "split.json").read_text())["domain"] == domain
        manifest = json.loads((config.cache_dir / domain / "manifest.json").read_text())
        assert manifest["complete"] and manifest["weak"]["id"] == str(config.weak_dir / domain)
    table = (config.results / "grid.md").read_text()
    assert (
        table == first["table"] and "| CPL |" in table and "| real | sketch |" in table.replace(" Avg |", "")
    )
    assert [p.name for p in first["plots"]] == ["curves-real.png", "curves-sketch.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in first["plots"])

    # The second run must not train, extract or fit anything: make each of them fail if called.
    def boom(*args, **kwargs):
        raise AssertionError("work was redone")

    monkeypatch.setattr("cpl_cache.weak.train_weak", boom)
    monkeypatch.setattr("cpl_cache.extract.runner.run_extract", boom)
    monkeypatch.setattr("cpl_cache.train.trainer.run_training", boom)
    stamps = {p: p.stat().st_mtime_ns for p in config.results.rglob("*.json")}
    second = reproduce(config)
    assert second["did"] == {"train-weak": [], "extract": [], "cells": 0}
    assert second["table"] == first["table"]
    assert {p: p.stat().st_mtime_ns for p in config.results.rglob("*.json")} == stamps


def test_unfinished_extraction_is_resumed(config):
    reproduce(config)
    mpath = config.cache_dir / "real" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["complete"] = False
    manifest["shards"] = []
    mpath.write_text(json.dumps(manifest))
    again = reproduce(config)
    assert again["did"]["extract"] == ["real"] and again["did"]["train-weak"] == []
    assert json.loads(mpath.read_text())["complete"]


def test_missing_grid_file_is_one_clear_error(config, tmp_path):
    from dataclasses import replace

    with pytest.raises(UserError, match="grid file .* not found"):
        reproduce(replace(config, pipeline=tmp_path / "nope.toml"))
