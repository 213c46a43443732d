"""Prompt-head (TP, CoOp) training cost against the CPL prototype head, side by side in one run.

    python benchmarks/bench_prompt.py                        # quickdraw size: 120,750 train rows, 345 classes
    python benchmarks/bench_prompt.py --rows 20000 --threads 1
    python benchmarks/bench_prompt.py --device cuda --amp bf16

Writes bench-results/prompt.json. Every head runs the same step loop on the same planted cache
(seeded permutation slices, AdamW, cosine schedule, KD from the weak logits): `proto` (cpl) trains
a K x D matrix, `prompt` trains 16 context vectors and runs the frozen text encoder over all K class
prompts once per step. Two text towers with random weights: `tiny` (the synthetic checkpoint's
width 32, 2 layers) and `vit-b32` (the size of CLIP ViT-B/32's: width 512, 12 layers, 8 heads).
Where fewer steps than an epoch are timed (the ViT-B/32 tower on a CPU), seconds per epoch are
extrapolated from the mean step time and the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOWERS: dict[str, dict[str, Any]] = {
    # The synthetic CLIP's text tower (cpl_cache.synth.models.write_clip), projecting to the cache's width.
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=514
    ),
    # CLIP ViT-B/32's text tower: OpenAI's vocabulary, legacy eos_token_id=2 (pooling at the argmax id).
    "vit-b32": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, vocab_size=49408
    ),
}
PREFIX_LEN = 4  # "a photo of a" is 4 tokens in CLIP's BPE vocabulary


def text_tower(name: str, dim: int, device: str) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    spec = dict(TOWERS[name])
    vocab = spec["vocab_size"]
    config = CLIPTextConfig(
        **spec, projection_dim=dim, max_position_embeddings=77,
        bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=vocab - 1,
    )  # fmt: skip
    torch.manual_seed(0)
    tower = CLIPTextModelWithProjection(config).eval().requires_grad_(False)
    return tower.to(device)


def token_ids(classes: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Prompts shaped like DomainNet's: [SOS] 4 phrase tokens, a 1-4 token class name, ".", [EOS], pad.

    The special tokens are the two highest ids, as in CLIP's vocabulary (so argmax pooling finds EOS).
    """
    rng = np.random.default_rng(seed)
    sos, eos = vocab - 2, vocab - 1
    phrase = rng.integers(0, vocab - 2, PREFIX_LEN)
    names = [rng.integers(0, vocab - 2, rng.choice([1, 1, 2, 2, 2, 3, 4])) for _ in range(classes)]
    rows = [[sos, *phrase, *name, int(rng.integers(0, vocab - 2)), eos] for name in names]
    length = max(map(len, rows))
    return np.array([r + [eos] * (length - len(r)) for r in rows], dtype=np.int64)


