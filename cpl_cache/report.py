"""Table 2 and Figure 2 from the results files: accuracy per domain over seeds, PGR, training curves.

The table is computed once (`build_table`, a JSON-ready dict) and rendered as markdown, CSV or JSON.
Rows: the weak model, zero-shot CLIP, the weak-supervised baselines, CPL, the strong ceiling; any other
method in the results joins in a sensible place. PGR = (acc - weak) / (ceiling - weak) per domain and
seed, from the weak and ceiling runs of the same seed.

A run whose results carry `flags` (training saw it diverge or collapse: "non-finite loss", ...) marks
its cells with a trailing `!`, and a footnote lists each flagged run; CSV has a `flags` column. Warnings
about the table as a whole (cells from a stale cache, ...) are returned apart from it, for stderr.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cpl_cache.errors import UserError

DOMAINNET = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
FORMATS = ("markdown", "csv", "json")
WEAK, ZEROSHOT, CEILING = "weak", "zeroshot", "ceiling"
_LOSS_ORDER = ("naive", "soft", "hard", "kd", "auxconf", "augconf", "adaptconf")
_LOSS_LABEL = {
    "naive": "Naive", "soft": "Soft", "hard": "Hard", "kd": "KD",
    "auxconf": "AuxConf", "augconf": "AugConf", "adaptconf": "AdaptConf",
}  # fmt: skip
_HEAD_ORDER = ("lp", "tp")
_LABELS = {WEAK: "Weak", ZEROSHOT: "Zero-shot", "cpl": "CPL", CEILING: "Strong ceiling"}
DEFAULT_CURVES = ("auxconf-lp", "auxconf-tp", "cpl")
_EPS = 1e-12


# ------------------------------------------------------------------------------------ methods


def base_method(method: str) -> str:
    """The registered method behind a run name: `cpl+epochs=5` -> `cpl` (the trainer appends overrides)."""
    return method.split("+", 1)[0]


def method_kind(method: str) -> str:
    """`reference` (weak, zero-shot: no training), `ceiling` (ground truth) or `weak-supervised`.

    The registry says which a method is; a name it does not know (results of a method since removed)
    is judged by its name.
    """
    from cpl_cache.train.methods import METHODS  # torch-free

    method = base_method(method)
    registered = METHODS.get(method)
    if registered is not None:
        if not registered.trains:
            return "reference"
        return "ceiling" if registered.uses_ground_truth else "weak-supervised"
    if method in (WEAK, ZEROSHOT):
        return "reference"
    if method == CEILING or method.startswith(CEILING + "-"):
        return "ceiling"
    return "weak-supervised"


def method_label(method: str) -> str:
    """The paper's name for a method: `auxconf-lp` -> AuxConf+LP, `cpl+epochs=5` -> CPL (epochs=5)."""
    parts = _SETTING.split(method)  # `+key=value` settings; a value may hold "+" itself (lr=1e+30)
    label = _base_label(parts[0])
    return f"{label} ({', '.join(parts[1:])})" if len(parts) > 1 else label


_SETTING = re.compile(r"\+(?=[A-Za-z_]\w*=)")


def _base_label(method: str) -> str:
    if method in _LABELS:
        return _LABELS[method]
    if method.startswith(CEILING + "-"):
        return f"Strong ceiling ({method[len(CEILING) + 1 :].upper()})"
    loss, _, head = method.rpartition("-")
    if loss in _LOSS_LABEL and head:
        return f"{_LOSS_LABEL[loss]}+{head.upper()}"
    return method


def method_order(method: str) -> tuple:
    """Sort key: weak, zero-shot, LP baselines, TP baselines, other methods, CPL, the ceilings;
    a variant (`cpl+epochs=5`) right after its method."""
    return (*_base_order(base_method(method)), method)


