"""From images to the table: per domain train-weak and extract where their outputs are missing,
then every cell of a grid, the table and the training-curve plots. A second run does no work.

    cpl-cache reproduce pipelines/table2.toml --data-root data/domainnet \
        --strong openai/clip-vit-base-patch32 --weak-model microsoft/resnet-18
    cpl-cache reproduce pipelines/table6.toml --data-root data/officehome   # the grid names its dataset
    cpl-cache demo        # the same on synthetic images and tiny models, offline, on the CPU
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpl_cache.cache import read_manifest
from cpl_cache.datasets import DATASETS
from cpl_cache.errors import UserError


@dataclass(frozen=True)
class ReproduceConfig:
    """One reproduction: where the images, checkpoints, cache and results live, and which models."""

    pipeline: Path
    data_root: Path
    strong: str = "openai/clip-vit-base-patch32"
    weak_model: str = "microsoft/resnet-18"
    weak_dir: Path = Path("checkpoints/weak")  # one fine-tuned weak checkpoint per domain below it
    cache_dir: Path = Path("cache")
    results: Path = Path("results")
    dataset: str | None = None  # None: the grid's `dataset`, else domainnet
    device: str = "auto"
    weak_epochs: int | None = None  # None: train-weak's default
    weak_batch_size: int | None = None
    weak_workers: int | None = None  # loader processes of train-weak (0: decode in the main process)
    extract_batch_size: int | None = None
    workers: int | None = None
    seeds: tuple[int, ...] | None = None
    progress: bool = True
    select: str = "hold"  # how each cell's candidates and stopping point are chosen (hold, weak, none)
    precision: str = "auto"  # stage two's matrix products: bf16 where native, else fp32


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _weak_is_trained(weak_dir: Path) -> bool:
    from cpl_cache.weak import read_split_record

    return (weak_dir / "config.json").is_file() and read_split_record(weak_dir) is not None


def _cache_is_complete(cache_dir: Path, domain: str) -> bool:
    try:
        return bool(read_manifest(cache_dir, domain, require_complete=False).get("complete"))
    except UserError:
        return False


def _train_weak(cfg: ReproduceConfig, domain: str, out: Path) -> None:
    from cpl_cache.weak import WeakConfig, train_weak

    extra: dict[str, Any] = {}
    if cfg.weak_epochs is not None:
        extra["epochs"] = cfg.weak_epochs
    if cfg.weak_batch_size is not None:
        extra["batch_size"] = cfg.weak_batch_size
    if cfg.weak_workers is not None:
        extra["workers"] = cfg.weak_workers
    # A folder without a split record is an unfinished run of ours: start it over.
    train_weak(
        WeakConfig(
            domain=domain,
            data_root=cfg.data_root,
            model=cfg.weak_model,
            out=out,
            dataset=cfg.dataset,
            device=cfg.device,
            progress=cfg.progress,
            overwrite=True,
            **extra,
        )
    )


def _extract(cfg: ReproduceConfig, domain: str, weak: Path) -> None:
    from cpl_cache.extract.runner import ExtractConfig, run_extract

    extra: dict[str, Any] = {}
    if cfg.extract_batch_size is not None:
        extra["batch_size"] = cfg.extract_batch_size
    run_extract(
        ExtractConfig(
            domain=domain,
            data_root=cfg.data_root,
            weak=str(weak),
            cache_dir=cfg.cache_dir,
            strong=cfg.strong,
            dataset=cfg.dataset,
            device=cfg.device,
            workers=cfg.workers,
            progress=cfg.progress,
            **extra,
        )
    )


def reproduce(cfg: ReproduceConfig) -> dict[str, Any]:
    """Run what is missing and return {table, table_path, plots, did} (what each step did)."""
    from cpl_cache.pipeline import PipelineConfig, load_grid, plan, run_pipeline
    from cpl_cache.report import plot_curves, render_table_and_warnings

    t0 = time.perf_counter()
    say = _say if cfg.progress else (lambda msg: None)  # progress lines; warnings are always said
    grid = load_grid(cfg.pipeline)
    grid_run = PipelineConfig(
        pipeline=cfg.pipeline, cache_dir=cfg.cache_dir, results=cfg.results, device=cfg.device,
        seeds=cfg.seeds, progress=cfg.progress, select=cfg.select, precision=cfg.precision,
    )  # fmt: skip
    plan(grid_run)  # every cell's settings checked before hours of extraction
    dataset = cfg.dataset or grid.dataset or "domainnet"
    if cfg.dataset and grid.dataset and cfg.dataset != grid.dataset:
        say(f"cpl-cache: --dataset {cfg.dataset} overrides the grid's dataset {grid.dataset}")
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; use one of {', '.join(sorted(DATASETS))}")
    cfg = dataclasses.replace(cfg, dataset=dataset)
    did = {"train-weak": [], "extract": [], "cells": 0}
    for domain in grid.domains:
        weak = cfg.weak_dir / domain
        if not _weak_is_trained(weak):
            say(f"cpl-cache: train-weak {domain} -> {weak}")
            _train_weak(cfg, domain, weak)
            did["train-weak"].append(domain)
        if not _cache_is_complete(cfg.cache_dir, domain):
            say(f"cpl-cache: extract {domain} -> {cfg.cache_dir / domain}")
            _extract(cfg, domain, weak)
            did["extract"].append(domain)

    summary = run_pipeline(grid_run)
    did["cells"] = summary.ran
    say(f"cpl-cache: {summary.line()}")

    table, warnings = render_table_and_warnings(cfg.results, "markdown")
    for warning in warnings:
        _say(f"cpl-cache: warning: {warning}")
    table_path = Path(cfg.results) / f"{Path(cfg.pipeline).stem}.md"
    table_path.write_text(table, encoding="utf-8")
    plots = []
    for domain in grid.domains:
        out = Path(cfg.results) / f"curves-{domain}.png"
        newest = max((p.stat().st_mtime for p in (Path(cfg.results) / domain).glob("*.json")), default=0.0)
        if not out.is_file() or out.stat().st_mtime < newest:
            try:
                plot_curves(cfg.results, domain, out)
            except UserError as err:  # e.g. the plot extra is missing: the table still stands
                _say(f"cpl-cache: no plot for {domain}: {err}")
                continue
        plots.append(out)
    return {
        "table": table,
        "table_path": table_path,
        "plots": plots,
        "did": did,
        "seconds": time.perf_counter() - t0,
    }
