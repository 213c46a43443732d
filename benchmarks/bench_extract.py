"""Stage-one benchmark: decode + both preprocessings, both forward passes, and the whole extract, in one run.

    python benchmarks/bench_extract.py                                   # small, CPU: tiny models
    python benchmarks/bench_extract.py --images 40000 --strong-size vit-b32 --weak-size resnet18  # GPU

Writes bench-results/extract.json. Images are synthetic JPEGs of DomainNet-like sizes (300-600 px a
side); models have random weights (speed does not depend on them) but real preprocessing (CLIP 224,
ResNet 256 -> crop 224). Rates are images per second over the second half of each run's rows, so
start-up (forking workers, their first prefetched batches while the models load) counts for none of
the three. Goals: the whole extract at >= 85% of the slower part, HDF5 writing <= 5% of its time,
one decode per image; on a CUDA GPU with vit-b32 + resnet18, >= 5000 images/s end to end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = 345
PUBLISHED_CLIP_RETRIEVAL_A100 = 2500  # images/s per GPU for ViT-B/32 inference, as clip-retrieval reports


def _image(seed: int, min_size: int, max_size: int) -> bytes:
    """A photo-like JPEG: smooth colour fields, edges and grain (decodes like a natural image, not noise)."""
    import io

    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = (int(x) for x in rng.integers(min_size, max_size + 1, 2))
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    d = ImageDraw.Draw(base)
    for _ in range(6):
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(10, min(w, h) // 3))
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    base = base.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(base).astype(np.int16) + rng.integers(-8, 9, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_images(root: Path, n: int, unique: int, min_size: int, max_size: int, procs: int) -> list[str]:
    """`n` files under root/real/CLASS/ with DomainNet-style lists; `unique` distinct JPEGs, reused."""
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        blobs = pool.starmap(_image, [(i, min_size, max_size) for i in range(unique)])
    classes = [f"class_{c:03d}" for c in range(min(CLASSES, n))]  # every label must appear in the lists
    lines = []
    for i in range(n):
        label = i % len(classes)
        rel = f"real/{classes[label]}/real_{i:07d}.jpg"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blobs[i % unique])
        lines.append(f"{rel} {label}\n")
    cut = int(n * 0.7)
    (root / "real_train.txt").write_text("".join(lines[:cut]))
    (root / "real_test.txt").write_text("".join(lines[cut:]))
    return classes


def write_models(out: Path, classes: list[str], strong_size: str, weak_size: str) -> tuple[str, str]:
    """Random-weight checkpoints with the real image sizes; the text tower is kept tiny (345 prompts)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTokenizer,
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
    )

    torch.manual_seed(0)
    from cpl_cache.synth.models import _byte_vocab

    vocab = _byte_vocab()
    text = dict(
        vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    )  # fmt: skip
    if strong_size == "vit-b32":
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        proj = 512
    else:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        proj = 64
    cfg = CLIPConfig(
        text_config=text, vision_config=dict(image_size=224, patch_size=32, **vision), projection_dim=proj
    )
    strong = out / f"clip-{strong_size}"
    CLIPModel(cfg).save_pretrained(strong)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(strong)
    CLIPImageProcessor().save_pretrained(strong)

    if weak_size == "resnet18":
        rcfg = dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2])
    else:
        rcfg = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    weak = out / f"resnet-{weak_size}"
    ResNetForImageClassification(
        ResNetConfig(
            layer_type="basic",
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
            **rcfg,
        )  # fmt: skip
    ).save_pretrained(weak)
    ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(weak)
    return str(strong), str(weak)