def _base_order(method: str) -> tuple:
    if method == WEAK:
        return (0,)
    if method == ZEROSHOT:
        return (1,)
    if method_kind(method) == "ceiling":
        return (5, method != CEILING, method)
    if method == "cpl" or method.startswith("cpl-"):
        return (4, method != "cpl", method)
    loss, _, head = method.rpartition("-")
    if loss in _LOSS_ORDER:
        head_rank = _HEAD_ORDER.index(head) if head in _HEAD_ORDER else len(_HEAD_ORDER)
        return (2, head_rank, _LOSS_ORDER.index(loss), method)
    return (3, method)


def domain_order(domain: str) -> tuple:
    """DomainNet's six domains in the paper's order, any other domain after them by name."""
    return (0, DOMAINNET.index(domain), "") if domain in DOMAINNET else (1, 0, domain)


# ------------------------------------------------------------------------------------ loading


def _check_record(rec: Any, path: Path) -> dict[str, Any]:
    fix = f"delete {path} and rerun `cpl-cache run` to recompute it"
    if not isinstance(rec, dict):
        raise UserError(f"{path} is not a results record; {fix}")
    for key, typ in (("domain", str), ("method", str), ("seed", int)):
        if not isinstance(rec.get(key), typ) or isinstance(rec.get(key), bool):
            raise UserError(f"{path} has no valid `{key}`; {fix}")
    acc = (rec.get("metrics") or {}).get("test_acc") if isinstance(rec.get("metrics"), dict) else None
    if not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
        raise UserError(f"{path} has no metrics.test_acc in [0, 1]; {fix}")
    flags = rec.get("flags")
    if flags is not None and (not isinstance(flags, list) or not all(isinstance(f, str) for f in flags)):
        raise UserError(f"{path} has `flags` that are not a list of strings; {fix}")
    return rec


def run_flags(rec: dict[str, Any]) -> list[str]:
    """What training flagged about a run ("non-finite loss", ...); empty for a healthy run."""
    return [f for f in rec.get("flags") or [] if f.strip()]


def run_label(domain: str, method: str, seed: int) -> str:
    """How the table names one run: `clipart/cpl-seed1`, as its results file is named."""
    return f"{domain}/{method}-seed{seed}"


def load_results(results_dir: Path | str) -> list[dict[str, Any]]:
    """Every `{domain}/{method}-seed{seed}.json` under the results folder, checked."""
    root = Path(results_dir)
    hint = f"run `cpl-cache run pipelines/table2.toml --cache-dir CACHE --results {root}` first"
    if not root.is_dir():
        raise UserError(f"results folder {root} does not exist; {hint}")
    records, seen = [], {}
    for path in sorted(root.glob("*/*.json")):
        if path.name.startswith("."):
            continue  # a result being written
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UserError(
                f"{path} is not readable JSON ({err}); delete it, rerun `cpl-cache run`"
            ) from None
        rec = _check_record(rec, path)
        key = (rec["domain"], rec["method"], rec["seed"])
        if key in seen:
            raise UserError(f"{path} and {seen[key]} both hold {key[0]}/{key[1]} seed {key[2]}; remove one")
        seen[key] = path
        records.append(rec)
    if not records:
        raise UserError(f"no results under {root}; {hint}")
    return records


# ------------------------------------------------------------------------------------ the table


def _stat(values: dict[int, float]) -> dict[str, Any]:
    vals = [values[s] for s in sorted(values)]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
        "seeds": sorted(values),
    }


def _pgr(
    acc: dict[int, float], weak: dict[int, float] | None, ceiling: dict[int, float] | None
) -> float | None:
    """PGR averaged over seeds; each seed uses the ceiling of the same seed and the weak of the same seed
    (the weak model's mean when that seed has no weak run: its accuracy does not depend on the seed)."""
    if not weak or not ceiling:
        return None
    weak_mean = statistics.fmean(weak.values())
    per_seed = []
    for seed, a in acc.items():
        if seed not in ceiling:
            continue
        w, c = weak.get(seed, weak_mean), ceiling[seed]
        if c - w > _EPS:  # a ceiling at or below the weak model leaves no gap to recover: PGR is undefined
            per_seed.append((a - w) / (c - w))
    return statistics.fmean(per_seed) if per_seed else None


