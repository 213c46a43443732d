"""Stage one, start to end: checks, cache identity, the decode -> both models -> shards loop, resume.

Order matters for failing early and for a safe fork: the lists, the files and the weak
checkpoint's labels are checked first (seconds); then the processors load and the DataLoader
workers start (forked before any model weights or CUDA context exist in the parent), so images
decode while the models load; then the loop runs.

With several processes (`torchrun --nproc_per_node N -m cpl_cache extract ...`) each rank takes a
contiguous share of the rows and writes its own shards; rank 0 writes the manifest once all are done.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from cpl_cache.cache import SPLIT_CODES, TEXT_FILE, domain_dir, new_manifest, read_manifest, write_text
from cpl_cache.errors import UserError
from cpl_cache.extract.reader import RESIZE_BACKENDS, RESIZE_PLACES

ON_BAD_IMAGE = ("error", "skip")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything one extraction needs; built by the command, passed down unchanged."""

    domain: str
    data_root: Path
    weak: str
    cache_dir: Path
    strong: str = "openai/clip-vit-base-patch32"
    dataset: str = "domainnet"
    batch_size: int = 256
    workers: int | None = None  # None: min(CPU cores per process, 16)
    device: str = "auto"
    shard_size: int = 10_000
    hold_frac: float = 0.5
    split_seed: int = 0
    on_bad_image: str = "error"
    resize: str = "pil"  # "torch": faster resizes within one intensity level of the processor's
    resize_on: str = "auto"  # where PIL's resizes run: "workers", "device", or "auto" (the device on CUDA)
    overwrite: bool = False
    progress: bool = True
    follow_symlinks: bool = False  # read images through symbolic links that leave the data root

    def __post_init__(self) -> None:
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise UserError(
                f"--on-bad-image must be one of {', '.join(ON_BAD_IMAGE)}, got {self.on_bad_image!r}"
            )
        if self.resize not in RESIZE_BACKENDS:
            raise UserError(f"--resize must be one of {', '.join(RESIZE_BACKENDS)}, got {self.resize!r}")
        if self.resize_on not in RESIZE_PLACES:
            raise UserError(f"--resize-on must be one of {', '.join(RESIZE_PLACES)}, got {self.resize_on!r}")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {self.workers}")


@dataclass
class Dist:
    """This process's place among the ranks; torch.distributed is set up only when WORLD_SIZE > 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    _pg: Any = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        # Only barriers cross ranks, so gloo serves CPU and GPU runs alike. Ranks may finish far
        # apart on large domains; torchrun ends the whole group if one rank fails.
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=12))
        return cls(
            rank=dist.get_rank(),
            world=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
            _pg=dist,
        )

    def barrier(self) -> None:
        if self._pg is not None:
            self._pg.barrier()

    def total(self, value: int) -> int:
        """Sum of `value` over the ranks (the rows each rank extracted, for the summary line)."""
        if self._pg is None:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.int64)
        self._pg.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self._pg is not None and self._pg.is_initialized():
            self._pg.destroy_process_group()


def default_workers(local_world: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 16) // max(1, local_world))


def _say(dist: Dist, msg: str) -> None:
    if dist.rank == 0:
        print(msg, file=sys.stderr, flush=True)


def run_extract(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract one domain into `cfg.cache_dir/cfg.domain`, resuming a run made the same way."""
    dist = Dist.from_env()
    try:
        with contextlib.ExitStack() as held:  # the domain's lock, once rank 0 takes it
            return _run(cfg, dist, held)
    finally:
        dist.close()


