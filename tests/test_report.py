"""The table and the plot on made-up results files whose numbers the tests know."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cpl_cache.cli import app
from cpl_cache.errors import UserError
from cpl_cache.report import build_table, load_results, method_label, plot_curves, render_table

# Test accuracies (fractions) per method, domain and seed. `office` is not a DomainNet domain, so it
# goes after the six; `mine` is a method the report does not know; `cpl+epochs=5` is a variant.
SEEDS = (0, 1, 2)
ACC = {
    "weak": {"clipart": [0.50, 0.50, 0.50], "quickdraw": [0.40, 0.40, 0.40], "office": [0.30, 0.30, 0.30]},
    "zeroshot": {"clipart": [0.45] * 3, "quickdraw": [0.20] * 3, "office": [0.60] * 3},
    "naive-lp": {
        "clipart": [0.52, 0.54, 0.53],
        "quickdraw": [0.41, 0.43, 0.45],
        "office": [0.35, 0.36, 0.31],
    },
    "auxconf-lp": {
        "clipart": [0.55, 0.51, 0.56],
        "quickdraw": [0.44, 0.40, 0.42],
        "office": [0.33, 0.34, 0.38],
    },
    "mine": {"clipart": [0.51, 0.52, 0.50], "quickdraw": [0.47, 0.46, 0.48], "office": [0.31, 0.30, 0.32]},
    "cpl": {"clipart": [0.58, 0.57, 0.59], "quickdraw": [0.46, 0.45, 0.44], "office": [0.37, 0.39, 0.38]},
    "cpl+epochs=5": {
        "clipart": [0.56, 0.56, 0.56],
        "quickdraw": [0.43, 0.43, 0.43],
        "office": [0.36, 0.36, 0.36],
    },
    "ceiling": {"clipart": [0.60, 0.62, 0.61], "quickdraw": [0.50, 0.52, 0.48], "office": [0.40, 0.42, 0.41]},
}
ORDER = ["weak", "zeroshot", "naive-lp", "auxconf-lp", "mine", "cpl", "cpl+epochs=5", "ceiling"]
W2S = ["naive-lp", "auxconf-lp", "mine", "cpl", "cpl+epochs=5"]
DOMAINS = ["clipart", "quickdraw", "office"]


def write_record(
    root: Path, method: str, domain: str, seed: int, acc: float, curve=None, *, flags=None, fingerprint=None
) -> Path:
    rec = {
        "domain": domain, "method": method, "base_method": method.split("+")[0], "head": "proto",
        "loss": "kd",
        "seed": seed, "hparams": {}, "metrics": {"test_acc": acc, "weak_agreement": 0.5},
        "curve": curve or [], "seconds": 0.1, "device": "cpu",
        "cache": {"fingerprint": fingerprint or f"fp-{domain}"},
    }  # fmt: skip
    if flags is not None:
        rec["flags"] = flags
    path = root / domain / f"{method}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for method, per in ACC.items():
        for domain, accs in per.items():
            for seed, acc in zip(SEEDS, accs, strict=True):
                write_record(root, method, domain, seed, acc)
    return root


def ref_pgr(method: str) -> dict[str, float]:
    """PGR by its definition: per domain and seed against that seed's weak and ceiling, then averaged."""
    out = {}
    for d in DOMAINS:
        a, w, c = (np.array(ACC[m][d]) for m in (method, "weak", "ceiling"))
        out[d] = float(np.mean((a - w) / (c - w)))
    out["avg"] = float(np.mean([out[d] for d in DOMAINS]))
    return out


def test_table_numbers_are_means_over_the_results_files(results: Path) -> None:
    table = json.loads(render_table(results, "json"))
    assert table["domains"] == DOMAINS  # DomainNet order first, other domains after
    assert [r["method"] for r in table["rows"]] == ORDER
    assert table["seeds"] == list(SEEDS)
    for row in table["rows"]:
        per = ACC[row["method"]]
        for d in DOMAINS:
            vals = 100 * np.array(per[d])
            cell = row["cells"][d]
            assert cell["mean"] == pytest.approx(vals.mean(), abs=1e-9)
            assert cell["std"] == pytest.approx(vals.std(ddof=1), abs=1e-9)
            assert cell["n"] == 3
        per_seed_avg = 100 * np.mean([per[d] for d in DOMAINS], axis=0)  # (seeds,)
        assert row["cells"]["avg"]["mean"] == pytest.approx(np.mean([np.mean(per[d]) * 100 for d in DOMAINS]))
        assert row["cells"]["avg"]["std"] == pytest.approx(per_seed_avg.std(ddof=1), abs=1e-9)