def reference(methods: Iterable[str], name: str) -> str | None:
    """The run that stands for method `name`: itself, else its one variant (e.g. `ceiling+epochs=5`)."""
    methods = list(methods)
    if name in methods:
        return name
    variants = [m for m in methods if base_method(m) == name]
    return variants[0] if len(variants) == 1 else None


def build_table(records: Iterable[dict[str, Any]], *, ceiling: str = CEILING) -> dict[str, Any]:
    """The table as a JSON-ready dict: accuracy (%) per method and domain over seeds, Avg, PGR, best marks."""
    acc: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    caches: dict[str, set[str]] = defaultdict(set)
    flagged: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)  # (method, domain) -> runs
    protocols: dict[str, set[str]] = defaultdict(set)  # method -> how its runs chose their point
    for rec in records:
        acc[rec["method"]][rec["domain"]][rec["seed"]] = 100.0 * float(rec["metrics"]["test_acc"])
        if selection_protocol(rec) is not None:
            protocols[rec["method"]].add(selection_protocol(rec))
        if run_flags(rec):
            run = {"domain": rec["domain"], "method": rec["method"], "seed": rec["seed"]}
            flagged[rec["method"], rec["domain"]].append({**run, "flags": run_flags(rec)})
        fp = (rec.get("cache") or {}).get("fingerprint") if isinstance(rec.get("cache"), dict) else None
        caches[rec["domain"]].add(str(fp))
    if not acc:
        raise UserError("no results to tabulate; run `cpl-cache run` first")
    domains = sorted({d for per in acc.values() for d in per}, key=domain_order)
    methods = sorted(acc, key=method_order)
    all_seeds = sorted({s for per in acc.values() for v in per.values() for s in v})
    max_n = max(len(v) for per in acc.values() for v in per.values())

    weak_acc, ceil_acc = acc.get(WEAK, {}), acc.get(reference(methods, ceiling) or "", {})
    rows = []
    for m in methods:
        cells: dict[str, Any] = {d: (_stat(acc[m][d]) if acc[m].get(d) else None) for d in domains}
        for d in domains:
            if cells[d] is not None:
                cells[d]["flagged"] = sorted(flagged.get((m, d), []), key=lambda run: run["seed"])
        row_flagged = [run for d in domains if cells[d] is not None for run in cells[d]["flagged"]]
        avg = None
        if all(cells[d] is not None for d in domains):
            seed_sets = {tuple(cells[d]["seeds"]) for d in domains}
            avg = {
                "mean": statistics.fmean(cells[d]["mean"] for d in domains),
                "std": None,
                "n": min(cells[d]["n"] for d in domains),
                "seeds": sorted(set.intersection(*(set(cells[d]["seeds"]) for d in domains))),
                "flagged": row_flagged,
            }
            if len(seed_sets) == 1 and avg["n"] > 1:
                per_seed = [statistics.fmean(acc[m][d][s] for d in domains) for s in avg["seeds"]]
                avg["std"] = statistics.stdev(per_seed)
        cells["avg"] = avg
        pgr = None
        if method_kind(m) == "weak-supervised":
            pgr = {
                d: _pgr(acc[m][d], weak_acc.get(d), ceil_acc.get(d)) if acc[m].get(d) else None
                for d in domains
            }
            defined = [v for v in pgr.values() if v is not None]
            pgr["avg"] = statistics.fmean(defined) if defined else None
        row = {
            "method": m, "label": method_label(m), "kind": method_kind(m), "cells": cells, "pgr": pgr,
            "flagged": row_flagged, "select": sorted(protocols.get(m, ())),
        }  # fmt: skip
        rows.append({**row, "best": []})

    # Mark the best weak-supervised value of every column (ties all marked); a cell with a flagged run
    # (diverged or collapsed) is never marked, nor a row with one in its Avg or PGR.
    w2s = [r for r in rows if r["kind"] == "weak-supervised"]
    for col in [*domains, "avg"]:
        ok = [r for r in w2s if r["cells"][col] is not None and not r["cells"][col]["flagged"]]
        vals = [r["cells"][col]["mean"] for r in ok]
        for r in ok:
            if r["cells"][col]["mean"] >= max(vals) - _EPS:
                r["best"].append(col)
    ok = [r for r in w2s if r["pgr"]["avg"] is not None and not r["flagged"]]
    pgrs = [r["pgr"]["avg"] for r in ok]
    for r in ok:
        if r["pgr"]["avg"] >= max(pgrs) - _EPS:
            r["best"].append("pgr")

    seeds_txt = ", ".join(map(str, all_seeds))
    notes = [
        f"Top-1 test accuracy (%): mean ± sample standard deviation (ddof=1) over seeds {seeds_txt}; "
        "a cell with one seed has no ±.",
        "Avg: mean over the domains of the per-domain means (± over seeds of the per-seed averages); "
        "— where a method lacks a domain.",
        (
            f"PGR = (acc − weak) / (ceiling − weak) with `{reference(methods, ceiling)}` as the ceiling, per "
            "domain and seed from the runs of the same seed, averaged over seeds, then over domains; "
            "undefined (—) where the ceiling is not above the weak model."
            if reference(methods, ceiling) is not None
            else f"PGR: not computed, the results hold no `{ceiling}` run to measure the gap against."
        ),
        "Bold: the best weak-supervised result of each column, among cells with no flagged run.",
    ]
    if any(r["select"] for r in rows):
        notes.append(_selection_note(rows))
    if any(c is not None and c["n"] < max_n for r in rows for k, c in r["cells"].items() if k != "avg"):
        notes.append("†: fewer seeds than other cells of the table.")
    all_flagged = [run for r in rows for run in r["flagged"]]
    all_flagged.sort(key=lambda run: (domain_order(run["domain"]), method_order(run["method"]), run["seed"]))
    if all_flagged:
        notes.append(
            "!: a run of the cell was flagged in training (diverged or collapsed), so its numbers are "
            "suspect; the flagged runs:"
        )
        notes += [f"!  {_flagged_line(run)}" for run in all_flagged]
    # About the table as a whole, not part of it: the command prints these on stderr.
    warnings = []
    mean = statistics.fmean
    below = [d for d in domains if weak_acc.get(d) and ceil_acc.get(d)]
    below = [d for d in below if mean(ceil_acc[d].values()) < mean(weak_acc[d].values())]
    if below:
        warnings.append(f"the ceiling is below the weak model on {', '.join(below)}; PGR there means little")
    mixed = sorted(d for d, fps in caches.items() if len(fps) > 1)
    if mixed:
        warnings.append(
            f"results of {', '.join(mixed)} come from more than one cache; "
            "rerun `cpl-cache run` to recompute stale cells"
        )
    if all_flagged:
        warnings.append(
            f"{len(all_flagged)} run(s) flagged in training (diverged or collapsed), marked ! in the table: "
            + ", ".join(run_label(r["domain"], r["method"], r["seed"]) for r in all_flagged)
        )
    return {
        "metric": "top-1 test accuracy (%)",
        "domains": domains,
        "seeds": all_seeds,
        "max_seeds": max_n,
        "ceiling": ceiling,
        "has_pgr": any(r["pgr"] is not None and r["pgr"]["avg"] is not None for r in rows),
        "rows": rows,
        "flagged": all_flagged,
        "notes": notes,
        "warnings": warnings,
    }