def _run(cfg: ExtractConfig, dist: Dist, held: contextlib.ExitStack) -> dict[str, Any]:
    import torch

    from cpl_cache.datasets import load_dataset, prompt_for
    from cpl_cache.extract import mapper, reader, writer
    from cpl_cache.runtime import resolve_device

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)  # a device that is not there fails before anything is read or written
    images = load_dataset(
        cfg.dataset, Path(cfg.data_root), cfg.domain, hold_frac=cfg.hold_frac, split_seed=cfg.split_seed
    )
    known_bad = reader.check_before_models(images, cfg.on_bad_image, follow_symlinks=cfg.follow_symlinks)
    if known_bad:
        _say(dist, f"cpl-cache: {len(known_bad)} listed image(s) missing or empty; they will be skipped")

    strong_cfg = mapper.load_config("strong", cfg.strong)
    if not hasattr(strong_cfg, "projection_dim") or not hasattr(strong_cfg, "text_config"):
        raise UserError(
            f"strong checkpoint {cfg.strong} is a {type(strong_cfg).__name__}, not a CLIP model; "
            "pass a CLIPModel id or folder"
        )
    weak_cfg = mapper.load_config("weak", cfg.weak)
    mapper.check_weak_classes(weak_cfg, images.classes, cfg.weak, cfg.domain)
    if Path(cfg.weak).is_dir():
        from cpl_cache.weak import check_split_record

        check_split_record(Path(cfg.weak), images)

    processors = (
        mapper.load_image_processor("strong", cfg.strong),
        mapper.load_image_processor("weak", cfg.weak),
    )
    plans = mapper.plans_for(*processors, resize=cfg.resize, resize_on=cfg.resize_on, device=device)

    dim, k = int(strong_cfg.projection_dim), len(images.classes)
    counts = {name: int(np.count_nonzero(images.split == code)) for name, code in SPLIT_CODES.items()}
    fresh = new_manifest(
        domain=cfg.domain,
        classes=list(images.classes),
        dim=dim,
        strong=mapper.model_identity(cfg.strong, strong_cfg),
        weak=mapper.model_identity(cfg.weak, weak_cfg),
        split={"hold_frac": images.hold_frac, "seed": images.split_seed, "hold_hash": images.hold_hash()},
        counts=counts,
        dataset=images.dataset,
        preprocessing={"strong": plans[0].describe(), "weak": plans[1].describe()},
        layout={"world_size": dist.world, "shard_size": cfg.shard_size},
    )
    ddir = domain_dir(cfg.cache_dir, cfg.domain)
    ddir.mkdir(parents=True, exist_ok=True)
    # --overwrite builds the new cache in a folder of its own: the old one stays until it is done.
    wdir = writer.staging_dir(ddir) if cfg.overwrite else ddir
    if dist.rank == 0:
        held.enter_context(writer.domain_lock(ddir))
        wdir.mkdir(exist_ok=True)
        manifest = writer.open_cache(wdir, fresh, overwrite=cfg.overwrite, is_writer=True)
    dist.barrier()
    if dist.rank != 0:
        manifest = writer.open_cache(wdir, fresh, overwrite=False, is_writer=False)
    if manifest["complete"]:
        if wdir == ddir:
            _say(dist, f"cpl-cache: {ddir} is already complete; pass --overwrite to extract it again")
            staged = writer.staging_dir(ddir)
            if staged.is_dir():
                _say(
                    dist,
                    f"cpl-cache: {staged} holds an unfinished --overwrite run; "
                    "rerun with --overwrite to finish it, or remove that folder",
                )
        elif dist.rank == 0:
            writer.promote(wdir, ddir)  # an --overwrite run stopped after finishing, before the swap
        return _summary(manifest, ddir, 0, time.perf_counter() - t0, device)

    start, stop = reader.rank_share(len(images), dist.rank, dist.world)
    all_ranges = dict(enumerate(reader.shard_ranges(start, stop, cfg.shard_size)))
    done = writer.done_shards(wdir, manifest, dist.rank, dist.world)
    todo = {n: r for n, r in all_ranges.items() if n not in done}
    specs = reader.batch_specs(todo, cfg.batch_size)

    workers = default_workers(dist.local_world) if cfg.workers is None else cfg.workers
    workers = min(workers, len(specs))
    dataset = reader.DecodedBatches(images, specs, plans, processors, known_bad)
    batches = iter(reader.loader(dataset, workers, device)) if specs else iter(())

    if torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    models = mapper.Mapper(cfg.strong, cfg.weak, plans, device)
    if dist.rank == 0 and (not (wdir / TEXT_FILE).is_file() or not done):
        prompts = [prompt_for(c) for c in images.classes]
        text, scale, token_ids, prefix_len = models.text(prompts)
        write_text(wdir, text, prompts, scale, token_ids=token_ids, prefix_len=prefix_len)

    sink = writer.ShardSink(
        wdir,
        manifest,
        rank=dist.rank,
        world=dist.world,
        ranges=all_ranges,
        dim=dim,
        num_classes=k,
        labels=images.labels,
        split=images.split,
        paths=images.paths,
    )
    n_todo = sum(b - a for a, b in todo.values())
    rows_done = rows_new = 0  # rows decoded (skipped ones too), rows written
    bar = None
    if cfg.progress and dist.rank == 0:
        from cpl_cache.runtime import progress

        desc = f"extract {cfg.domain}" + (f" (rank 0 of {dist.world})" if dist.world > 1 else "")
        bar = progress(total=n_todo, desc=desc, unit="img", unit_scale=True, smoothing=0.1, file=sys.stderr)
    t_loop = time.perf_counter()
    timeline: list[tuple[float, int]] = []  # (seconds into the loop, rows done) after each batch
    try:
        for batch in batches:
            for row, reason in batch["failed"]:
                if cfg.on_bad_image == "error":
                    raise UserError(
                        f"cannot decode {images.root / images.paths[row]} ({reason}); fix or remove it, "
                        "or pass --on-bad-image skip to leave such images out (finished shards are kept)"
                    )
                sink.skip(row, reason)
            rows = batch["rows"].numpy()
            if len(rows):
                embeds, logits = models(batch)
                sink.add(batch["shard"], rows, embeds, logits)
                rows_new += len(rows)
            if batch["last"]:
                sink.close_shard(batch["shard"])
            n = batch["stop"] - batch["start"]
            rows_done += n
            timeline.append((time.perf_counter() - t_loop, rows_done))
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
        del batches  # shuts the workers down, also on an error
    loop_s = time.perf_counter() - t_loop

    dist.barrier()
    if dist.rank == 0:
        expected = {
            r: len(reader.shard_ranges(*reader.rank_share(len(images), r, dist.world), cfg.shard_size))
            for r in range(dist.world)
        }
        manifest = writer.finish(wdir, manifest, dist.world, expected)
        if wdir != ddir:
            writer.promote(wdir, ddir)
    dist.barrier()
    if dist.rank != 0:
        manifest = read_manifest(cfg.cache_dir, cfg.domain)
    summary = _summary(manifest, ddir, dist.total(rows_new), time.perf_counter() - t0, device)
    summary.update(loop_seconds=loop_s, write_seconds=sink.write_seconds, timeline=timeline)
    return summary


def _summary(
    manifest: dict[str, Any], ddir: Path, new_rows: int, seconds: float, device: str
) -> dict[str, Any]:
    return {
        "cache": str(ddir),
        "rows": int(manifest.get("rows", sum(int(s["rows"]) for s in manifest.get("shards", [])))),
        "new_rows": new_rows,
        "shards": len(manifest.get("shards", [])),
        "skipped": len(manifest.get("skipped", [])),
        "seconds": seconds,
        "device": device,
    }
