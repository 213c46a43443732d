"""Selection protocols (`--select hold|weak|none`): each candidate's score at each checkpoint against a
run trained and scored by hand, what each protocol may read (permuted labels), the choice's tie rule,
the fallback without hold rows, and the one-line errors of bad protocols and candidate lists."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_train import cli, one_line_error

from cpl_cache.cache import SPLIT_CODES, load_domain
from cpl_cache.errors import UserError
from cpl_cache.runtime import BF16_MIN_WEIGHTS, resolve_precision
from cpl_cache.synth.planted import PlantedConfig, permute_ground_truth, write_planted_cache
from cpl_cache.train.heads import get_head
from cpl_cache.train.methods import METHODS
from cpl_cache.train.select import choose, simulate_halving, trials
from cpl_cache.train.trainer import (
    Cell,
    DomainTensors,
    TrainConfig,
    checkpoints,
    fit,
    predict,
    run_training,
    train_cells,
)

DOMAIN = "sketch"
# A weak supervisor right 45% of the time and features where a probe can learn more: hold accuracy
# varies a lot between step sizes and checkpoints, so the choice depends on the hold labels.
CFG = PlantedConfig(domain=DOMAIN, n_train=800, n_hold=300, n_test=400, dim=24, classes=8, weak_acc=0.45,
                    image_noise=1.2, nuisance_noise=0.0, text_noise=0.8, seed=2)  # fmt: skip
FAST = {"epochs": 4, "batch_size": 128, "min_steps": 0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("select")
    write_planted_cache(root, CFG)
    return root


def _shuffled(cache: Path, dest: Path, split: str, seed: int = 0) -> Path:
    """A copy of the cache with the labels of one split's rows permuted among themselves."""
    shutil.copytree(cache / DOMAIN, dest / DOMAIN)
    rng = np.random.default_rng(seed)
    for shard in sorted((dest / DOMAIN).glob("shard-*.h5")):
        with h5py.File(shard, "r+") as f:
            labels, rows = f["labels"][:], np.flatnonzero(f["split"][:] == SPLIT_CODES[split])
            labels[rows] = labels[rng.permutation(rows)]
            f["labels"][:] = labels
    return dest


def run(
    cache: Path, out: Path, method: str = "naive-lp", select: str = "hold", precision: str = "fp32", **kw
) -> dict:
    overrides = {**FAST, **kw}
    return run_training(TrainConfig(method, DOMAIN, cache, out, 0, overrides, "cpu", select, precision))


def by_hand(cell: Cell, dt: DomainTensors, score) -> tuple[torch.nn.Module, list, list]:
    """One trial trained alone by `fit` on all of train, its parameters and score saved at every
    checkpoint."""
    head = get_head(cell.hparams["head"])(dt.data, torch.Generator().manual_seed(cell.seed))
    steps = cell.steps(len(dt.train))
    saved, scores = [], []

    def evaluate(step: int) -> None:
        saved.append([p.detach().clone() for p in head.parameters()])
        scores.append(score(head))

    hp = cell.hparams
    fit([head], [cell.loss_fn()], [dt.targets(cell.method)], dt.x_train,
        [{"lr": hp["lr"], "weight_decay": hp["weight_decay"]}], steps, hp["batch_size"],
        torch.Generator().manual_seed(cell.seed), evaluate, set(checkpoints(cell, steps)))  # fmt: skip
    return head, saved, scores