PROTOCOL_TEXT = {
    "hold": "hold (step size and stopping point by accuracy on the hold rows' ground truth)",
    "weak": "weak (by agreement with the weak labels of train rows held out)",
    "none": "none (the registry's fixed values)",
}


def selection_protocol(rec: dict[str, Any]) -> str | None:
    """How a run chose its reported point: hold, weak or none; None for a method that trains nothing.
    A record from before selection was recorded trained the fixed values."""
    sel = rec.get("selection")
    if isinstance(sel, dict) and "protocol" in sel:
        return sel["protocol"]
    return None if rec.get("hparams", {}).get("loss") is None and rec.get("steps", 0) == 0 else "none"


def _selection_note(rows: list[dict[str, Any]]) -> str:
    """Which protocol chose each trained row's numbers: one line when they all agree."""
    trained = [r for r in rows if r["select"]]
    kinds = {p for r in trained for p in r["select"]}
    if len(kinds) <= 1 and all(len(r["select"]) == 1 for r in trained):
        what = PROTOCOL_TEXT.get(next(iter(kinds)), next(iter(kinds)))
        return f"Selection of every trained row: {what}; test rows never read before the choice."
    per = "; ".join(f"{r['label']}: {', '.join(r['select'])}" for r in trained)
    return f"Selection differs between rows (hold, weak or none; a row listing two mixes them): {per}."