def steady_rate(timeline: list[tuple[float, int]]) -> float:
    """Images/s over the second half of the rows (start-up and prefetch excluded)."""
    total = timeline[-1][1]
    half = next(i for i, (_, rows) in enumerate(timeline) if rows >= total / 2)
    t0, r0 = timeline[half]
    t1, r1 = timeline[-1]
    return (r1 - r0) / max(t1 - t0, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--unique", type=int, default=256, help="distinct JPEGs (files repeat them)")
    ap.add_argument("--min-size", type=int, default=300)
    ap.add_argument("--max-size", type=int, default=600)
    ap.add_argument("--strong-size", choices=["tiny", "vit-b32"], default="tiny")
    ap.add_argument("--weak-size", choices=["tiny", "resnet18"], default="tiny")
    ap.add_argument("--resize", choices=["pil", "torch"], default="pil", help="extract's --resize")
    ap.add_argument(
        "--resize-on", choices=["auto", "workers", "device"], default="auto", help="extract's --resize-on"
    )
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: extract's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process on a CPU")
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path("bench-results/extract.json"))
    ap.add_argument(
        "--work-dir", type=Path, default=None, help="where images and the cache go (default: tmp)"
    )
    args = ap.parse_args()
    if args.images < 4 * args.batch_size:
        # Rates are taken over the second half of the rows: it needs a few batches to time.
        ap.error(f"--images must be at least 4 x --batch-size ({4 * args.batch_size})")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging

    from cpl_cache.datasets import load_dataset
    from cpl_cache.extract import ExtractConfig, reader, run_extract
    from cpl_cache.extract.mapper import Mapper, load_image_processor, plans_for
    from cpl_cache.extract.runner import default_workers
    from cpl_cache.runtime import resolve_device

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    device = resolve_device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    workers = default_workers(1) if args.workers is None else args.workers
    work = Path(tempfile.mkdtemp(prefix="bench-extract-", dir=args.work_dir))
    try:
        t = time.perf_counter()
        root = work / "domainnet"
        classes = write_images(root, args.images, min(args.unique, args.images), args.min_size, args.max_size,
                               procs=max(1, workers))  # fmt: skip
        strong, weak = write_models(work / "models", classes, args.strong_size, args.weak_size)
        print(
            f"wrote {args.images} images and the models in {time.perf_counter() - t:.1f}s; {device}, "
            f"{workers} workers, batch {args.batch_size}, resize {args.resize} on {args.resize_on}"
        )

        # Count decodes in every worker: the loader forks after this, so workers inherit the counter.
        decodes = multiprocessing.get_context("fork").Value("q", 0)
        real_load = reader.load_rgb

        def counted(path):
            with decodes.get_lock():
                decodes.value += 1
            return real_load(path)

        reader.load_rgb = counted

        images = load_dataset("domainnet", root, "real")
        procs = (load_image_processor("strong", strong), load_image_processor("weak", weak))
        plans = plans_for(*procs, resize=args.resize, resize_on=args.resize_on, device=device)
        on_device = [p.on_device for p in plans]
        specs = reader.batch_specs({0: (0, len(images))}, args.batch_size)

        # 1. Decode + both preprocessings alone.
        data = reader.DecodedBatches(images, specs, plans, procs)
        timeline, kept, rows, t0 = [], [], 0, time.perf_counter()
        for batch in reader.loader(data, workers, device):
            rows += batch["stop"] - batch["start"]
            timeline.append((time.perf_counter() - t0, rows))
            if len(kept) < 4:
                kept.append(batch)
        decode_rate = steady_rate(timeline)
        decodes_alone = decodes.value

        # 2. Both forward passes alone on those tensors (copy to the device, normalise, forward, copy back).
        mapper = Mapper(strong, weak, plans, device)
        for batch in kept[:2]:
            mapper(batch)  # warm-up (cudnn autotuning, allocator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timeline, rows, t0 = [], 0, time.perf_counter()
        while rows < len(images):
            for batch in kept:
                mapper(batch)
                rows += len(batch["rows"])
                timeline.append((time.perf_counter() - t0, rows))
        forward_rate = steady_rate(timeline)
        del mapper

        # 3. The whole extract, as the command runs it.
        decodes.value = 0
        cfg = ExtractConfig(
            domain="real", data_root=root, strong=strong, weak=weak, cache_dir=work / "cache",
            batch_size=args.batch_size, workers=workers, device=device, shard_size=args.shard_size,
            progress=False, overwrite=True, resize=args.resize, resize_on=args.resize_on,
        )  # fmt: skip
        summary = run_extract(cfg)
        whole_rate = steady_rate(summary["timeline"])
        whole_decodes = decodes.value
        reader.load_rgb = real_load
    finally:
        shutil.rmtree(work, ignore_errors=True)

    slower = min(decode_rate, forward_rate)
    result = {
        "images": args.images,
        "image_sizes": [args.min_size, args.max_size],
        "strong": args.strong_size,
        "weak": args.weak_size,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "workers": workers,
        "resize": args.resize,
        "resized_on_device": {"strong": on_device[0], "weak": on_device[1]},
        "batch_size": args.batch_size,
        "decode_preprocess_img_s": round(decode_rate, 1),
        "forward_img_s": round(forward_rate, 1),
        "whole_extract_img_s": round(whole_rate, 1),
        "whole_over_slower_part": round(whole_rate / slower, 3),
        "whole_extract_img_s_all_rows": round(args.images / summary["loop_seconds"], 1),
        "hdf5_share_of_loop": round(summary["write_seconds"] / summary["loop_seconds"], 4),
        "decodes_per_image": round(whole_decodes / args.images, 3),
        "decodes_per_image_decode_alone": round(decodes_alone / args.images, 3),
        "whole_extract_seconds_incl_startup": round(summary["seconds"], 2),
        "goals": {
            "whole_over_slower_part": ">= 0.85",
            "hdf5_share_of_loop": "<= 0.05",
            "decodes_per_image": "== 1",
            "whole_extract_img_s_gpu_vit_b32_resnet18": f">= 5000 (2x clip-retrieval's "
            f"{PUBLISHED_CLIP_RETRIEVAL_A100} per A100)",
        },
    }
    # With --resize-on device, the resizes move from the workers' part to the device's part.
    cpu_part = "decode" + ("" if all(on_device) else " + CPU preprocessing") + " (workers)"
    dev_part = ("device resize + " if any(on_device) else "") + "both forward passes"
    result["parts"] = {"workers": cpu_part, "device": dev_part}
    print(f"{'part':<44}{'images/s':>12}")
    print(f"{cpu_part:<44}{decode_rate:>12.1f}")
    print(f"{dev_part:<44}{forward_rate:>12.1f}")
    print(f"{'whole extract':<44}{whole_rate:>12.1f}")
    print(f"whole / slower part {result['whole_over_slower_part']:.3f} (goal >= 0.85); "
          f"HDF5 {100 * result['hdf5_share_of_loop']:.2f}% of the loop (goal <= 5%); "
          f"{result['decodes_per_image']} decodes per image")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