def test_hold_scores_every_candidate_at_every_checkpoint_and_reports_the_best(cache: Path, tmp_path: Path):
    """Each recorded score equals the trial trained alone and scored on the hold rows by hand, up to the
    checkpoint where successive halving stopped it (computed from the by-hand scores of the full search);
    the chosen point is the maximum of what was reached (ties to the earlier step, then the earlier
    trial); the reported accuracy is that checkpoint's."""
    rec = run(cache, tmp_path)
    sel = rec["selection"]
    dt = DomainTensors(load_domain(cache, DOMAIN), "cpu")
    y_hold = dt.data.labels[dt.data.split == SPLIT_CODES["hold"]]
    lrs = METHODS["naive-lp"].candidates["lr"]
    assert rec["hparams"]["lr"] is None and rec["hparams"]["candidates"] == {"lr": list(lrs)}
    assert sel["protocol"] == "hold" and [c["lr"] for c in sel["candidates"]] == list(lrs)
    assert "hold rows' ground truth" in sel["score"]
    cell = Cell.of(TrainConfig("naive-lp", DOMAIN, cache, tmp_path, 0, FAST, "cpu"))
    runs = []
    for values, trial in trials(cell):
        head, saved, scores = by_hand(trial, dt, lambda h: int((predict(h, dt.x_hold) == y_hold).sum()))
        runs.append((values, head, saved, scores, checkpoints(trial, trial.steps(len(dt.train)))))
    steps = runs[0][4]
    reached = simulate_halving(METHODS["naive-lp"].halving, steps, [r[3] for r in runs], len(y_hold))
    assert sel["halving"] == list(METHODS["naive-lp"].halving)
    assert any(len(r) < len(steps) for r in reached)  # halving stopped a trial on this cache
    for recorded, scores in zip(sel["candidates"], reached, strict=True):
        assert list(recorded["scores"]) == [str(s) for s in steps[1 : len(scores)]]
        assert list(recorded["scores"].values()) == [v / len(y_hold) for v in scores[1:]]
        assert recorded.get("stopped") == (steps[len(scores) - 1] if len(scores) < len(steps) else None)
    best = None  # the first maximum, checkpoints in order, trials in order within each
    for k in range(1, len(steps)):
        for t, r in enumerate(reached):
            if k < len(r) and (best is None or r[k] > reached[best[0]][best[1]]):
                best = (t, k)
    values, head, saved, scores, steps = runs[best[0]]
    k = best[1]
    assert sel["chosen"] == {**values, "step": steps[k], "score": scores[k] / len(y_hold)}
    assert rec["steps"] == steps[k] and rec["budget"] == steps[-1] == cell.steps(len(dt.train))
    with torch.no_grad():  # the reported test accuracy is that trial's at that checkpoint
        for p, v in zip(head.parameters(), saved[k], strict=True):
            p.copy_(v)
    assert rec["metrics"]["test_acc"] == (predict(head, dt.x_test) == dt.y_test).float().mean().item()


def test_choose_prefers_the_earlier_step_then_the_earlier_trial():
    assert choose([[0, 5, 7, 7], [0, 7, 7, 6]], [True, True]) == (1, 1)  # step 1 of trial 1 beats step 2
    assert choose([[0, 3, 7], [0, 3, 7]], [True, True]) == (0, 2)
    assert choose([[9, 1, 2], [0, 1, 1]], [True, True]) == (
        0,
        2,
    )  # step 0 (the initial head) is not a candidate
    assert choose([[0, 1, 9], [0, 2, 2]], [False, True]) == (1, 1)  # a diverged trial is never chosen
    assert choose([[0, 1, 9], [0, 2, 2]], [False, False]) == (0, 2)  # unless every trial diverged


def test_hold_never_reads_test_labels_but_reads_hold_labels(cache: Path, tmp_path: Path):
    base = run(cache, tmp_path / "a")
    test_shuffled = _shuffled(cache, tmp_path / "t", "test")
    other = run(test_shuffled, tmp_path / "b")
    assert other["selection"] == base["selection"]  # nothing chosen moved
    assert other["metrics"]["test_acc"] != base["metrics"]["test_acc"]  # the test labels did change
    hold_shuffled = _shuffled(cache, tmp_path / "h", "hold")
    moved = run(hold_shuffled, tmp_path / "c")
    assert moved["selection"]["candidates"] != base["selection"]["candidates"]
    assert moved["selection"]["chosen"] != base["selection"]["chosen"]


def test_weak_reads_no_ground_truth_outside_test(cache: Path, tmp_path: Path):
    """`--select weak` scores on a slice of train against its weak labels: shuffling the ground truth of
    train and hold changes nothing; the result is the chosen trial retrained on all of train, stopped at
    the chosen step, equal to that trial's fixed run at that checkpoint."""
    a = run(cache, tmp_path / "a", select="weak")
    permuted = tmp_path / "p"
    shutil.copytree(cache / DOMAIN, permuted / DOMAIN)
    permute_ground_truth(permuted / DOMAIN, seed=3)
    b = run(permuted, tmp_path / "b", select="weak")
    assert a["selection"] == b["selection"] and a["metrics"] == b["metrics"] and a["curve"] == b["curve"]
    assert a["method"] == "naive-lp+epochs=4+min_steps=0+batch_size=128+select=weak"
    chosen = a["selection"]["chosen"]
    assert "weak labels" in a["selection"]["score"]
    fixed = run(cache, tmp_path / "c", select="none", lr=chosen["lr"])
    (point,) = [c for c in fixed["curve"] if c["step"] == chosen["step"]]
    assert a["metrics"]["test_acc"] == point["test_acc"] and a["curve"] == fixed["curve"]