def test_pgr_follows_its_definition(results: Path) -> None:
    table = build_table(load_results(results))
    for row in table["rows"]:
        if row["method"] in W2S:
            want = ref_pgr(row["method"])
            for key, value in want.items():
                assert row["pgr"][key] == pytest.approx(value, abs=1e-12), (row["method"], key)
        else:
            assert row["pgr"] is None  # weak, zero-shot and the ceiling have no PGR


def test_best_weak_supervised_result_is_marked_per_column(results: Path) -> None:
    table = build_table(load_results(results))
    rows = {r["method"]: r for r in table["rows"]}
    for col in [*DOMAINS, "avg"]:
        means = {m: np.mean([np.mean(ACC[m][d]) for d in (DOMAINS if col == "avg" else [col])]) for m in W2S}
        best = max(means, key=means.get)
        assert [m for m in ORDER if col in rows[m]["best"]] == [best], col
    pgr = {m: ref_pgr(m)["avg"] for m in W2S}
    assert [m for m in ORDER if "pgr" in rows[m]["best"]] == [max(pgr, key=pgr.get)]
    # zero-shot is higher on office, but it is not weak-supervised, so it is never marked
    assert rows["zeroshot"]["best"] == [] and rows["ceiling"]["best"] == []
    assert rows["mine"]["best"] == ["quickdraw"]

    md = render_table(results, "markdown")
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "**58.00 ± 1.00**" in lines["CPL"]  # clipart: 58, 57, 59
    assert lines["Zero-shot"].count("**") == 0
    assert sum(line.count("**") for line in lines.values()) == 2 * 5  # four columns and PGR, one each


def test_markdown_rows_labels_and_footnotes(results: Path) -> None:
    md = render_table(results, "markdown")
    header, rule, *body = [line for line in md.splitlines() if line.startswith("|")]
    assert header == "| Method | clipart | quickdraw | office | Avg | PGR |"
    labels = [line.split(" | ")[0].lstrip("| ") for line in body]
    assert labels == ["Weak", "Zero-shot", "Naive+LP", "AuxConf+LP", "mine", "CPL", "CPL (epochs=5)",
                      "Strong ceiling"]  # fmt: skip
    assert "ddof=1" in md and "mean over the domains of the per-domain means" in md
    assert re.search(
        r"\| Weak \| 50\.00 ± 0\.00 \| 40\.00 ± 0\.00 \| 30\.00 ± 0\.00 \| 40\.00 ± 0\.00 \| — \|", md
    )


def test_csv_parses_and_matches_the_json(results: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(render_table(results, "csv"))))
    table = build_table(load_results(results))
    assert [r["method"] for r in rows] == ORDER
    for got, want in zip(rows, table["rows"], strict=True):
        for d in [*DOMAINS, "avg"]:
            assert float(got[d]) == pytest.approx(want["cells"][d]["mean"], abs=1e-4)
            assert float(got[f"{d}_std"]) == pytest.approx(want["cells"][d]["std"], abs=1e-4)
        assert got["best"].split(";") == (want["best"] or [""])
        assert got["pgr"] == ("" if want["pgr"] is None else f"{want['pgr']['avg']:.4f}")


