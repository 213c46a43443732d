"""Commands that run the whole pipeline: reproduce (images to table) and demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cpl_cache.cli.app import command
from cpl_cache.cli.options import (
    CacheDir,
    DeviceOpt,
    GridArg,
    PrecisionOpt,
    ProgressOpt,
    SeedsOpt,
    SelectOpt,
    _seeds,
)
from cpl_cache.runtime import quiet_transformers_bars
from cpl_cache.synth.models import PretrainConfig  # torch-free: its default step count is in --help

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
    progress: ProgressOpt = True,
) -> None:
    """Images to table: train-weak and extract where missing, then the grid, the table and the plots."""
    from cpl_cache.reproduce import ReproduceConfig, reproduce

    quiet_transformers_bars(progress)  # off where stderr is no terminal
    cfg = ReproduceConfig(
        pipeline=pipeline, data_root=data_root, strong=strong, weak_model=weak_model, weak_dir=weak_dir,
        cache_dir=cache_dir, results=results, dataset=dataset, device=device, seeds=_seeds(seeds),
        select=select, precision=precision, progress=progress,
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
    progress: ProgressOpt = True,
) -> None:
    """The whole pipeline on synthetic DomainNet-layout images and tiny models: offline, minutes on a CPU."""
    import torch

    from cpl_cache.pipeline import load_grid
    from cpl_cache.reproduce import ReproduceConfig, reproduce

    # Every network here is tiny: one thread is as fast as several on an idle CPU, and many times
    # faster on a busy one, where threads of small ops wait on each other.
    torch.set_num_threads(1)
    quiet_transformers_bars(progress)  # off where stderr is no terminal
    load_grid(pipeline)  # a bad grid fails before minutes of synthesis, not after
    if not (out / "models" / "resnet-tiny" / "preprocessor_config.json").is_file():  # synth's last file
        from cpl_cache.synth.images import ImageSetConfig, synthesize

        if progress:
            typer.echo("demo: synthetic images and a tiny CLIP pretrained on images of its own ...", err=True)
        synthesize(
            out,
            ImageSetConfig(classes=DEMO_CLASSES, per_class=DEMO_PER_CLASS),
            PretrainConfig(),
            progress=progress,
        )
    cfg = ReproduceConfig(
        pipeline=pipeline, data_root=out / "domainnet", strong=str(out / "models" / "clip-tiny"),
        weak_model=str(out / "models" / "resnet-tiny"), weak_dir=out / "weak", cache_dir=out / "cache",
        results=out / "results", device=device, weak_epochs=DEMO_WEAK_EPOCHS, weak_batch_size=DEMO_WEAK_BATCH,
        weak_workers=DEMO_WEAK_WORKERS, select=select, precision=precision, progress=progress,
    )  # fmt: skip
    res = reproduce(cfg)
    typer.echo(res["table"])
    typer.echo(
        f"demo: synthetic images and tiny models, not DomainNet; table {res['table_path']}, "
        f"plots {', '.join(map(str, res['plots'])) or 'none'} ({res['seconds']:.0f} s)"
    )
