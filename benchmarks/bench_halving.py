"""What successive halving gives up, and which candidates are needed: every Table 2 method's candidates
trained as a full search (every trial to the end, float32, scored on hold at every checkpoint) on every
zoo cache, then each selection replayed from those runs (a survivor of halving trains exactly as in the
full search, tests/test_select.py). Writes bench-results/halving.json:

- per cache and method: the test accuracy of the full search's choice, of the registry's halving
  schedule's choice, and the share of head-steps halving trains;
- schedules: for each candidate schedule (fractions, keep share, margin in standard errors), the largest
  and median loss against the full search and the mean share of head-steps, per zoo half (chosen on
  the tune half, reported on both);
- subsets: the loss of choosing among a subset of a grid (ceiling-lp's weight decay, kd-lp's T).

    python benchmarks/bench_halving.py                     # train (about 35 min on one core) and report
    python benchmarks/bench_halving.py --runs runs.json    # keep the runs; rerun reads them back
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cpl_cache.train.select as select
from cpl_cache.cache import load_domain
from cpl_cache.regret import TABLE2, _accuracy, full_search
from cpl_cache.synth.zoo import ZOO, write_zoo_cache
from cpl_cache.train.methods import METHODS
from cpl_cache.train.trainer import Cell, DomainTensors, TrainConfig

# The grids as they were before this benchmark narrowed ceiling-lp's weight decay.
WIDE = {"ceiling-lp": {"weight_decay": [0.0, 1e-3, 1e-2, 1e-1]}}
SCHEDULES = [(0.2,), (0.3,), (0.5,), (0.2, 0.5), (0.3, 0.6), (0.2, 0.4, 0.6), (0.1, 0.3, 0.5)]
KEEPS, CLEARS = (1 / 3, 1 / 2), (0.0, 1.0, 2.0, 3.0)
SUBSETS = {
    ("ceiling-lp", "weight_decay"): [(0.0, 1e-3, 1e-2, 1e-1), (0.0, 1e-1), (0.0, 1e-2), (0.0,)],
    ("kd-lp", "T"): [(1.0, 2.0, 4.0), (1.0, 4.0), (2.0, 4.0), (2.0,)],
    ("ceiling", "weight_decay"): [(0.0, 0.1), (0.0,), (0.1,)],
}


def cache_runs(root: Path, name: str, seed: int) -> dict:
    """Every method's candidates on one zoo cache: hold scores and test accuracy at every checkpoint."""
    t0 = time.perf_counter()
    write_zoo_cache(root, name, seed=seed, overwrite=True)
    dt = DomainTensors(load_domain(root, name), "cpu")
    hold = select.HoldScore(dt)
    cells = {m: Cell.of(TrainConfig(m, name, root, seed=seed, overrides=WIDE.get(m, {}))) for m in TABLE2}
    out = {m: {"candidates": [], "scores": [], "tests": [], "finite": []} for m in TABLE2}
    for m, runs in full_search(cells, dt, hold).items():
        r = out[m]
        for values, tr in runs:
            r["candidates"].append(values)
            r["scores"].append(tr.scores)
            r["finite"].append(tr.finite)
            r["tests"].append([_accuracy(tr, k, dt.x_test, dt.y_test) for k in range(len(tr.steps))])
            r["steps"] = tr.steps
    return {"rows": hold.rows, "methods": out, "seconds": time.perf_counter() - t0}


def replay(r: dict, rows: int, schedule, idx=None) -> tuple[float, float]:
    """Test accuracy of the choice among trials `idx` under `schedule`, and the share of head-steps."""
    idx = list(range(len(r["candidates"]))) if idx is None else idx
    scores = [r["scores"][i] for i in idx]
    reached = select.simulate_halving(schedule, r["steps"], scores, rows)
    t, k = select.choose(reached, [r["finite"][i] for i in idx])
    steps = r["steps"]
    return r["tests"][idx[t]][k], sum(steps[len(s) - 1] for s in reached) / (steps[-1] * len(reached))