def _flagged_line(run: dict[str, Any]) -> str:
    """`clipart/cpl-seed1: non-finite loss` (several flags joined by `; `)."""
    return f"{run_label(run['domain'], run['method'], run['seed'])}: {'; '.join(run['flags'])}"


def _fmt_cell(cell: dict[str, Any] | None, max_n: int, bold: bool, dagger: bool = True) -> str:
    if cell is None:
        return "—"
    text = f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")
    if dagger and cell["n"] < max_n:
        text += "†"
    if cell.get("flagged"):
        text += "!"
    return f"**{text}**" if bold else text


def to_markdown(table: dict[str, Any]) -> str:
    """A GitHub markdown table with its footnotes."""
    cols = [*table["domains"], "avg"]
    head = ["Method", *table["domains"], "Avg"] + (["PGR"] if table["has_pgr"] else [])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in table["rows"]:
        cells = [
            _fmt_cell(r["cells"][c], table["max_seeds"], c in r["best"], dagger=c != "avg") for c in cols
        ]
        if table["has_pgr"]:
            p = r["pgr"]["avg"] if r["pgr"] else None
            text = "—" if p is None else f"{p:.3f}" + ("!" if r["flagged"] else "")
            cells.append(f"**{text}**" if p is not None and "pgr" in r["best"] else text)
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(table["notes"]) + "\n"


