"""bfloat16 against float32 on every zoo cache: Table 2's trained methods under the default protocol
(`--select hold`, successive halving), one seed, each precision timed side by side in turns; writes
bench-results/precision.json. Goal: under `--precision auto` (bf16 only for heads of at least
BF16_MIN_WEIGHTS weights, cpl_cache.runtime) every method's test accuracy within 0.3 point of float32's;
the table also shows what forcing bf16 on every cache would move.

    python benchmarks/bench_precision.py                       # all twelve zoo caches
    python benchmarks/bench_precision.py --caches tiny-128x10  # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cpl_cache.cache import load_domain
from cpl_cache.regret import TABLE2
from cpl_cache.runtime import BF16_MIN_WEIGHTS, resolve_precision
from cpl_cache.synth.zoo import ZOO, write_zoo_cache
from cpl_cache.train.trainer import Cell, DomainTensors, TrainConfig, train_cells

GOAL = 0.3  # points of test accuracy


def cache_precision(root: Path, name: str, seed: int) -> dict:
    """One zoo cache: each method's test accuracy (%) and the grid's seconds in fp32 and in bf16."""
    write_zoo_cache(root, name, seed=seed, overwrite=True)
    data = load_domain(root, name)
    cells = [Cell.of(TrainConfig(m, name, root, seed=seed)) for m in TABLE2]
    out: dict = {"seconds": {}, "test_acc": {}}
    for precision in ("fp32", "bf16"):
        dt = DomainTensors(data, "cpu", precision=precision)
        _ = dt.x_train, dt.x_test, dt.x_hold, dt.weak_train, dt.truth_train
        t0 = time.perf_counter()
        records = train_cells(cells, dt, root / f"out-{precision}")
        out["seconds"][precision] = time.perf_counter() - t0
        out["test_acc"][precision] = {r["base_method"]: 100 * r["metrics"]["test_acc"] for r in records}
    out["diff"] = {m: out["test_acc"]["bf16"][m] - out["test_acc"]["fp32"][m] for m in TABLE2}
    out["rows"] = {"train": len(dt.train), "test": len(dt.test)}
    out["speedup"] = out["seconds"]["fp32"] / out["seconds"]["bf16"]
    out["weights"] = data.dim * data.num_classes
    out["auto"] = resolve_precision("auto", "cpu", out["weights"])  # what `--precision auto` takes here
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--caches", default=",".join(ZOO), help="comma list of zoo caches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("bench-results/precision.json"))
    args = ap.parse_args()
    if resolve_precision("auto", "cpu") != "bf16":
        raise SystemExit("this CPU has no native bfloat16 matrix products: nothing to compare")
    report: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "methods": TABLE2, "seed": args.seed, "goal": GOAL, "caches": {},
    }  # fmt: skip
    print(f"{'cache':<24} {'fp32 s':>7} {'bf16 s':>7} {'speedup':>7} {'max |diff|':>10}  worst method")
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        for name in args.caches.split(","):
            c = cache_precision(Path(tmp), name, args.seed)
            report["caches"][name] = c
            worst = max(c["diff"], key=lambda m: abs(c["diff"][m]))
            print(
                f"{name:<24} {c['seconds']['fp32']:>7.1f} {c['seconds']['bf16']:>7.1f} {c['speedup']:>7.2f} "
                f"{abs(c['diff'][worst]):>10.2f}  {worst}",
                flush=True,
            )
            diffs = [abs(d) for c in report["caches"].values() for d in c["diff"].values()]
            auto = [
                abs(d) if c["auto"] == "bf16" else 0.0
                for c in report["caches"].values()
                for d in c["diff"].values()
            ]
            report["summary"] = {
                "auto_max_abs_diff": max(auto), "bf16_min_weights": BF16_MIN_WEIGHTS,
                "max_abs_diff": max(diffs), "median_abs_diff": statistics.median(diffs),
                "within_goal": sum(d <= GOAL for d in diffs), "n": len(diffs),
                "fp32_s": sum(c["seconds"]["fp32"] for c in report["caches"].values()),
                "bf16_s": sum(c["seconds"]["bf16"] for c in report["caches"].values()),
            }  # fmt: skip
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"]))


if __name__ == "__main__":
    main()