def test_none_trains_the_fixed_values_to_the_end(cache: Path, tmp_path: Path):
    rec = run(cache, tmp_path, select="none")
    assert rec["selection"] == {"protocol": "none"} and rec["hparams"]["lr"] == METHODS["naive-lp"].lr
    assert rec["steps"] == rec["budget"] == rec["curve"][-1]["step"]
    assert rec["metrics"]["test_acc"] == rec["curve"][-1]["test_acc"]


def test_stacked_candidates_equal_each_trained_alone(cache: Path, tmp_path: Path):
    """Every candidate of a grid's cells trains in one stack; each cell's choice and test accuracy are
    those of the cell run alone."""
    dt = DomainTensors(load_domain(cache, DOMAIN), "cpu")
    methods = ["naive-lp", "kd-lp", "cpl", "ceiling-lp"]
    cells = [Cell.of(TrainConfig(m, DOMAIN, cache, seed=0, overrides=FAST, device="cpu")) for m in methods]
    stacked = train_cells(cells, dt, tmp_path / "s")
    assert len(stacked[0]["stack"]) == 3  # the linear heads: naive-lp, kd-lp, ceiling-lp
    for m, rec in zip(methods, stacked, strict=True):
        alone = run(cache, tmp_path / m, method=m)
        assert rec["selection"]["chosen"] == alone["selection"]["chosen"], m
        assert abs(rec["metrics"]["test_acc"] - alone["metrics"]["test_acc"]) <= 1e-6, m


def test_kd_chooses_its_temperature_so_it_is_not_naive_lp_twice(cache: Path, tmp_path: Path):
    rec = run(cache, tmp_path, method="kd-lp")
    temps = {c["T"] for c in rec["selection"]["candidates"]}
    assert temps == set(METHODS["kd-lp"].candidates["T"]) and 1.0 in temps and len(temps) >= 3
    assert rec["hparams"]["loss_args"]["T"] is None and "T" in rec["selection"]["chosen"]


def test_ceilings_choose_their_weight_decay_on_hold_ground_truth(cache: Path, tmp_path: Path):
    rec = run(cache, tmp_path, method="ceiling-lp")
    grid = METHODS["ceiling-lp"].candidates
    assert len(rec["selection"]["candidates"]) == len(grid["lr"]) * len(grid["weight_decay"])
    assert {"lr", "weight_decay", "step"} <= set(rec["selection"]["chosen"])


def test_a_cache_without_hold_rows_falls_back_to_weak_and_says_so(tmp_path: Path, capsys):
    write_planted_cache(tmp_path, dataclasses.replace(CFG, n_hold=0))
    rec = run(tmp_path, tmp_path / "out")
    assert rec["selection"]["protocol"] == "weak" and "no labelled hold rows" in rec["selection"]["fallback"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no labelled hold rows" in err[0]
    assert rec["method"] == "naive-lp+epochs=4+min_steps=0+batch_size=128"  # still the default's name


def test_candidates_from_a_grid_line_and_a_pinned_step_size(cache: Path, tmp_path: Path):
    from cpl_cache.pipeline import PipelineConfig, run_pipeline

    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'domains = ["{DOMAIN}"]\nseeds = [0]\n'
        'methods = [{ method = "cpl", lr = [0.001, 0.01] }, { method = "naive-lp", lr = 0.1 }]\n'
        "[defaults]\nepochs = 2\nbatch_size = 128\nmin_steps = 0\n"
    )
    run_pipeline(PipelineConfig(pipeline=grid, cache_dir=cache, results=tmp_path / "r", progress=False))
    cpl = json.loads(
        (
            tmp_path / "r" / DOMAIN / "cpl+epochs=2+min_steps=0+lr=0.001,0.01+batch_size=128-seed0.json"
        ).read_text()
    )
    assert [c["lr"] for c in cpl["selection"]["candidates"]] == [0.001, 0.01]
    lp = json.loads(
        (tmp_path / "r" / DOMAIN / "naive-lp+epochs=2+min_steps=0+batch_size=128-seed0.json").read_text()
    )
    assert lp["hparams"]["lr"] == 0.1 and lp["selection"]["candidates"] == [
        {"scores": lp["selection"]["candidates"][0]["scores"]}
    ]  # one trial: only the stopping point is chosen
    assert lp["selection"]["protocol"] == "hold"


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ('{ method = "cpl", lr = [] }', ["lr lists no candidates"]),
        ('{ method = "cpl", lr = [0.001, -1.0] }', ["lr must be a number > 0"]),
        ('{ method = "cpl", epochs = [1, 2] }', ["epochs takes one value"]),
    ],
)
def test_bad_candidate_lists_in_a_grid_are_one_line(
    line: str, needles: list[str], cache: Path, tmp_path: Path
):
    grid = tmp_path / "grid.toml"
    grid.write_text(f'domains = ["{DOMAIN}"]\nseeds = [0]\nmethods = [{line}]\n')
    one_line_error(
        cli("run", str(grid), "--cache-dir", str(cache), "--results", str(tmp_path / "r")), *needles
    )
    assert not (tmp_path / "r").exists()


