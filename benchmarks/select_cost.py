"""What the default protocol costs: Table 2's trained methods on one zoo cache under `--select hold`
against `--select none`, side by side in turns, one seed; writes bench-results/select-cost.json.

    python benchmarks/select_cost.py --cache cone-256x50 --turns 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from cpl_cache.cache import load_domain
from cpl_cache.regret import TABLE2
from cpl_cache.synth.zoo import write_zoo_cache
from cpl_cache.train.select import trials
from cpl_cache.train.trainer import Cell, DomainTensors, TrainConfig, train_cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="cone-256x50", help="a zoo cache (cpl_cache/synth/zoo.py)")
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--json", default="bench-results/select-cost.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="select-cost-"))
    write_zoo_cache(root, args.cache)
    dt = DomainTensors(load_domain(root, args.cache), "cpu")
    _ = dt.x_train, dt.x_test, dt.x_hold, dt.weak_train, dt.truth_train
    plans = {
        p: [Cell.of(TrainConfig(m, args.cache, root, select=p)) for m in TABLE2] for p in ("none", "hold")
    }
    seconds = {p: 0.0 for p in plans}
    acc: dict[str, dict[str, float]] = {}
    for turn in range(args.turns):
        for p, cells in plans.items():
            t0 = time.perf_counter()
            records = train_cells(cells, dt, root / f"{p}-{turn}")
            seconds[p] += time.perf_counter() - t0
            acc[p] = {r["base_method"]: 100 * r["metrics"]["test_acc"] for r in records}
    heads = {p: sum(len(trials(c)) for c in cells) for p, cells in plans.items()}  # trained heads a seed
    report = {
        "cache": args.cache,
        "methods": TABLE2,
        "turns": args.turns,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "seconds": {p: s / args.turns for p, s in seconds.items()},
        "ratio_hold_to_none": seconds["hold"] / seconds["none"],
        "heads": heads,
        "test_acc": acc,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("seconds", "ratio_hold_to_none", "heads")}))


if __name__ == "__main__":
    main()
