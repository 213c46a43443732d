"""The regret benchmark (`cpl-cache bench-regret`, `make bench-regret`): what each selection protocol
reports for every Table 2 method on every zoo cache, against the best test accuracy the method reaches
anywhere in a broad sweep (the "oracle": read from test, so a diagnostic only, never used by a protocol).

Per cache and method:
- the sweep: the registry's candidates, the step-size grid extended one step beyond each end and the
  fixed values, every checkpoint of every trial, all in one stack on all of train and scored on hold;
- `hold`: the protocol's choice among the registry's candidates, computed from those same runs with the
  protocol's own successive halving (`simulate_halving`: a survivor trains as in the full search) and
  `choose` (a test checks it equals `cpl-cache train`'s record); `hold_full`, the choice of the full
  search without halving, shows what halving costs;
- `none`: the fixed values at the end of their run (a trial of the sweep);
- `weak`: `train_cells` under `--select weak` (its own runs, on train less the slice);
- the oracle: the best test accuracy over the sweep's checkpoints and over a run `LONGER` times as long
  at the sweep's best trial; regret = oracle - protocol.
A linear-probe method far below naive-lp under `hold` (COLLAPSE_GAP points) is flagged: a collapse
that selection cannot rescue.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE2 = ["naive-lp", "kd-lp", "auxconf-lp", "augconf-lp", "adaptconf-lp", "cpl", "ceiling", "ceiling-lp"]
LONGER = 4  # the oracle's longer run: this many times the method's step budget
COLLAPSE_GAP = 10.0  # points below naive-lp under hold that flag a method as collapsed
GOAL_MAX, GOAL_MEDIAN = 3.0, 1.5  # the regret goals under hold (points)


@dataclass(frozen=True)
class RegretConfig:
    caches: tuple[str, ...]
    out: Path = Path("bench-results/regret.json")
    seed: int = 0
    scale: float = 1.0
    methods: tuple[str, ...] = tuple(TABLE2)
    device: str = "cpu"
    work: Path | None = None  # where the zoo caches are written (a temporary folder when None)
    overrides: tuple[tuple[str, Any], ...] = ()  # settings for every run (tests: a shorter budget)
    precision: str = "auto"  # the matrix products' precision (cpl_cache.runtime.resolve_precision)
    progress: bool = True  # a line per cache on stderr


def _sweep_overrides(method: Any) -> dict[str, list[float]]:
    """The sweep of a method: its candidates, the step-size grid one step wider at each end, and its
    fixed values."""
    grid = {k: list(v) for k, v in method.candidates.items()}
    lrs = sorted(grid["lr"])
    ratio = lrs[1] / lrs[0] if len(lrs) > 1 else math.sqrt(10)
    grid["lr"] = sorted({lrs[0] / ratio, *lrs, lrs[-1] * ratio, method.lr})
    for key in grid:
        if key != "lr":
            grid[key] = sorted({*grid[key], _fixed(method, key)})
    return grid


def _accuracy(trace: Any, k: int, x: Any, y: Any) -> float:
    from cpl_cache.train.trainer import predict

    return (predict(trace.load(k), x) == y).float().mean().item()


def full_search(cells: dict[str, Any], dt: Any, hold: Any) -> dict[str, list[tuple[dict, Any]]]:
    """Every trial of each named cell trained to the end (no halving) and scored by `hold` at every
    checkpoint, the trials of all cells that share a head kind and step count in one stack: per name,
    (the trial's candidate values, its trace)."""
    from cpl_cache.train.select import trials
    from cpl_cache.train.trainer import train_stack

    n = len(dt.train)
    by_head: dict[Any, list[tuple[str, dict, Any]]] = {}
    for m, cell in cells.items():
        for values, trial in trials(cell):
            by_head.setdefault((trial.hparams["head"], trial.steps(n)), []).append((m, values, trial))
    traces: dict[str, list[tuple[dict, Any]]] = {m: [] for m in cells}
    for (_, steps), group in by_head.items():
        got = train_stack([t for _, _, t in group], dt, steps, [hold] * len(group))
        for (m, values, _), tr in zip(group, got, strict=True):
            traces[m].append((values, tr))
    return traces


def cache_regret(cache_dir: Path, domain: str, cfg: RegretConfig, say=print) -> dict[str, Any]:
    """Every method of `cfg` on one cached domain: each protocol's test accuracy, the oracle, regret."""
    import torch

    from cpl_cache.cache import load_domain
    from cpl_cache.runtime import resolve_precision
    from cpl_cache.train.methods import METHODS
    from cpl_cache.train.select import HoldScore, choose, simulate_halving
    from cpl_cache.train.trainer import Cell, DomainTensors, TrainConfig, train_cells

    resolve_precision(cfg.precision, cfg.device)
    dt = DomainTensors(load_domain(cache_dir, domain), cfg.device, precision=cfg.precision)
    n = len(dt.train)
    out_dir = Path(tempfile.mkdtemp(prefix="regret-"))
    base = [Cell.of(TrainConfig(m, domain, cache_dir, seed=cfg.seed)) for m in ("weak", "zeroshot")]
    weak_acc, zs_acc = (100 * r["metrics"]["test_acc"] for r in train_cells(base, dt, out_dir))
    flush = dt.device == "cpu" and torch.set_flush_denormal(True)
    hold = HoldScore(dt)
    extra = dict(cfg.overrides)
    result: dict[str, Any] = {}
    try:
        sweeps = {}
        for m in cfg.methods:
            method = METHODS[m]
            sweep = Cell.of(
                TrainConfig(
                    m, domain, cache_dir, seed=cfg.seed, overrides={**extra, **_sweep_overrides(method)}
                )
            )
            registry = Cell.of(TrainConfig(m, domain, cache_dir, seed=cfg.seed, overrides=extra)).hparams
            registry = registry["candidates"]
            sweeps[m] = (sweep, registry)
        t0 = time.perf_counter()
        traces = full_search({m: sweep for m, (sweep, _) in sweeps.items()}, dt, hold)
        sweep_seconds = time.perf_counter() - t0
        for m, (sweep, registry) in sweeps.items():
            method = METHODS[m]
            runs = traces[m]
            tests = [[_accuracy(tr, k, dt.x_test, dt.y_test) for k in range(len(tr.steps))] for _, tr in runs]
            own = [i for i, (v, _) in enumerate(runs) if all(v[k] in registry[k] for k in registry)]
            scores, finite = [runs[i][1].scores for i in own], [runs[i][1].finite for i in own]
            t, k = choose(simulate_halving(method.halving, runs[own[0]][1].steps, scores, hold.rows), finite)
            held = 100 * tests[own[t]][k]
            t_full, k_full = choose(scores, finite)
            (none_i,) = [
                i for i, (v, _) in enumerate(runs) if all(v[key] == _fixed(method, key) for key in v)
            ]
            none = 100 * tests[none_i][-1]
            best_i, best_k = max(
                ((i, j) for i in range(len(runs)) for j in range(1, len(tests[i]))),
                key=lambda p: tests[p[0]][p[1]],
            )
            oracle_point = {**runs[best_i][0], "step": runs[best_i][1].steps[best_k]}
            oracle = 100 * tests[best_i][best_k]
            longer = _longer(cache_dir, domain, m, runs[best_i][0], cfg, dt, sweep.steps(n))
            if longer[0] > oracle:
                oracle, oracle_point = longer[0], {**runs[best_i][0], "step": longer[1], "longer": LONGER}
            result[m] = {
                "hold": held,
                "hold_full": 100 * tests[own[t_full]][k_full],
                "none": none,
                "oracle": oracle,
                "oracle_point": oracle_point,
                "hold_point": {**runs[own[t]][0], "step": runs[own[t]][1].steps[k]},
                "flags": [] if runs[own[t]][1].finite else ["non-finite loss"],
            }
        t0 = time.perf_counter()
        weak_cells = [
            Cell.of(TrainConfig(m, domain, cache_dir, seed=cfg.seed, overrides=extra, select="weak"))
            for m in sweeps
        ]
        for m, rec in zip(sweeps, train_cells(weak_cells, dt, out_dir), strict=True):
            result[m]["weak"] = 100 * rec["metrics"]["test_acc"]
        weak_seconds = time.perf_counter() - t0
    finally:
        if flush:
            torch.set_flush_denormal(False)
        shutil.rmtree(out_dir, ignore_errors=True)  # the records are summarised here, not kept
    flag_collapses(result)
    t0 = time.perf_counter()
    lr = logreg_reference(dt)
    lr["seconds"] = time.perf_counter() - t0
    if "ceiling-lp" in result:  # the CLIP paper's probe protocol against the AdamW ceiling, under hold
        lr["ceiling_lp_gap"] = lr["test_acc"] - result["ceiling-lp"]["hold"]
    return {
        "weak": weak_acc,
        "zeroshot": zs_acc,
        "rows": {"train": n, "hold": len(dt.hold), "test": len(dt.test)},
        "dim": dt.data.dim,
        "classes": dt.data.num_classes,
        "methods": result,
        "logreg": lr,
        "seconds": {"sweep": sweep_seconds, "weak": weak_seconds},
    }


def logreg_reference(dt: Any) -> dict[str, Any]:
    """The CLIP paper's linear probe on the domain's ground truth (L-BFGS, L2 strength chosen on hold):
    test accuracy (%), the chosen strength and its hold accuracy."""
    from cpl_cache.train.logreg import logreg_probe

    y_train = dt.truth_train.argmax(dim=1)
    r = logreg_probe(dt.x_train, y_train, dt.x_hold, dt.y_hold, dt.x_test, dt.y_test, dt.data.num_classes)
    return {"test_acc": 100 * r.test_acc, "lam": r.lam, "hold_acc": 100 * r.hold_acc}


def flag_collapses(result: dict[str, dict[str, Any]]) -> None:
    """Regret per protocol, and `vs_naive` (hold accuracy minus naive-lp's) for every weak-supervised
    linear probe, flagged as collapsed when more than COLLAPSE_GAP points below: selection cannot
    rescue a method whose every candidate collapses."""
    from cpl_cache.train.methods import METHODS

    naive = result.get("naive-lp", {}).get("hold")
    for m, r in result.items():
        for p in ("hold", "hold_full", "weak", "none"):
            r[f"regret_{p}"] = r["oracle"] - r[p]
        r["halving_cost"] = r["hold_full"] - r["hold"]
        same_head = METHODS[m].head == METHODS["naive-lp"].head  # a collapse shows against its own head
        if naive is not None and m != "naive-lp" and same_head and not METHODS[m].uses_ground_truth:
            r["vs_naive"] = r["hold"] - naive
            if r["vs_naive"] < -COLLAPSE_GAP:
                r["flags"].append(f"collapsed: {-r['vs_naive']:.1f} points below naive-lp")


def _fixed(method: Any, key: str) -> float:
    from cpl_cache.train.methods import loss_constants

    if key in ("lr", "weight_decay"):
        return getattr(method, key)
    return {**loss_constants(method.loss), **method.loss_args}[key]


def _longer(cache_dir: Path, domain: str, m: str, values: dict, cfg: RegretConfig, dt: Any, budget: int):
    """The best test accuracy (%) and its step of one run LONGER times the budget at `values`."""
    from cpl_cache.train.trainer import Cell, TrainConfig, train_stack

    overrides = {**dict(cfg.overrides), **values, "min_steps": LONGER * budget}
    cell = Cell.of(TrainConfig(m, domain, cache_dir, seed=cfg.seed, overrides=overrides, select="none"))
    (tr,) = train_stack([cell], dt, cell.steps(len(dt.train)), [None])
    accs = [_accuracy(tr, k, dt.x_test, dt.y_test) for k in range(1, len(tr.steps))]
    j = max(range(len(accs)), key=accs.__getitem__)
    return 100 * accs[j], tr.steps[j + 1]


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Max and median regret per protocol, over all caches and per half."""
    out: dict[str, Any] = {}
    halves = {"all": list(report["caches"])}
    for name, c in report["caches"].items():
        halves.setdefault(c["half"], []).append(name)
    for half, names in halves.items():
        out[half] = {}
        for p in ("hold", "hold_full", "weak", "none"):
            vals = [r[f"regret_{p}"] for n in names for r in report["caches"][n]["methods"].values()]
            if vals:
                out[half][p] = {"max": max(vals), "median": statistics.median(vals), "n": len(vals)}
        cost = [r["halving_cost"] for n in names for r in report["caches"][n]["methods"].values()]
        if cost:  # what successive halving gives up against the full search, in points of test accuracy
            out[half]["halving_cost"] = {"max": max(cost), "median": statistics.median(cost), "n": len(cost)}
    return out


def format_table(report: dict[str, Any]) -> str:
    """One row per (cache, method): hold, weak, none, oracle and regret (points)."""
    lines = [
        "| cache (half) | weak | zero-shot | method | hold | hold, no halving | weak sel. | none | oracle | "
        "regret hold | regret weak | regret none | flags |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, c in report["caches"].items():
        if "logreg" in c:
            probe = c["logreg"]["test_acc"]
            lines.append(
                f"| {name} ({c['half']}) | | | L-BFGS logistic regression | {probe:.1f} | | | | | | | | |"
            )
        for m, r in c["methods"].items():
            lines.append(
                f"| {name} ({c['half']}) | {c['weak']:.1f} | {c['zeroshot']:.1f} | {m} | {r['hold']:.1f} | "
                f"{r.get('hold_full', r['hold']):.1f} | {r['weak']:.1f} | {r['none']:.1f} | "
                f"{r['oracle']:.1f} | {r['regret_hold']:.1f} | "
                f"{r['regret_weak']:.1f} | {r['regret_none']:.1f} | {'; '.join(r['flags'])} |"
            )
    s = report.get("summary", {})
    for half, per in s.items():
        lines.append("")
        lines.append(
            f"{half}: "
            + "; ".join(
                f"{p.replace('_', ' ')}{'' if p == 'halving_cost' else ' regret'} max {v['max']:.1f}, "
                f"median {v['median']:.1f} (n={v['n']})"
                for p, v in per.items()
            )
        )
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """One row per cache: the weak model, CPL under hold, each protocol's largest and median regret over
    the methods, and ceiling-lp against the L-BFGS probe (points)."""
    lines = [
        "| cache | half | train x dim x K | weak | CPL (hold) | hold regret max / median | weak regret max / "
        "median | none regret max / median | ceiling-lp - L-BFGS |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in report["caches"].items():
        ms = c["methods"].values()
        cells = []
        for p in ("hold", "weak", "none"):
            vals = [r[f"regret_{p}"] for r in ms]
            cells.append(f"{max(vals):.1f} / {statistics.median(vals):.1f}")
        cpl = c["methods"].get("cpl", {}).get("hold")
        gap = -c["logreg"]["ceiling_lp_gap"] if "ceiling_lp_gap" in c.get("logreg", {}) else None
        lines.append(
            f"| {name} | {c['half']} | {c['rows']['train']:,} x {c['dim']} x {c['classes']} | "
            + f"{c['weak']:.1f} | "
            + ("—" if cpl is None else f"{cpl:.1f}")
            + f" | {' | '.join(cells)} | "
            + ("—" if gap is None else f"{gap:+.1f}")
            + " |"
        )
    return "\n".join(lines)


def run_regret(cfg: RegretConfig) -> dict[str, Any]:
    """The benchmark over `cfg.caches`, writing the JSON after every cache; returns the report."""
    from cpl_cache.synth.zoo import ZOO, write_zoo_cache

    for name in cfg.caches:
        if name not in ZOO:
            from cpl_cache.errors import UserError

            raise UserError(f"unknown zoo cache {name!r}; choose from {', '.join(ZOO)}")
    import torch

    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "precision": cfg.precision,
        "seed": cfg.seed,
        "scale": cfg.scale,
        "longer": LONGER,
        "goals": {"max": GOAL_MAX, "median": GOAL_MEDIAN},
        "caches": {},
    }
    scratch = None if cfg.work else tempfile.TemporaryDirectory(prefix="zoo-")  # caches of up to ~100 MB
    work = Path(cfg.work) if cfg.work else Path(scratch.name)
    try:
        t_all = time.perf_counter()
        for name in cfg.caches:
            t0 = time.perf_counter()
            write_zoo_cache(work, name, seed=cfg.seed, scale=cfg.scale, overwrite=True)
            c = cache_regret(work, name, cfg)
            c.update(half=ZOO[name].half, summary=ZOO[name].summary, wall=time.perf_counter() - t0)
            report["caches"][name] = c
            report["summary"] = summarise(report)
            report["seconds"] = time.perf_counter() - t_all
            cfg.out.parent.mkdir(parents=True, exist_ok=True)
            cfg.out.write_text(json.dumps(report, indent=1) + "\n")
            worst = max(c["methods"].items(), key=lambda kv: kv[1]["regret_hold"])
            if cfg.progress:
                print(
                    f"{name}: {c['wall']:.0f} s; weak {c['weak']:.1f}; worst hold regret "
                    f"{worst[1]['regret_hold']:.1f} ({worst[0]})",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if scratch is not None:
            scratch.cleanup()
    return report