def test_bad_select_values_are_one_line(cache: Path, tmp_path: Path):
    base = ["train", "--method", "cpl", "--domain", DOMAIN, "--cache-dir", str(cache), "--out", str(tmp_path)]
    one_line_error(cli(*base, "--select", "best"), "--select must be one of hold, weak, none", "'best'")
    one_line_error(cli(*base, "--select", "none", "--set", "lr=[0.1, 0.2]"), "--select none does not choose")
    grid = tmp_path / "grid.toml"
    grid.write_text(f'domains = ["{DOMAIN}"]\nseeds = [0]\nmethods = ["weak", "cpl"]\n')
    one_line_error(
        cli("run", str(grid), "--cache-dir", str(cache), "--select", "test"), "--select must be one of"
    )


def test_weak_refuses_a_domain_with_one_train_row(tmp_path: Path):
    write_planted_cache(tmp_path, dataclasses.replace(CFG, n_train=1, n_hold=2, n_test=5))
    r = cli("train", "--method", "naive-lp", "--domain", DOMAIN, "--cache-dir", str(tmp_path),
            "--select", "weak", "--out", str(tmp_path / "out"))  # fmt: skip
    one_line_error(r, "1 train row(s): --select weak needs at least 2")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- precision


def _native_bf16() -> bool:
    try:
        return resolve_precision("bf16", "cpu") == "bf16"
    except UserError:
        return False


NATIVE_BF16 = _native_bf16()
# A head of 512 x 256 weights: `--precision auto` takes bf16 for it where the CPU has native bfloat16.
WIDE = PlantedConfig(domain=DOMAIN, n_train=2000, n_hold=600, n_test=1500, dim=512, classes=256,
                     weak_acc=0.5, image_noise=1.0, nuisance_noise=0.0, text_noise=0.8, seed=4)  # fmt: skip


def test_auto_precision_takes_bf16_only_where_native_and_the_head_is_large(cache: Path, tmp_path: Path):
    small = run(cache, tmp_path, precision="auto")
    assert small["precision"] == "fp32"  # 24 x 8 weights: too small to gain from bf16
    assert resolve_precision("auto", "cpu", BF16_MIN_WEIGHTS) == ("bf16" if NATIVE_BF16 else "fp32")
    assert resolve_precision("auto", "cpu", BF16_MIN_WEIGHTS - 1) == "fp32"
    assert resolve_precision("fp32", "cpu", 10**9) == "fp32"
    r = cli("train", "--method", "cpl", "--domain", DOMAIN, "--cache-dir", str(cache), "--out",
            str(tmp_path), "--precision", "half")  # fmt: skip
    one_line_error(r, "unknown precision 'half'", "auto, bf16, fp32")


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bfloat16 matrix products")
def test_bf16_stacked_candidates_equal_alone_and_stay_within_a_third_of_a_point_of_fp32(tmp_path: Path):
    """In bf16 the stacked candidates give each cell the choice and test accuracy it gets alone, exactly;
    against fp32 the test accuracy moves by at most 0.3 point."""
    write_planted_cache(tmp_path, WIDE)
    data = load_domain(tmp_path, DOMAIN)
    methods = ["naive-lp", "cpl"]
    cells = [Cell.of(TrainConfig(m, DOMAIN, tmp_path, seed=0, overrides=FAST)) for m in methods]
    stacked = train_cells(cells, DomainTensors(data, "cpu", precision="auto"), tmp_path / "s")
    for m, rec in zip(methods, stacked, strict=True):
        assert rec["precision"] == "bf16"
        alone = run(tmp_path, tmp_path / m, method=m, precision="auto")
        assert rec["selection"]["chosen"] == alone["selection"]["chosen"], m
        assert rec["metrics"]["test_acc"] == alone["metrics"]["test_acc"], m
        fp32 = run(tmp_path, tmp_path / f"{m}-fp32", method=m, precision="fp32")
        assert fp32["precision"] == "fp32"
        assert abs(rec["metrics"]["test_acc"] - fp32["metrics"]["test_acc"]) <= 0.003, m