def losses(runs: dict, schedule, names) -> tuple[list[float], list[float]]:
    lost, cost = [], []
    for name in names:
        c = runs[name]
        for r in c["methods"].values():
            full, _ = replay(r, c["rows"], ())
            got, share = replay(r, c["rows"], schedule)
            lost.append(100 * (full - got))
            cost.append(share)
    return lost, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--caches", default=",".join(ZOO))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=Path, default=None, help="keep the runs here (read back when present)")
    ap.add_argument("--json", type=Path, default=Path("bench-results/halving.json"))
    args = ap.parse_args()
    names = args.caches.split(",")
    runs = json.loads(args.runs.read_text()) if args.runs and args.runs.is_file() else {}
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix="halving-") as tmp:
        for name in names:
            if name not in runs:
                runs[name] = cache_runs(Path(tmp), name, args.seed)
                print(f"{name}: {runs[name]['seconds']:.0f} s", flush=True)
                if args.runs:
                    args.runs.write_text(json.dumps(runs))
    halves = {"all": names, **{h: [n for n in names if ZOO[n].half == h] for h in ("tune", "judge")}}
    halves = {h: ns for h, ns in halves.items() if ns}  # a subset of the zoo may lack a half
    registry = METHODS["naive-lp"].halving
    report: dict = {"seed": args.seed, "registry": {"schedule": list(registry), "keep": select.HALVING_KEEP,
                    "clear": select.HALVING_CLEAR}, "caches": {}, "schedules": [], "subsets": {}}  # fmt: skip
    for name in names:
        c = runs[name]
        report["caches"][name] = {}
        for m, r in c["methods"].items():
            full, _ = replay(r, c["rows"], ())
            got, share = replay(r, c["rows"], registry)
            report["caches"][name][m] = {"full": 100 * full, "halving": 100 * got, "share": share}
    keep0, clear0 = select.HALVING_KEEP, select.HALVING_CLEAR
    try:
        for schedule, keep, clear in itertools.product(SCHEDULES, KEEPS, CLEARS):
            select.HALVING_KEEP, select.HALVING_CLEAR = keep, clear
            row = {"schedule": list(schedule), "keep": keep, "clear": clear}
            for half, ns in halves.items():
                lost, cost = losses(runs, schedule, ns)
                row[half] = {
                    "max": max(lost),
                    "median": statistics.median(lost),
                    "share": statistics.mean(cost),
                }
            report["schedules"].append(row)
    finally:
        select.HALVING_KEEP, select.HALVING_CLEAR = keep0, clear0
    for (m, key), subsets in SUBSETS.items():
        for sub in subsets:
            lost = []
            for name in names:
                c, r = runs[name], runs[name]["methods"][m]
                idx = [i for i, v in enumerate(r["candidates"]) if v[key] in sub]
                full = replay(r, c["rows"], registry)[0]
                lost.append(100 * (full - replay(r, c["rows"], registry, idx)[0]))
            report["subsets"][f"{m} {key} {list(sub)}"] = {
                "max": max(lost),
                "median": statistics.median(lost),
                "per_cache": dict(zip(names, lost, strict=True)),
            }
    print(f"{'schedule':<16} {'keep':>5} {'clear':>5}  tune max/median/share   judge max/median/share")
    for row in report["schedules"]:
        cols = [f"{row[h]['max']:5.2f} {row[h]['median']:5.2f} {row[h]['share']:.2f}" if h in row
                else f"{'-':>16}" for h in ("tune", "judge")]  # fmt: skip
        head = f"{str(tuple(row['schedule'])):<16} {row['keep']:>5.2f} {row['clear']:>5.1f}"
        print(f"{head}  {cols[0]}      {cols[1]}")
    for k, v in report["subsets"].items():
        print(f"{k}: loss max {v['max']:.2f}, median {v['median']:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
