"""Commands of stage two: methods, train, run, bench-regret, table, plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cpl_cache.cli.app import command
from cpl_cache.cli.options import (
    CacheDir,
    DeviceOpt,
    DomainOpt,
    GridArg,
    PrecisionOpt,
    ProgressOpt,
    ResultsDir,
    SeedsOpt,
    SelectOpt,
    _names,
    _seeds,
    _settings,
)
from cpl_cache.errors import UserError
from cpl_cache.runtime import check_seed, quiet_transformers_bars


@command("methods")
def methods_cmd(progress: ProgressOpt = True) -> None:
    """List the registered methods (name, head, loss, targets, one line each) and their hyperparameters,
    then the registered heads and losses."""
    from cpl_cache.train.heads import HEADS
    from cpl_cache.train.losses import LOSSES
    from cpl_cache.train.methods import HPARAMS, METHODS, loss_constants

    for m in METHODS.values():
        typer.echo(f"{m.name:<13} {m.head or '-':<7} {m.loss or '-':<10} {m.targets or '-':<6} {m.summary}")
        if m.trains:
            hp = {k: getattr(m, k) for k in HPARAMS if k not in ("head", "loss")}
            hp.update(loss_constants(m.loss), **m.loss_args)
            typer.echo(
                " " * 15
                + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())
            )
            if m.candidates:  # what --select hold and weak choose among
                grid = " ".join(f"{k}={','.join(f'{x:g}' for x in v)}" for k, v in m.candidates.items())
                typer.echo(" " * 15 + f"candidates: {grid}")
    typer.echo(f"heads: {', '.join(HEADS)}")
    typer.echo(f"losses: {', '.join(LOSSES)}")


@command("train")
def train_cmd(
    method: Annotated[str, typer.Option("--method", help="A registered method (see `cpl-cache methods`).")],
    domain: DomainOpt,
    cache_dir: CacheDir,
    head: Annotated[
        str | None, typer.Option(help="Override the method's head: proto, linear or prompt.")
    ] = None,
    loss: Annotated[str | None, typer.Option(help="Override the loss (see `cpl-cache methods`).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and batch order, 0..2**32-1.")] = 0,
    epochs: Annotated[int | None, typer.Option(help="Passes over train (default: the method's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW step size (default: the method's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per step (default: the method's).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override any hyperparameter or loss constant, KEY=VALUE, repeatable "
            "(e.g. --set tau=4 --set min_steps=2000; see `cpl-cache methods`).",
        ),
    ] = None,
    select: SelectOpt = "hold",
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = "auto",
    out: Annotated[Path, typer.Option(help="Results folder; writes OUT/DOMAIN/METHOD-seedN.json.")] = Path(
        "results"
    ),
    progress: ProgressOpt = True,
) -> None:
    """Stage two: train a head on the cached embeddings and write the results JSON.

    Overrides that differ from the method's defaults join the run's name (e.g. cpl+loss=soft).
    """
    from cpl_cache.train.trainer import TrainConfig, run_training

    check_seed(seed)
    given = {"head": head, "loss": loss, "epochs": epochs, "lr": lr, "batch_size": batch_size}
    overrides = {**{k: v for k, v in given.items() if v is not None}, **_settings(set_)}
    cfg = TrainConfig(
        method=method, domain=domain, cache_dir=cache_dir, out=out, seed=seed, overrides=overrides,
        device=device, select=select, precision=precision,
    )  # fmt: skip
    r = run_training(cfg)
    m = r["metrics"]
    flags = f" [{'; '.join(r['flags'])}]" if r["flags"] else ""
    typer.echo(
        f"{r['domain']} {r['method']} seed {r['seed']}: test acc {100 * m['test_acc']:.2f}%, "
        f"weak agreement {100 * m['weak_agreement']:.2f}%, {r['steps']} steps in {r['seconds']:.2f}s "
        f"on {r['device']} -> {r['path']}{flags}"
    )


# ---------------------------------------------------------------------------------------------
# Pipelines and reports: run, table, plot
# ---------------------------------------------------------------------------------------------


@command("run")
def run_cmd(
    pipeline: GridArg,
    cache_dir: CacheDir,
    results: ResultsDir = Path("results"),
    device: DeviceOpt = "auto",
    domains: Annotated[str | None, typer.Option(help="Only these domains (comma list).")] = None,
    seeds: SeedsOpt = None,
    methods: Annotated[str | None, typer.Option(help="Only these methods (comma list).")] = None,
    progress: ProgressOpt = True,
    select: SelectOpt = "hold",
    precision: PrecisionOpt = "auto",
) -> None:
    """Train every cell (domain x method x seed) of a grid from the cache; cells with results are skipped."""
    from cpl_cache.pipeline import PipelineConfig, run_pipeline

    quiet_transformers_bars(progress)
    cfg = PipelineConfig(
        pipeline=pipeline, cache_dir=cache_dir, results=results, device=device,
        domains=_names(domains, "domains"), seeds=_seeds(seeds), methods=_names(methods, "methods"),
        progress=progress, select=select, precision=precision,
    )  # fmt: skip
    typer.echo(run_pipeline(cfg).line())


@command("bench-regret")
def bench_regret_cmd(
    caches: Annotated[
        str | None, typer.Option(help="Zoo caches (comma list; default: the whole zoo, see --half).")
    ] = None,
    half: Annotated[str | None, typer.Option(help="Only the zoo's tune or judge half.")] = None,
    out: Annotated[Path, typer.Option(help="The JSON report.")] = Path("bench-results/regret.json"),
    scale: Annotated[float, typer.Option(help="Row counts times this (small for a quick look).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the caches and the runs.")] = 0,
    progress: ProgressOpt = True,
) -> None:
    """Tuning regret: every Table 2 method on every zoo cache under hold, weak and none, against the best
    test accuracy of a broad sweep (a diagnostic, never used by a protocol); prints the table."""
    from cpl_cache.regret import RegretConfig, format_table, run_regret, summary_table
    from cpl_cache.synth.zoo import zoo_names

    check_seed(seed)
    if half is not None and half not in ("tune", "judge"):
        raise UserError(f"--half must be tune or judge, got {half!r}")
    if not scale > 0:
        raise UserError(f"--scale must be a number > 0, got {scale}")
    names = _names(caches, "caches") or tuple(zoo_names(half))
    report = run_regret(RegretConfig(caches=names, out=out, seed=seed, scale=scale, progress=progress))
    typer.echo(format_table(report) + "\n\n" + summary_table(report))
    typer.echo(f"bench-regret: {len(names)} cache(s) in {report['seconds']:.0f} s -> {out}")


@command("table")
def table_cmd(
    results: ResultsDir = Path("results"),
    format: Annotated[
        str, typer.Option("--format", help="Output format: markdown, csv or json.")
    ] = "markdown",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Table 2: accuracy per domain (mean ± std over seeds), the average, PGR; best weak-supervised marked.

    Warnings (e.g. cells from a stale cache) go to stderr, so stdout holds the table alone.
    """
    from cpl_cache.report import render_table_and_warnings

    text, warnings = render_table_and_warnings(results, format)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}")
    for warning in warnings:
        typer.echo(f"cpl-cache: warning: {warning}", err=True)


@command("plot")
def plot_cmd(
    domain: DomainOpt,
    out: Annotated[Path, typer.Option("--out", help="Image to write (.png, .pdf or .svg).")],
    results: ResultsDir = Path("results"),
    seed: Annotated[int, typer.Option(help="Which seed's runs to draw.")] = 0,
    methods: Annotated[
        str | None, typer.Option(help="Methods to draw (comma list); default auxconf-lp, auxconf-tp, cpl.")
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Figure 2: train and test accuracy against training step, with the weak and ceiling accuracies."""
    from cpl_cache.report import plot_curves

    path = plot_curves(results, domain, out, methods=_names(methods, "methods"), seed=seed)
    typer.echo(f"wrote {path}")
