"""Stage-two benchmark: the Table 2 grid from planted caches at DomainNet sizes under the default protocol
against the fixed values (and stacked against one cell at a time), and `cpl-cache train --method
naive-lp` against a reference training loop.

    python benchmarks/bench_train.py                        # the whole grid, three seeds, CPU
    python benchmarks/bench_train.py --scale 0.1 --seeds 0  # a quick look
    python benchmarks/bench_train.py --device cuda          # on a GPU (benchmarks/h200.sh)

Parts, each timed in the same run:
- grid: six planted domains at DomainNet sizes (train list; half the test list as test, the other half
  as hold; 512-d, 345 classes), every method of pipelines/table2.toml that a planted cache can train
  (the *-tp methods need a CLIP text tower: benchmarks/bench_prompt.py) and ceiling-lp, three seeds,
  under `--select` (default hold: every candidate, successive halving) at `--precision` (default auto:
  bf16 where native). Per domain, the cells train stacked, as `cpl-cache run` trains them; with
  `--anchor` the same cells then train with the registry's fixed values in float32 (`--select none
  --precision fp32`, the grid as it was before selection), timed side by side; with `--alone` every cell
  also trains one at a time through the same code (`cpl-cache train`'s path, the domain's tensors loaded
  once). Goals: the default protocol's grid no slower than the anchor and at least as accurate per
  method (1,409 s on 2 cores when the anchor was first measured; 10 s on one H100/H200).
- reference: on quickdraw, the reference loop written the common way (public weak-to-strong code: a
  DataLoader over a TensorDataset, batch 100, Adam lr 1e-3, cosine schedule, 10 epochs, soft weak labels)
  against `cpl-cache train --method naive-lp` under the default protocol, as a whole process (start,
  cache load, selection, result), side by side in turns. Goal: at least 3x faster and as accurate.

Writes bench-results/train.json (or --json). Planted caches are kept under bench-out/ and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cpl_cache.cache import load_domain, read_manifest
from cpl_cache.errors import UserError
from cpl_cache.pipeline import load_grid
from cpl_cache.runtime import resolve_device
from cpl_cache.synth.planted import PlantedConfig, write_planted_cache
from cpl_cache.train.methods import METHODS
from cpl_cache.train.trainer import Cell, DomainTensors, TrainConfig, train_cells

REPO = Path(__file__).resolve().parents[1]
# DomainNet list sizes: (train list, test list). Test rows are half the test list, hold the other half.
DOMAINNET = {
    "clipart": (33525, 14604),
    "infograph": (36023, 15582),
    "painting": (50416, 21850),
    "quickdraw": (120750, 51750),
    "real": (120906, 52041),
    "sketch": (48212, 20916),
}
REFERENCE = dict(batch_size=100, lr=1e-3, epochs=10)


def planted(root: Path, domain: str, scale: float) -> Path:
    """A planted cache of `domain` at DomainNet size times `scale`, written once and reused."""
    n_train, n_test_list = DOMAINNET[domain]
    n_test = n_test_list // 2
    cfg = PlantedConfig(
        domain=domain, n_train=max(1, round(n_train * scale)), n_test=max(1, round(n_test * scale)),
        n_hold=max(1, round((n_test_list - n_test) * scale)), dim=512, classes=345,
        seed=list(DOMAINNET).index(domain),
    )  # fmt: skip
    cache = root / f"scale{scale:g}"
    try:
        same = read_manifest(cache, domain).get("planted", {}) == {
            k: v for k, v in cfg.__dict__.items() if k != "domain"
        }
    except UserError:
        same = False
    if not same:
        t = time.perf_counter()
        write_planted_cache(cache, cfg, overwrite=True)
        print(f"  wrote planted {domain} ({cfg.n_train} train) in {time.perf_counter() - t:.0f}s", flush=True)
    return cache


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def reference_loop(data, device: str, seed: int = 0) -> dict:
    """The common way (openai/weak-to-strong's `train_logreg`): DataLoader, nn.Linear, Adam, cosine
    schedule per step, cross-entropy to the weak model's softmax."""
    torch.manual_seed(seed)
    train, test = data.rows("train"), data.rows("test")
    x_train = data.image_embeds[train].float()
    y_train = torch.softmax(data.weak_logits[train], dim=1)
    ds = torch.utils.data.TensorDataset(x_train, y_train)
    model = torch.nn.Linear(x_train.shape[1], data.num_classes).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=REFERENCE["lr"])
    n_batches = math.ceil(len(ds) / REFERENCE["batch_size"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=REFERENCE["epochs"] * n_batches)

    def run() -> float:
        for _ in range(REFERENCE["epochs"]):
            for x, y in torch.utils.data.DataLoader(ds, batch_size=REFERENCE["batch_size"], shuffle=True):
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                criterion(model(x), y).backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            pred = model(data.image_embeds[test].float().to(device)).argmax(1).cpu()
        return (pred == data.labels[test]).float().mean().item()

    seconds, acc = timed(device, run)
    return {"seconds": seconds, "epochs": REFERENCE["epochs"], "test_acc": acc}


def train_command(cache: Path, domain: str, device: str, precision: str, out: Path) -> dict:
    """`cpl-cache train --method naive-lp` under the default protocol as a user runs it: a whole process
    (interpreter start, imports, cache load, every candidate, the result JSON), timed from outside."""
    cmd = [sys.executable, "-m", "cpl_cache", "train", "--method", "naive-lp", "--domain", domain]
    cmd += ["--cache-dir", str(cache), "--out", str(out), "--device", device, "--precision", precision]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    rec = json.loads((out / domain / "naive-lp-seed0.json").read_text())
    return {
        "seconds": seconds, "steps": rec["steps"], "budget": rec["budget"], "precision": rec["precision"],
        "test_acc": rec["metrics"]["test_acc"], "chosen": rec["selection"].get("chosen"),
    }  # fmt: skip


def grid_methods() -> list[str]:
    """The methods of pipelines/table2.toml that a planted cache can run (no prompt head), and `ceiling-lp`
    (not in Table 2) so that every head has its ground-truth ceiling."""
    grid = load_grid(REPO / "pipelines" / "table2.toml")
    return [m.method for m in grid.methods if METHODS[m.method].head != "prompt"] + ["ceiling-lp"]


def domain_grid(
    cache: Path,
    domain: str,
    seeds: list[int],
    device: str,
    out: Path,
    alone: bool = True,
    select: str = "none",
    precision: str = "fp32",
    anchor: bool = False,
) -> dict:
    """One domain's cells stacked, then (with `anchor`) the same cells with the fixed values in float32,
    then (with `alone`) one at a time; each timed, and their metrics compared. `select`: the protocol
    that chooses each cell's candidates (`--select`)."""
    load_s, data = timed(device, lambda: load_domain(cache, domain))
    dt = tensors(data, device, precision)
    cells = domain_cells(cache, domain, seeds, select)
    stacked_s, stacked = timed(device, lambda: train_cells(cells, dt, out / "stacked"))
    anchored = {}
    if anchor:
        base = tensors(data, device, "fp32")
        fixed = domain_cells(cache, domain, seeds, "none")
        anchor_s, records = timed(device, lambda: train_cells(fixed, base, out / "anchor"))
        acc: dict[str, list[float]] = {}
        for r in records:
            acc.setdefault(r["base_method"], []).append(r["metrics"]["test_acc"])
        anchored = {
            "anchor_s": anchor_s, "ratio_to_anchor": stacked_s / anchor_s,
            "anchor_test_acc": {m: sum(a) / len(a) for m, a in acc.items()},
        }  # fmt: skip
    one_by_one, alone_s = [], 0.0
    for cell in cells if alone else []:
        seconds, records = timed(device, lambda cell=cell: train_cells([cell], dt, out / "alone"))
        alone_s += seconds
        one_by_one.extend(records)
    pairs = zip(stacked, one_by_one, strict=True) if alone else []
    diff = max((abs(a["metrics"]["test_acc"] - b["metrics"]["test_acc"]) for a, b in pairs), default=None)
    rows = {}
    for r in stacked:
        rows.setdefault(r["base_method"], []).append(r["metrics"]["test_acc"])
    return {
        "domain": domain,
        "train_rows": len(dt.train),
        "cells": len(cells),
        "steps": {r["base_method"]: r["steps"] for r in stacked},
        "select": select,
        "precision": dt.precision,
        "stacked_s": stacked_s,
        **anchored,
        "alone_s": alone_s if alone else None,
        "load_s": load_s,
        "max_test_acc_diff": diff,
        "test_acc": {m: sum(a) / len(a) for m, a in rows.items()},
        "test_acc_std": {m: statistics.stdev(a) if len(a) > 1 else 0.0 for m, a in rows.items()},
        "flags": {f"{r['method']}-seed{r['seed']}": r["flags"] for r in stacked if r["flags"]},
        "chosen": {
            f"{r['method']}-seed{r['seed']}": r["selection"]["chosen"]
            for r in stacked
            if "chosen" in (r.get("selection") or {})
        },
    }


def tensors(data, device: str, precision: str = "fp32") -> DomainTensors:
    """The domain's tensors on the device, made once, outside every timing."""
    dt = DomainTensors(data, device, precision=precision)
    _ = dt.x_train, dt.x_test, dt.x_hold, dt.y_hold, dt.weak_train, dt.truth_train
    return dt


def domain_cells(cache: Path, domain: str, seeds: list[int], select: str) -> list[Cell]:
    return [
        Cell.of(TrainConfig(m, domain, cache, seed=s, select=select)) for s in seeds for m in grid_methods()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--seeds", default="0,1,2", help="comma list")
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply every size (e.g. 0.1 for a quick look)"
    )
    ap.add_argument("--domains", default=",".join(DOMAINNET), help="comma list")
    ap.add_argument("--parts", default="grid,reference", help="comma list of: grid, reference")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument(
        "--root", type=Path, default=Path("bench-out/train"), help="where planted caches are kept"
    )
    ap.add_argument("--json", type=Path, default=Path("bench-results/train.json"))
    ap.add_argument("--turns", type=int, default=2, help="reference part: runs of each, the fastest kept")
    ap.add_argument(
        "--alone", action=argparse.BooleanOptionalAction, default=True,
        help="also train every cell one at a time, to time stacking against it (--no-alone: the table only)",
    )  # fmt: skip
    ap.add_argument(
        "--select", choices=["hold", "weak", "none"], default="hold",
        help="how each cell's candidates are chosen (`--select`); none: the fixed values",
    )  # fmt: skip
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument(
        "--anchor", action=argparse.BooleanOptionalAction, default=True,
        help="also train each domain's cells with the fixed values in float32 (the grid before selection)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        },
        "device": device, "scale": args.scale, "seeds": seeds, "methods": grid_methods(),
    }  # fmt: skip
    print(f"machine: {report['machine']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if "grid" in parts:
            report["grid"] = []
            print(
                f"{'domain':<10} {'rows':>7} {'cells':>5} {args.select + ' s':>9} {'anchor s':>8} "
                f"{'ratio':>6} {'alone s':>8} {'load s':>6}"
            )
            for domain in args.domains.split(","):
                cache = planted(args.root, domain, args.scale)
                g = domain_grid(cache, domain, seeds, device, out, alone=args.alone, select=args.select,
                                precision=args.precision, anchor=args.anchor)  # fmt: skip
                report["grid"].append(g)
                anchor_s, alone_s = g.get("anchor_s", float("nan")), g["alone_s"] or float("nan")
                print(
                    f"{domain:<10} {g['train_rows']:>7} {g['cells']:>5} {g['stacked_s']:>9.1f} "
                    f"{anchor_s:>8.1f} {g['stacked_s'] / anchor_s:>6.2f} {alone_s:>8.1f} {g['load_s']:>6.1f}",
                    flush=True,
                )
                write(args.json, report)  # a domain at a time, so that a long run keeps what it measured
            stacked = sum(g["stacked_s"] for g in report["grid"])
            report["grid_total"] = {"stacked_s": stacked, "select": args.select, "precision": args.precision}
            if args.anchor:
                anchor = sum(g["anchor_s"] for g in report["grid"])
                methods = report["grid"][0]["test_acc"]
                mean = {
                    key: {m: statistics.mean(g[key][m] for g in report["grid"]) for m in methods}
                    for key in ("test_acc", "anchor_test_acc")
                }
                report["grid_total"].update({
                    "anchor_s": anchor, "ratio_to_anchor": stacked / anchor,
                    "test_acc": mean["test_acc"], "anchor_test_acc": mean["anchor_test_acc"],
                    "below_anchor": [m for m in methods if mean["test_acc"][m] < mean["anchor_test_acc"][m]],
                })  # fmt: skip
            if args.alone:
                alone = sum(g["alone_s"] for g in report["grid"])
                # `cpl-cache train` one cell at a time also loads the domain's cache for every cell.
                as_commands = alone + sum(g["load_s"] * g["cells"] for g in report["grid"])
                report["grid_total"].update({
                    "alone_s": alone, "ratio": stacked / alone,
                    "alone_as_commands_s": as_commands, "ratio_to_commands": stacked / as_commands,
                    "max_test_acc_diff": max(g["max_test_acc_diff"] for g in report["grid"]),
                })  # fmt: skip
            print(f"grid: {json.dumps(report['grid_total'])}", flush=True)
        if "reference" in parts:
            cache = planted(args.root, "quickdraw", args.scale)
            data = load_domain(cache, "quickdraw")
            ours, refs = [], []
            for turn in range(args.turns):
                ours.append(train_command(cache, "quickdraw", device, args.precision, out / f"ref-{turn}"))
                refs.append(reference_loop(data, device))
            best = min(ours, key=lambda r: r["seconds"])
            ref = min(refs, key=lambda r: r["seconds"])
            report["reference"] = {
                "naive_lp": best, "reference": ref, "turns": args.turns,
                "time_ratio": best["seconds"] / ref["seconds"], "speedup": ref["seconds"] / best["seconds"],
            }  # fmt: skip
            print(f"reference: {json.dumps(report['reference'])}", flush=True)
    write(args.json, report)
    print(f"wrote {args.json}")


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