def to_csv(table: dict[str, Any]) -> str:
    """One row per method: percent (PGR a fraction), empty where undefined; `best` names the columns,
    `flags` lists the row's flagged runs (`clipart/cpl-seed1: non-finite loss`, joined by ` | `)."""

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    cols = [*table["domains"], "avg"]
    header = ["method", "label", "kind"]
    for c in cols:
        header += [c, f"{c}_std", f"{c}_n"]
    header += ["pgr", "best", "flags", "select"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in table["rows"]:
        row = [r["method"], r["label"], r["kind"]]
        for c in cols:
            cell = r["cells"][c]
            row += [num(cell["mean"]), num(cell["std"]), str(cell["n"])] if cell else ["", "", ""]
        row += [num(r["pgr"]["avg"] if r["pgr"] else None), ";".join(r["best"])]
        row.append(" | ".join(_flagged_line(run) for run in r["flagged"]))
        row.append(";".join(r["select"]))
        w.writerow(row)
    return buf.getvalue()


def render_table_and_warnings(
    results_dir: Path | str, fmt: str = "markdown", *, ceiling: str = CEILING
) -> tuple[str, list[str]]:
    """Load the results folder and render the table as markdown, csv or json; with the warnings about
    it (stale cells, flagged runs, ...), which the text leaves out in every format (for stderr)."""
    if fmt not in FORMATS:
        raise UserError(
            f"unknown table format {fmt!r}; use --format {', '.join(FORMATS[:-1])} or {FORMATS[-1]}"
        )
    table = build_table(load_results(results_dir), ceiling=ceiling)
    if fmt == "json":
        shown = {k: v for k, v in table.items() if k != "warnings"}
        text = json.dumps(shown, indent=1, ensure_ascii=False) + "\n"
    else:
        text = to_csv(table) if fmt == "csv" else to_markdown(table)
    return text, list(table["warnings"])


def render_table(results_dir: Path | str, fmt: str = "markdown", *, ceiling: str = CEILING) -> str:
    """Load the results folder and render the table as markdown, csv or json (without the warnings)."""
    return render_table_and_warnings(results_dir, fmt, ceiling=ceiling)[0]


# ------------------------------------------------------------------------------------ the plot


def _curve(rec: dict[str, Any]) -> tuple[list[float], list[float], list[float]]:
    pts = [p for p in rec.get("curve") or [] if isinstance(p, dict) and "step" in p]
    steps = [float(p["step"]) for p in pts]
    train = [100.0 * p["train_acc"] if p.get("train_acc") is not None else math.nan for p in pts]
    test = [100.0 * p["test_acc"] if p.get("test_acc") is not None else math.nan for p in pts]
    return steps, train, test


def plot_curves(
    results_dir: Path | str,
    domain: str,
    out: Path | str,
    *,
    methods: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """Figure 2: train accuracy (agreement with weak labels) and test accuracy against training step,
    with dashed lines at the weak and ceiling test accuracies; writes a PNG (or PDF/SVG by suffix)."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UserError(f"--out {out} must end in .png, .pdf or .svg")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError(
            "plotting needs matplotlib; install the plot extra: pip install 'cpl-cache[plot]'"
        ) from None

    records = load_results(results_dir)
    domains = sorted({r["domain"] for r in records}, key=domain_order)
    if domain not in domains:
        raise UserError(
            f"no results for domain {domain!r} in {results_dir}; domains with results: {', '.join(domains)}"
        )
    here = {r["method"]: r for r in records if r["domain"] == domain and r["seed"] == seed}
    if not here:
        seeds = sorted({r["seed"] for r in records if r["domain"] == domain})
        raise UserError(
            f"no {domain} results for seed {seed}; pass --seed, one of {', '.join(map(str, seeds))}"
        )
    with_curves = sorted((m for m, r in here.items() if _curve(r)[0]), key=method_order)
    if methods is None:
        methods = sorted(
            (m for m in with_curves if base_method(m) in DEFAULT_CURVES),
            key=lambda m: (DEFAULT_CURVES.index(base_method(m)), m),
        )
        if not methods:
            raise UserError(
                f"none of the default methods ({', '.join(DEFAULT_CURVES)}) has a curve for {domain} "
                f"seed {seed}; pass --methods, from {', '.join(with_curves) or '(none)'}"
            )
    for m in methods:
        if m not in with_curves:
            raise UserError(
                f"no training curve for {m!r} on {domain} seed {seed}; methods with curves: "
                f"{', '.join(with_curves) or '(none)'}"
            )

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_train, ax_test = fig.subplots(1, 2)
    for m in methods:
        steps, train, test = _curve(here[m])
        label = method_label(m)
        (line,) = ax_train.plot(steps, train, marker="o", markersize=3, label=label)
        ax_test.plot(steps, test, marker="o", markersize=3, color=line.get_color(), label=label)
    # The weak model's accuracy does not depend on the seed: take any seed's run when this one has none.
    weak = here.get(WEAK) or next((r for r in records if r["domain"] == domain and r["method"] == WEAK), None)
    ceiling = here.get(reference(here, CEILING) or "")
    for rec, name, color in ((weak, "Weak", "tab:gray"), (ceiling, "Strong ceiling", "black")):
        if rec is not None:
            acc = 100.0 * rec["metrics"]["test_acc"]
            ax_test.axhline(acc, linestyle="--", linewidth=1.2, color=color, label=f"{name} ({acc:.2f}%)")
    ax_train.set_title("Train accuracy (agreement with weak labels)")
    ax_test.set_title("Test accuracy")
    for ax in (ax_train, ax_test):
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{domain}: weak-to-strong training curves (seed {seed})")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
