"""Commands of the cache, synthetic data and stage one: info, synth-cache, synth, extract, train-weak."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cpl_cache.cli.app import command
from cpl_cache.cli.options import (
    CacheDir,
    DeviceOpt,
    DomainOpt,
    FollowSymlinksOpt,
    ProgressOpt,
    SplitSeedOpt,
)
from cpl_cache.errors import UserError
from cpl_cache.runtime import check_seed, quiet_transformers_bars
from cpl_cache.synth.models import PretrainConfig  # torch-free: its default step count is in --help


@command("info")
def info_cmd(
    cache_dir: CacheDir,
    domain: Annotated[str | None, typer.Option("--domain", help="Only this domain.")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Print models, row counts per split, dimensions and size on disk of cached domains."""
    from cpl_cache.cache import describe

    typer.echo(describe(cache_dir, domain))


SEPARABLE = 2.0  # synth-cache warns when LDA from ground truth is below this many times chance


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
    progress: ProgressOpt = True,
) -> None:
    """Write a planted feature cache in schema 1 (no images): for benchmarks and tests of stage two."""
    from cpl_cache.synth.planted import PlantedConfig, separability, write_planted_cache

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
    floor, chance = separability(cache_dir, domain)
    if floor < SEPARABLE * chance:  # a cache where even a ground-truth ceiling would be near chance
        typer.echo(
            f"cpl-cache: warning: the strong features of {domain} barely separate its classes (LDA "
            f"from ground truth: {floor:.1%} on test, chance {chance:.1%}): even a ceiling will "
            "be near chance; give more train rows or dimensions",
            err=True,
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
    progress: ProgressOpt = True,
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
    progress: ProgressOpt = True,
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
    progress: ProgressOpt = True,
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
