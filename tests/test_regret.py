"""The regret benchmark: its `hold` and `none` numbers are what `cpl-cache train` reports under those
protocols, its oracle is the best test accuracy of its sweep (at least every protocol's number), and a
linear probe far below naive-lp is flagged as collapsed."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpl_cache.cache import load_domain
from cpl_cache.regret import (
    COLLAPSE_GAP,
    RegretConfig,
    _sweep_overrides,
    cache_regret,
    flag_collapses,
    summarise,
)
from cpl_cache.synth.zoo import write_zoo_cache
from cpl_cache.train.methods import METHODS
from cpl_cache.train.trainer import Cell, DomainTensors, TrainConfig, train_cells

NAME = "tiny-128x10"
FAST = (("epochs", 3), ("min_steps", 0), ("batch_size", 64))
METHODS_RUN = ("naive-lp", "cpl", "ceiling-lp")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("zoo")
    write_zoo_cache(root, NAME, scale=1.0)
    cfg = RegretConfig(caches=(NAME,), methods=METHODS_RUN, overrides=FAST, precision="fp32")
    return root, cache_regret(root, NAME, cfg)


def test_hold_and_none_equal_what_train_reports(report, tmp_path: Path):
    root, rep = report
    dt = DomainTensors(load_domain(root, NAME), "cpu")
    for select in ("hold", "none"):
        cells = [
            Cell.of(TrainConfig(m, NAME, root, overrides=dict(FAST), select=select)) for m in METHODS_RUN
        ]
        for m, rec in zip(METHODS_RUN, train_cells(cells, dt, tmp_path / select), strict=True):
            assert rep["methods"][m][select] == pytest.approx(100 * rec["metrics"]["test_acc"], abs=1e-9), (
                m,
                select,
            )
            if select == "hold":
                assert rep["methods"][m]["hold_point"] == {
                    k: v for k, v in rec["selection"]["chosen"].items() if k != "score"
                }


def test_the_oracle_bounds_every_protocol_and_regret_is_the_gap(report):
    _, rep = report
    for m, r in rep["methods"].items():
        for p in ("hold", "hold_full", "weak", "none"):
            assert r["oracle"] >= r[p] - 1e-9, (m, p)
            assert r[f"regret_{p}"] == pytest.approx(r["oracle"] - r[p])
        assert r["halving_cost"] == pytest.approx(r["hold_full"] - r["hold"])
    s = summarise({"caches": {NAME: {**rep, "half": "tune"}}})
    hold = [r["regret_hold"] for r in rep["methods"].values()]
    assert s["all"]["hold"]["max"] == max(hold) and s["tune"]["hold"]["n"] == len(METHODS_RUN)


def test_the_sweep_is_wider_than_the_candidates_and_holds_the_fixed_values():
    for name in ("naive-lp", "kd-lp", "cpl", "ceiling-lp"):
        m = METHODS[name]
        sweep = _sweep_overrides(m)
        lrs = sorted(m.candidates["lr"])
        assert min(sweep["lr"]) < lrs[0] and max(sweep["lr"]) > lrs[-1] and m.lr in sweep["lr"]
        for key, values in m.candidates.items():
            assert set(values) <= set(sweep[key])
    assert METHODS["ceiling-lp"].weight_decay in _sweep_overrides(METHODS["ceiling-lp"])["weight_decay"]


def test_a_linear_probe_far_below_naive_lp_is_flagged_as_collapsed():
    def row(acc: float) -> dict:
        return {"hold": acc, "hold_full": acc, "weak": acc, "none": acc, "oracle": acc + 1, "flags": []}

    result = {"naive-lp": row(70.0), "adaptconf-lp": row(70.0 - COLLAPSE_GAP - 0.1),
              "auxconf-lp": row(60.1), "cpl": row(20.0), "ceiling-lp": row(10.0)}  # fmt: skip
    flag_collapses(result)
    assert result["adaptconf-lp"]["flags"] == [f"collapsed: {COLLAPSE_GAP + 0.1:.1f} points below naive-lp"]
    assert result["auxconf-lp"]["flags"] == [] and result["auxconf-lp"]["vs_naive"] == pytest.approx(-9.9)
    # another head (CPL's prototypes) and a ceiling are not compared with the linear probe
    assert result["cpl"]["flags"] == result["ceiling-lp"]["flags"] == [] and "vs_naive" not in result["cpl"]
    assert result["naive-lp"]["regret_hold"] == 1.0