def time_loop(
    head: torch.nn.Module, x: torch.Tensor, w: torch.Tensor, batch: int, steps: int, amp: str
) -> tuple[float, float]:
    """Mean seconds per training step over `steps` timed steps, and the last loss.

    Warm-up steps first (one on a CPU, three on CUDA, where the first calls pick kernels), untimed.
    """
    from cpl_cache.train.losses import get_loss

    kd = get_loss("kd")
    n = len(x)
    per_epoch = math.ceil(n / batch)
    warm = 3 if x.device.type == "cuda" else 1
    total = steps + warm
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    device = x.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = 0.0
    for step in range(total):
        if step == warm:
            sync()
            t0 = time.perf_counter()
        i = step % per_epoch
        if i == 0:
            perm = torch.randperm(n, generator=gen).to(device)
        idx = perm[i * batch : (i + 1) * batch]
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1.0 + math.cos(math.pi * step / total))
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = head(x[idx])
        loss = kd(logits.float(), w[idx], step / total)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps, float(loss.item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=120_750, help="train rows (quickdraw's train list)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=345)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--n-ctx", type=int, default=16, help="context vectors of the prompt head")
    ap.add_argument("--towers", default="tiny,vit-b32", help=f"comma-separated, of: {', '.join(TOWERS)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per head (default: one epoch, "
                    "but --cpu-steps for the vit-b32 tower on a CPU)")  # fmt: skip
    ap.add_argument("--cpu-steps", type=int, default=2, help="timed steps of the vit-b32 tower on a CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast for the forward"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/prompt.json"))
    args = ap.parse_args()

    from cpl_cache.cache import load_domain
    from cpl_cache.runtime import resolve_device
    from cpl_cache.synth.planted import PlantedConfig, write_planted_cache
    from cpl_cache.train.heads import ProtoHead
    from cpl_cache.train.prompt import PromptHead

    if args.threads:
        torch.set_num_threads(args.threads)
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    unknown = [t for t in towers if t not in TOWERS]
    if unknown:
        raise SystemExit(f"unknown tower(s) {unknown}; choose from {', '.join(TOWERS)}")
    device = resolve_device(args.device)
    dev = torch.device(device)

    cfg = PlantedConfig(n_train=args.rows, n_hold=100, n_test=100, dim=args.dim, classes=args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        write_planted_cache(tmp, cfg)
        data = load_domain(tmp, cfg.domain)
    train = data.rows("train")
    x = torch.nn.functional.normalize(data.image_embeds[train].float(), dim=1).to(dev)
    w = data.weak_logits[train].to(dev)
    bs = min(args.batch_size, len(x))
    per_epoch = math.ceil(len(x) / bs)

    rows: list[dict[str, Any]] = []

    def record(head_name: str, tower: str | None, head: torch.nn.Module, steps: int) -> None:
        per_step, loss = time_loop(head, x, w, bs, steps, args.amp)
        rows.append({
            "head": head_name, "tower": tower, "steps_timed": steps, "steps_per_epoch": per_epoch,
            "seconds_per_step": per_step, "seconds_per_epoch": per_step * per_epoch,
            "extrapolated": steps < per_epoch, "trainable": sum(p.numel() for p in head.parameters()),
            "last_loss": loss,
        })  # fmt: skip
        r = rows[-1]
        print(
            f"  {head_name:7s} {tower or '-':8s} {r['seconds_per_epoch']:9.3f} s/epoch ({steps} steps timed)"
        )

    full = args.steps or per_epoch
    print(f"{len(x)} train rows, {args.classes} classes, batch {bs}: {per_epoch} steps an epoch on {device}")
    record("proto", None, ProtoHead(data.text_embeds, data.logit_scale).to(dev), min(full, per_epoch))
    for name in towers:
        tower = text_tower(name, args.dim, device)
        ids = token_ids(args.classes, TOWERS[name]["vocab_size"])
        head = PromptHead(tower, ids, PREFIX_LEN, data.logit_scale, n_ctx=args.n_ctx, init="random").to(dev)
        steps = args.steps or (args.cpu_steps if device == "cpu" and name == "vit-b32" else per_epoch)
        record("prompt", name, head, min(steps, per_epoch))
        del head, tower

    base = rows[0]["seconds_per_epoch"]
    for r in rows:
        r["x_cpl"] = r["seconds_per_epoch"] / base
    print()
    print(f"| head | text tower | s/epoch | x cpl | steps timed of {per_epoch} |")
    print("| --- | --- | ---: | ---: | --- |")
    for r in rows:
        note = "extrapolated" if r["extrapolated"] else "measured"
        method = "cpl (proto)" if r["head"] == "proto" else "*-tp (prompt)"
        print(
            f"| {method} | {r['tower'] or '-'} | {r['seconds_per_epoch']:.3f} | {r['x_cpl']:.1f} | "
            f"{r['steps_timed']} ({note}) |"
        )
    result = {
        "benchmark": "prompt",
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "amp": args.amp,
        "train_rows": len(x),
        "classes": args.classes,
        "dim": args.dim,
        "batch_size": bs,
        "n_ctx": args.n_ctx,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