def test_one_seed_cells_have_no_std_and_are_flagged(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for m, acc in (("weak", 0.4), ("cpl", 0.5), ("ceiling", 0.6)):
        write_record(root, m, "sketch", 0, acc)
    for seed in (0, 1):
        write_record(root, "kd-lp", "sketch", seed, 0.45 + seed / 100)
    table = build_table(load_results(root))
    cpl = next(r for r in table["rows"] if r["method"] == "cpl")
    assert cpl["cells"]["sketch"]["std"] is None and cpl["pgr"]["avg"] == pytest.approx(0.5)
    kd = next(r for r in table["rows"] if r["method"] == "kd-lp")
    assert kd["pgr"]["sketch"] == pytest.approx(0.25)  # only seed 0 has a ceiling run
    md = render_table(root, "markdown")
    assert "| CPL | **50.00†** |" in md and "fewer seeds" in md


def test_pgr_is_undefined_where_the_ceiling_equals_the_weak(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for domain, ceil in (("clipart", 0.5), ("real", 0.7)):
        write_record(root, "weak", domain, 0, 0.5)
        write_record(root, "ceiling", domain, 0, ceil)
        write_record(root, "cpl", domain, 0, 0.6)
    cpl = next(r for r in build_table(load_results(root))["rows"] if r["method"] == "cpl")
    assert cpl["pgr"]["clipart"] is None
    assert cpl["pgr"]["real"] == pytest.approx(0.5) and cpl["pgr"]["avg"] == pytest.approx(0.5)


def test_a_ceiling_run_with_overrides_stands_for_the_ceiling(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_record(root, "weak", "real", 0, 0.4)
    write_record(root, "ceiling+epochs=3", "real", 0, 0.8)
    write_record(root, "cpl+epochs=3", "real", 0, 0.5)
    table = build_table(load_results(root))
    assert [r["method"] for r in table["rows"]] == ["weak", "cpl+epochs=3", "ceiling+epochs=3"]
    assert table["rows"][1]["pgr"]["avg"] == pytest.approx(0.25)
    assert "with `ceiling+epochs=3` as the ceiling" in render_table(root)


def test_a_method_missing_a_domain_has_no_average(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_record(root, "cpl", "clipart", 0, 0.5)
    write_record(root, "cpl", "real", 0, 0.7)
    write_record(root, "kd-lp", "clipart", 0, 0.6)
    rows = {r["method"]: r for r in build_table(load_results(root))["rows"]}
    assert rows["kd-lp"]["cells"]["avg"] is None and rows["kd-lp"]["cells"]["real"] is None
    assert rows["cpl"]["cells"]["avg"]["mean"] == pytest.approx(60.0)
    assert "| KD+LP | **60.00** | — | — |" in render_table(root, "markdown")


def test_labels() -> None:
    names = ("auxconf-tp", "adaptconf-lp", "ceiling-lp", "cpl+loss=soft+epochs=3")
    want = ["AuxConf+TP", "AdaptConf+LP", "Strong ceiling (LP)", "CPL (loss=soft, epochs=3)"]
    assert [method_label(m) for m in names] == want


def test_bad_results_folders_are_refused_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["table", "--results", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output and len(res.output.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no results under"):
        render_table(tmp_path / "empty")
    bad = write_record(tmp_path / "r", "cpl", "real", 0, 0.5)
    bad.write_text("{not json")
    res = runner.invoke(app, ["table", "--results", str(tmp_path / "r")])
    assert res.exit_code == 2 and str(bad) in res.output and "Traceback" not in res.output
    bad.write_text(json.dumps({"domain": "real", "method": "cpl", "seed": 0, "metrics": {"test_acc": 7}}))
    with pytest.raises(UserError, match="test_acc"):
        render_table(tmp_path / "r")


def test_table_command_formats(results: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["table", "--results", str(results), "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.output)["domains"] == DOMAINS
    out = tmp_path / "t.csv"
    res = runner.invoke(app, ["table", "--results", str(results), "--format", "csv", "--out", str(out)])
    assert res.exit_code == 0 and out.read_text() == render_table(results, "csv")
    res = runner.invoke(app, ["table", "--results", str(results), "--format", "latex"])
    assert res.exit_code == 2


@pytest.mark.parametrize("fmt", ["xml", "latex", "Markdown"])
def test_an_unknown_format_is_refused_in_one_line(results: Path, fmt: str) -> None:
    res = CliRunner().invoke(app, ["table", "--results", str(results), "--format", fmt])
    assert res.exit_code == 2 and res.stdout == ""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "╭" not in res.output, res.output
    assert lines[0] == f"cpl-cache: error: unknown table format {fmt!r}; use --format markdown, csv or json"


# ------------------------------------------------------------------------------------ flagged runs


@pytest.fixture
def flagged(tmp_path: Path) -> Path:
    """Healthy runs but two: cpl seed 1 on clipart lost its loss, kd-lp seed 0 on real collapsed."""
    root = tmp_path / "flagged"
    collapsed = "collapsed: one class takes 97% of test predictions"
    for domain in ("clipart", "real"):
        for seed in (0, 1):
            write_record(root, "weak", domain, seed, 0.40)
            write_record(root, "ceiling", domain, seed, 0.80, flags=[])  # empty: healthy
            bad = domain == "clipart" and seed == 1
            write_record(root, "cpl", domain, seed, 0.60, flags=["non-finite loss"] if bad else None)
            bad = domain == "real" and seed == 0
            write_record(
                root, "kd-lp", domain, seed, 0.50, flags=[collapsed, "non-finite loss"] if bad else []
            )
    return root


def test_flagged_runs_mark_their_cells_and_are_listed_under_the_markdown_table(flagged: Path) -> None:
    md = render_table(flagged, "markdown")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| Method")}  # fmt: skip
    # clipart, real, Avg, PGR; a cell with a flagged run is never bold, so KD+LP is clipart's best
    assert rows["CPL"] == ["60.00 ± 0.00!", "**60.00 ± 0.00**", "60.00 ± 0.00!", "0.500! |"]
    assert rows["KD+LP"] == ["**50.00 ± 0.00**", "50.00 ± 0.00!", "50.00 ± 0.00!", "0.250! |"]
    for healthy in ("Weak", "Strong ceiling"):
        assert not any("!" in cell for cell in rows[healthy])
    notes = md.split("\n\n", 1)[1].splitlines()
    listed = notes[notes.index(next(n for n in notes if n.startswith("!: "))) + 1 :]
    assert listed == [
        "!  clipart/cpl-seed1: non-finite loss",
        "!  real/kd-lp-seed0: collapsed: one class takes 97% of test predictions; non-finite loss",
    ]


def test_flagged_runs_have_a_flags_column_in_csv_and_a_list_in_json(flagged: Path) -> None:
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(render_table(flagged, "csv")))}
    assert rows["cpl"]["flags"] == "clipart/cpl-seed1: non-finite loss"
    assert rows["kd-lp"]["flags"] == (
        "real/kd-lp-seed0: collapsed: one class takes 97% of test predictions; non-finite loss"
    )
    assert rows["weak"]["flags"] == rows["ceiling"]["flags"] == ""
    assert float(rows["cpl"]["clipart"]) == pytest.approx(60.0)  # the numbers stay numbers

    table = json.loads(render_table(flagged, "json"))
    assert [(r["domain"], r["method"], r["seed"]) for r in table["flagged"]] == [
        ("clipart", "cpl", 1), ("real", "kd-lp", 0),
    ]  # fmt: skip
    cpl = next(r for r in table["rows"] if r["method"] == "cpl")
    assert [run["seed"] for run in cpl["cells"]["clipart"]["flagged"]] == [1]
    assert cpl["cells"]["real"]["flagged"] == []


def test_a_healthy_table_has_no_marks(results: Path) -> None:
    md = render_table(results, "markdown")
    assert "!" not in md
    assert {r["flags"] for r in csv.DictReader(io.StringIO(render_table(results, "csv")))} == {""}


def test_flags_that_are_not_a_list_of_strings_are_refused(tmp_path: Path) -> None:
    for bad in ("non-finite loss", [1], {"loss": "nan"}):
        path = write_record(tmp_path / "r", "cpl", "real", 0, 0.5, flags=bad)
        with pytest.raises(UserError, match=f"{re.escape(str(path))} has `flags`"):
            load_results(tmp_path / "r")


# ------------------------------------------------------------------------------------ warnings


@pytest.mark.parametrize("fmt", ["markdown", "csv", "json"])
def test_warnings_go_to_stderr_and_stdout_is_the_table_alone(results: Path, tmp_path: Path, fmt: str) -> None:
    write_record(results, "cpl", "clipart", 0, 0.58, fingerprint="fp-older-cache")  # one stale cell
    res = CliRunner().invoke(app, ["table", "--results", str(results), "--format", fmt])
    assert res.exit_code == 0, res.output
    assert "more than one cache" not in res.stdout and "Warning" not in res.stdout
    assert res.stderr.splitlines() == [
        "cpl-cache: warning: results of clipart come from more than one cache; "
        "rerun `cpl-cache run` to recompute stale cells"
    ]
    if fmt == "csv":
        assert [r["method"] for r in csv.DictReader(io.StringIO(res.stdout))] == ORDER
    elif fmt == "json":
        assert "warnings" not in json.loads(res.stdout)
    else:
        assert res.stdout == render_table(results, "markdown")

    out = tmp_path / "t.md"
    res = CliRunner().invoke(app, ["table", "--results", str(results), "--format", fmt, "--out", str(out)])
    assert res.stdout == f"wrote {out}\n" and "more than one cache" in res.stderr
    assert "more than one cache" not in out.read_text()


def test_flagged_runs_are_also_named_on_stderr(flagged: Path) -> None:
    res = CliRunner().invoke(app, ["table", "--results", str(flagged), "--format", "csv"])
    assert res.exit_code == 0
    assert res.stderr == (
        "cpl-cache: warning: 2 run(s) flagged in training (diverged or collapsed), marked ! in the table: "
        "clipart/cpl-seed1, real/kd-lp-seed0\n"
    )


# ------------------------------------------------------------------------------------ the plot


def curve(start: float, end: float, steps: int = 6) -> list[dict]:
    frac = [i / steps for i in range(steps + 1)]
    return [
        {"step": 10 * i, "train_acc": start + (end - start) * f, "test_acc": start + (end - start) * f / 2}
        for i, f in enumerate(frac)
    ]


@pytest.fixture
def curves(tmp_path: Path) -> Path:
    root = tmp_path / "r"
    write_record(root, "weak", "painting", 0, 0.50)
    write_record(root, "ceiling", "painting", 0, 0.70, curve(0.3, 0.7))
    write_record(root, "auxconf-lp", "painting", 0, 0.55, curve(0.2, 0.6))
    write_record(root, "cpl", "painting", 0, 0.62, curve(0.4, 0.8))
    write_record(root, "kd-lp", "painting", 0, 0.53, curve(0.1, 0.5))
    return root


def test_plot_writes_a_png(curves: Path, tmp_path: Path) -> None:
    out = plot_curves(curves, "painting", tmp_path / "fig" / "painting.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    res = CliRunner().invoke(
        app, ["plot", "--results", str(curves), "--domain", "painting", "--methods", "kd-lp,cpl",
              "--out", str(tmp_path / "b.png")],
    )  # fmt: skip
    assert res.exit_code == 0 and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_refuses_what_it_cannot_draw(curves: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match="no training curve for 'weak'.*kd-lp, auxconf-lp, cpl, ceiling"):
        plot_curves(curves, "painting", tmp_path / "a.png", methods=["weak"])
    with pytest.raises(UserError, match="domains with results: painting"):
        plot_curves(curves, "sketch", tmp_path / "a.png")
    with pytest.raises(UserError, match="one of 0"):
        plot_curves(curves, "painting", tmp_path / "a.png", seed=3)
    with pytest.raises(UserError, match=r"\.png"):
        plot_curves(curves, "painting", tmp_path / "a.jpgx")
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(UserError, match=r"cpl-cache\[plot\]"):
        plot_curves(curves, "painting", tmp_path / "a.png")


def test_the_table_never_bolds_a_flagged_cell_nor_a_pgr_below_a_low_ceiling(tmp_path: Path) -> None:
    """A diverged cell was bolded as the best; a PGR of 1.12 was bolded for a method 46 points below weak
    where the ceiling sat below weak; without a ceiling the note read "with `None` as the ceiling"; and
    `lr=1e+30` was labelled "(lr=1e, 30)"."""
    root = tmp_path / "r"
    write_record(root, "weak", "real", 0, 0.60)
    write_record(root, "ceiling", "real", 0, 0.55)  # below the weak model
    write_record(root, "naive-lp", "real", 0, 0.14)  # (0.14 - 0.60) / (0.55 - 0.60) = 9.2 if computed
    write_record(root, "cpl", "real", 0, 0.90, flags=["non-finite loss"])
    write_record(root, "kd-lp", "real", 0, 0.50)
    table = build_table(load_results(root))
    rows = {r["method"]: r for r in table["rows"]}
    assert rows["naive-lp"]["pgr"]["avg"] is None and "pgr" not in rows["naive-lp"]["best"]
    assert rows["cpl"]["best"] == [] and rows["kd-lp"]["best"] == ["real", "avg"]
    md = render_table(root, "markdown")
    assert "**90.00" not in md and "| KD+LP | **50.00** | **50.00** |" in md
    assert "not above the weak model" in md
    alone = tmp_path / "no-ceiling"
    write_record(alone, "weak", "real", 0, 0.6)
    write_record(alone, "cpl", "real", 0, 0.7)
    md = render_table(alone, "markdown")
    assert "`None`" not in md and "no `ceiling` run" in md
    assert method_label("naive-lp+lr=1e+30") == "Naive+LP (lr=1e+30)"
    assert method_label("cpl+loss=soft+epochs=3") == "CPL (loss=soft, epochs=3)"
