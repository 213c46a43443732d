"""cpl-cache command line: thin typer commands that parse, build a config, call a stage, print one line.

Examples:
    cpl-cache synth demo/data
    cpl-cache extract --domain quickdraw --data-root data/domainnet --weak ckpt/quickdraw --cache-dir cache
    cpl-cache train --method cpl --domain quickdraw --cache-dir cache
    cpl-cache info --cache-dir cache

torch and transformers are imported inside the commands, so `cpl-cache --help` is instant.
"""

from __future__ import annotations

import functools
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cpl_cache.errors import UserError
from cpl_cache.runtime import check_seed, quiet_transformers_bars
from cpl_cache.synth.models import PretrainConfig  # torch-free: its default step count is in --help

app = typer.Typer(
    help="Weak-to-strong generalization for CLIP from a feature cache (class prototype learning).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def command(name: str | None = None):
    """Register a command whose UserError (or OSError on a path) ends as one line on stderr, exit 2."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                typer.echo(f"cpl-cache: error: {err}", err=True)
                raise typer.Exit(2) from None
            except OSError as err:  # an unwritable or vanished path the user gave: same one line
                where = f" ({err.filename})" if err.filename else ""
                typer.echo(
                    f"cpl-cache: error: {err.strerror or err}{where}; check that the path exists and is "
                    "writable, or pass another one",
                    err=True,
                )
                raise typer.Exit(2) from None

        app.command(name)(wrapped)
        return fn

    return deco


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as err:  # raised outside a command (should not happen, but never show a traceback)
        typer.echo(f"cpl-cache: error: {err}", err=True)
        sys.exit(2)


CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Root folder of the feature cache.")]
DomainOpt = Annotated[str, typer.Option("--domain", help="Domain name, e.g. quickdraw.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
GridArg = Annotated[Path, typer.Argument(help="Grid file, e.g. pipelines/table2.toml.")]
SeedsOpt = Annotated[str | None, typer.Option(help="Only these seeds (comma list), e.g. 0.")]
SplitSeedOpt = Annotated[int, typer.Option("--split-seed", help="Seed of the hold/test split.")]


# ---------------------------------------------------------------------------------------------
# Foundation: the cache and synthetic data
# ---------------------------------------------------------------------------------------------


@command("info")
def info_cmd(
    cache_dir: CacheDir,
    domain: Annotated[str | None, typer.Option("--domain", help="Only this domain.")] = None,
) -> None:
    """Print models, row counts per split, dimensions and size on disk of cached domains."""
    from cpl_cache.cache import describe

    typer.echo(describe(cache_dir, domain))


@command("synth-cache")
def synth_cache_cmd(
    cache_dir: CacheDir,
    domain: DomainOpt = "quickdraw",
    train: Annotated[int, typer.Option(help="Rows in the train split.")] = 2000,
    test: Annotated[int, typer.Option(help="Rows in the test split.")] = 500,
    hold: Annotated[int | None, typer.Option(help="Rows in the hold split (default: as test).")] = None,
    dim: Annotated[int, typer.Option(help="Embedding dimension D.")] = 512,
    classes: Annotated[int, typer.Option(help="Number of classes K.")] = 345,
    weak_acc: Annotated[float, typer.Option(help="Accuracy of the planted weak supervisor.")] = 0.6,
    seed: Annotated[int, typer.Option(help="Seed of everything planted.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Rows per shard.")] = 50_000,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache of this domain.")] = False,
) -> None:
    """Write a planted feature cache in schema 1 (no images): for benchmarks and tests of stage two."""
    from cpl_cache.synth.planted import PlantedConfig, write_planted_cache

    check_seed(seed)
    cfg = PlantedConfig(
        domain=domain,
        n_train=train,
        n_hold=test if hold is None else hold,
        n_test=test,
        dim=dim,
        classes=classes,
        weak_acc=weak_acc,
        seed=seed,
        shard_size=shard_size,
    )
    stats = write_planted_cache(cache_dir, cfg, overwrite=overwrite)
    typer.echo(
        f"planted {domain}: {stats['rows']} rows in {stats['shards']} shard(s) under {cache_dir / domain}; "
        f"weak acc {stats['weak_acc']:.3f}"
    )


# ---------------------------------------------------------------------------------------------
# Synthetic images and tiny checkpoints (synth)
# ---------------------------------------------------------------------------------------------


@command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to write: OUT/domainnet (data root) and OUT/models.")],
    classes: Annotated[int, typer.Option(help="Number of classes K.")] = 10,
    per_class: Annotated[int, typer.Option(help="Images per class in each domain.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of images, label order and weights.")] = 0,
    pretrain_steps: Annotated[
        int,
        typer.Option(help="Steps of contrastive pretraining of the tiny CLIP (0: random weights)."),
    ] = PretrainConfig.steps,
    progress: Annotated[
        bool, typer.Option(help="Show progress: the images, then the CLIP's pretraining steps.")
    ] = True,
) -> None:
    """Write a small DomainNet-layout image set and tiny CLIP and ResNet checkpoints, offline.

    The CLIP is pretrained for a minute or two on synthetic image-caption pairs of its own, so that
    zero-shot works above chance; `--pretrain-steps 0` keeps its random weights.
    """
    from dataclasses import replace

    from cpl_cache.synth.images import ImageSetConfig, synthesize

    if classes < 2 or per_class < 2:
        raise UserError(
            "synth needs --classes >= 2 and --per-class >= 2 (each class needs train and test images)"
        )
    if any(out.joinpath(name).exists() for name in ("domainnet", "models")):
        raise UserError(f"{out} already holds synthetic data; pick an empty folder or remove it first")
    if pretrain_steps < 0:
        raise UserError(f"--pretrain-steps must be 0 or more, got {pretrain_steps}")
    check_seed(seed)
    quiet_transformers_bars(progress)
    pretrain = replace(PretrainConfig(), steps=pretrain_steps)
    images = ImageSetConfig(classes=classes, per_class=per_class, seed=seed)
    made = synthesize(out, images, pretrain if pretrain.steps else None, progress=progress)
    n = sum(c["train"] + c["test"] for c in made["counts"].values())
    typer.echo(
        f"wrote {n} images of {classes} classes in {len(made['counts'])} domains under {made['root']}; "
        f"strong {made['strong']}, weak {made['weak']}"
    )


# ---------------------------------------------------------------------------------------------
# Stage one: extract
# ---------------------------------------------------------------------------------------------


class OnBadImage(str, Enum):
    error = "error"
    skip = "skip"


class Resize(str, Enum):
    pil = "pil"
    torch = "torch"


class ResizeOn(str, Enum):
    auto = "auto"
    workers = "workers"
    device = "device"


FollowSymlinksOpt = Annotated[
    bool,
    typer.Option(
        "--follow-symlinks", help="Read images through symbolic links that lead out of --data-root."
    ),
]


@command("extract")
def extract_cmd(
    domain: DomainOpt,
    data_root: Annotated[Path, typer.Option("--data-root", help="Dataset root (see --dataset).")],
    weak: Annotated[str, typer.Option("--weak", help="Weak checkpoint for this domain: folder or model id.")],
    cache_dir: CacheDir,
    strong: Annotated[
        str, typer.Option("--strong", help="CLIP checkpoint: model id or folder.")
    ] = "openai/clip-vit-base-patch32",
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset layout of --data-root.")] = "domainnet",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 256,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Decoding processes (default: min(cores, 16) per rank).")
    ] = None,
    device: DeviceOpt = "auto",
    shard_size: Annotated[int, typer.Option("--shard-size", help="Rows per shard (resume unit).")] = 10_000,
    hold_frac: Annotated[float, typer.Option("--hold-frac", help="Share of the test list in hold.")] = 0.5,
    split_seed: SplitSeedOpt = 0,
    on_bad_image: Annotated[
        OnBadImage, typer.Option("--on-bad-image", help="error: stop at an unreadable image; skip: note it.")
    ] = OnBadImage.error,
    resize: Annotated[
        Resize,
        typer.Option("--resize", help="pil: the processors' exact pixels; torch: ~4x faster, ±1 level."),
    ] = Resize.pil,
    resize_on: Annotated[
        ResizeOn,
        typer.Option(
            "--resize-on",
            help="Where PIL resizes run: workers (CPU), device (same pixels, batched on the GPU; workers "
            "only decode), auto: device on CUDA.",
        ),
    ] = ResizeOn.auto,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--no-overwrite", help="Start this domain over.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    follow_symlinks: FollowSymlinksOpt = False,
) -> None:
    """Stage one: CLIP image embeddings and weak logits of every image into HDF5 shards (resumable).

    Multi-GPU: `torchrun --nproc_per_node N -m cpl_cache extract ...` (each rank its own share).
    """
    from cpl_cache.extract import ExtractConfig, run_extract

    quiet_transformers_bars(progress)
    cfg = ExtractConfig(
        domain=domain,
        data_root=data_root,
        weak=weak,
        cache_dir=cache_dir,
        strong=strong,
        dataset=dataset,
        batch_size=batch_size,
        workers=workers,
        device=device,
        shard_size=shard_size,
        hold_frac=hold_frac,
        split_seed=split_seed,
        on_bad_image=on_bad_image.value,
        resize=resize.value,
        resize_on=resize_on.value,
        overwrite=overwrite,
        progress=progress,
        follow_symlinks=follow_symlinks,
    )
    r = run_extract(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(
            f"{domain}: {r['rows']} rows in {r['shards']} shard(s) under {r['cache']} "
            f"({r['new_rows']} new, {r['skipped']} skipped) in {r['seconds']:.1f}s on {r['device']}"
        )


# ---------------------------------------------------------------------------------------------
# Weak supervisor: train-weak
# ---------------------------------------------------------------------------------------------


@command("train-weak")
def train_weak_cmd(
    domain: DomainOpt,
    data_root: Annotated[Path, typer.Option("--data-root", help="Dataset root, laid out as --dataset says.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the fine-tuned checkpoint.")],
    model: Annotated[
        str, typer.Option("--model", help="AutoModelForImageClassification hub id or local folder.")
    ] = "microsoft/resnet-18",
    dataset: Annotated[
        str, typer.Option("--dataset", help="Layout of --data-root: domainnet, officehome or folder.")
    ] = "domainnet",
    epochs: Annotated[int, typer.Option(help="Passes over the hold split.")] = 10,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warmup, then cosine to zero).")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    device: DeviceOpt = "auto",
    hold_frac: Annotated[
        float, typer.Option(help="Share of hold in the images outside train (DomainNet: the test list).")
    ] = 0.5,
    split_seed: SplitSeedOpt = 0,
    seed: Annotated[int, typer.Option(help="Seed of the new head, batch order and augmentation.")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes that decode images.")] = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace a checkpoint already in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar per epoch.")] = True,
    follow_symlinks: FollowSymlinksOpt = False,
) -> None:
    """Fine-tune an image classifier on the hold split (ground truth) as the weak supervisor."""
    from cpl_cache.weak import WeakConfig, train_weak

    check_seed(seed)
    cfg = WeakConfig(
        domain=domain, data_root=data_root, out=out, model=model, dataset=dataset, epochs=epochs, lr=lr,
        batch_size=batch_size, device=device, hold_frac=hold_frac, split_seed=split_seed, seed=seed,
        workers=workers, overwrite=overwrite, progress=progress, follow_symlinks=follow_symlinks,
    )  # fmt: skip
    record = train_weak(cfg)
    skipped = f"; skipped {len(record['unreadable'])} unreadable image(s)" if record["unreadable"] else ""
    typer.echo(
        f"weak model for {domain}: test acc {record['test_acc']:.4f} after {epochs} epoch(s) "
        f"in {record['seconds']:.1f}s on {record['device']}; saved to {out}{skipped}"
    )


# ---------------------------------------------------------------------------------------------
# Stage two: methods, train
# ---------------------------------------------------------------------------------------------


@command("methods")
def methods_cmd() -> None:
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


SelectOpt = Annotated[
    str,
    typer.Option(
        "--select",
        help="How each trained cell's step size (and other declared candidates) and stopping point are "
        "chosen: hold (accuracy on the hold rows' ground truth, every candidate at every checkpoint), "
        "weak (agreement with the weak labels of 10% of train held out) or none (the registry's fixed "
        "values). Test rows are never read before the choice.",
    ),
]


PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Stage two's matrix products: auto (bfloat16 where the device computes it natively: a CPU "
        "with AVX512-BF16 or AMX, a CUDA GPU; float32 elsewhere), bf16 or fp32. Weights, losses and the "
        "optimiser stay float32; every result records which was used.",
    ),
]


def _settings(pairs: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs as a dict; values read as TOML scalars (4, 0.5, "x"), else as text."""
    from cpl_cache.pipeline import _toml_loads

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {pair!r} must be KEY=VALUE, e.g. --set tau=4 (see `cpl-cache methods`)")
        try:
            value = _toml_loads(f"v = {text.strip()}")["v"]
        except ValueError:
            value = text.strip()
        out[key.strip()] = value
    return out


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


def _names(text: str | None, what: str) -> tuple[str, ...] | None:
    """A comma list from the command line (`a,b`), or None when not given."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"--{what} is empty; give a comma list such as --{what} a,b")
    return names


def _seeds(text: str | None) -> tuple[int, ...] | None:
    names = _names(text, "seeds")
    if names is None:
        return None
    try:
        seeds = tuple(int(n) for n in names)
    except ValueError:
        raise UserError(f"--seeds {text!r} must be a comma list of integers, e.g. --seeds 0,1,2") from None
    for s in seeds:
        check_seed(s, "--seeds")
    return seeds


ResultsDir = Annotated[
    Path, typer.Option("--results", help="Folder of results: {domain}/{method}-seed{seed}.json.")
]


@command("run")
def run_cmd(
    pipeline: GridArg,
    cache_dir: CacheDir,
    results: ResultsDir = Path("results"),
    device: DeviceOpt = "auto",
    domains: Annotated[str | None, typer.Option(help="Only these domains (comma list).")] = None,
    seeds: SeedsOpt = None,
    methods: Annotated[str | None, typer.Option(help="Only these methods (comma list).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over the cells.")] = True,
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
    report = run_regret(RegretConfig(caches=names, out=out, seed=seed, scale=scale))
    typer.echo(format_table(report) + "\n\n" + summary_table(report))
    typer.echo(f"bench-regret: {len(names)} cache(s) in {report['seconds']:.0f} s -> {out}")


@command("table")
def table_cmd(
    results: ResultsDir = Path("results"),
    format: Annotated[
        str, typer.Option("--format", help="Output format: markdown, csv or json.")
    ] = "markdown",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
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
) -> None:
    """Figure 2: train and test accuracy against training step, with the weak and ceiling accuracies."""
    from cpl_cache.report import plot_curves

    path = plot_curves(results, domain, out, methods=_names(methods, "methods"), seed=seed)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Reproduction: reproduce, demo
# ---------------------------------------------------------------------------------------------

DEMO_CLASSES = 10
DEMO_PER_CLASS = 50  # per class and domain: 30 train, 10 hold, 10 test images
DEMO_WEAK_EPOCHS = 40  # the tiny ResNet starts from random weights: enough epochs to land between
DEMO_WEAK_BATCH = 16  # chance and the strong ceiling on 100 hold images
DEMO_WEAK_WORKERS = 0  # 100 small images an epoch: starting loader processes each epoch costs more


@command("reproduce")
def reproduce_cmd(
    pipeline: GridArg = Path("pipelines/table2.toml"),
    data_root: Annotated[Path, typer.Option(help="Dataset root, laid out as --dataset says.")] = Path(
        "data/domainnet"
    ),
    dataset: Annotated[
        str | None,
        typer.Option(help="domainnet, officehome or folder (default: the grid's `dataset`, else domainnet)."),
    ] = None,
    strong: Annotated[str, typer.Option(help="CLIP checkpoint id or path.")] = "openai/clip-vit-base-patch32",
    weak_model: Annotated[
        str, typer.Option(help="Image classifier id or path that train-weak fine-tunes per domain.")
    ] = "microsoft/resnet-18",
    weak_dir: Annotated[
        Path, typer.Option(help="Fine-tuned weak checkpoints, one folder per domain.")
    ] = Path("checkpoints/weak"),
    cache_dir: CacheDir = Path("cache"),
    results: Annotated[Path, typer.Option(help="Results folder (table and plots go here too).")] = Path(
        "results"
    ),
    device: DeviceOpt = "auto",
    seeds: SeedsOpt = None,
    select: SelectOpt = "hold",
    precision: PrecisionOpt = "auto",
) -> None:
    """Images to table: train-weak and extract where missing, then the grid, the table and the plots."""
    from cpl_cache.reproduce import ReproduceConfig, reproduce

    quiet_transformers_bars(True)  # off where stderr is no terminal
    cfg = ReproduceConfig(
        pipeline=pipeline, data_root=data_root, strong=strong, weak_model=weak_model, weak_dir=weak_dir,
        cache_dir=cache_dir, results=results, dataset=dataset, device=device, seeds=_seeds(seeds),
        select=select, precision=precision,
    )  # fmt: skip
    out = reproduce(cfg)
    typer.echo(out["table"])
    typer.echo(f"table: {out['table_path']}; plots: {', '.join(map(str, out['plots'])) or 'none'}")


@command("demo")
def demo_cmd(
    out: Annotated[
        Path, typer.Option(help="Folder for the synthetic data, checkpoints, cache and results.")
    ] = Path("demo"),
    pipeline: Annotated[
        Path, typer.Option(help="Grid file (the demo's: Table 2's grid with enough steps for ~300 rows).")
    ] = Path("pipelines/demo.toml"),
    device: DeviceOpt = "cpu",
    select: SelectOpt = "hold",
    precision: PrecisionOpt = "auto",
) -> None:
    """The whole pipeline on synthetic DomainNet-layout images and tiny models: offline, minutes on a CPU."""
    import torch

    from cpl_cache.pipeline import load_grid
    from cpl_cache.reproduce import ReproduceConfig, reproduce

    # Every network here is tiny: one thread is as fast as several on an idle CPU, and many times
    # faster on a busy one, where threads of small ops wait on each other.
    torch.set_num_threads(1)
    quiet_transformers_bars(True)  # off where stderr is no terminal
    load_grid(pipeline)  # a bad grid fails before minutes of synthesis, not after
    if not (out / "models" / "resnet-tiny" / "preprocessor_config.json").is_file():  # synth's last file
        from cpl_cache.synth.images import ImageSetConfig, synthesize

        typer.echo("demo: synthetic images and a tiny CLIP pretrained on images of its own ...", err=True)
        synthesize(
            out,
            ImageSetConfig(classes=DEMO_CLASSES, per_class=DEMO_PER_CLASS),
            PretrainConfig(),
            progress=True,
        )
    cfg = ReproduceConfig(
        pipeline=pipeline, data_root=out / "domainnet", strong=str(out / "models" / "clip-tiny"),
        weak_model=str(out / "models" / "resnet-tiny"), weak_dir=out / "weak", cache_dir=out / "cache",
        results=out / "results", device=device, weak_epochs=DEMO_WEAK_EPOCHS, weak_batch_size=DEMO_WEAK_BATCH,
        weak_workers=DEMO_WEAK_WORKERS, select=select, precision=precision,
    )  # fmt: skip
    res = reproduce(cfg)
    typer.echo(res["table"])
    typer.echo(
        f"demo: synthetic images and tiny models, not DomainNet; table {res['table_path']}, "
        f"plots {', '.join(map(str, res['plots'])) or 'none'} ({res['seconds']:.0f} s)"
    )


# `cpl-cache --help` lists the commands in the order a user meets them, not the order of this file.
COMMAND_ORDER = (
    "synth", "train-weak", "extract", "info", "methods", "train", "run", "table", "plot", "reproduce", "demo",
    "synth-cache", "bench-regret",
)  # fmt: skip
app.registered_commands.sort(
    key=lambda c: COMMAND_ORDER.index(c.name) if c.name in COMMAND_ORDER else len(COMMAND_ORDER)
)
