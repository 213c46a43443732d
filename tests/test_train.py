"""Stage two end to end on tiny planted caches: definitions of the untrained methods, ground truth of
train and hold never read by weak supervision, determinism, weak-to-strong gains, results files, and
the one-line errors of `cpl-cache train`."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cpl_cache.cache import SPLIT_CODES, load_domain
from cpl_cache.cli import app
from cpl_cache.synth.planted import PlantedConfig, permute_ground_truth, write_planted_cache
from cpl_cache.train.methods import METHODS
from cpl_cache.train.trainer import TrainConfig, resolve, result_path, run_training

DOMAIN = "clipart"
# Clean strong features (small image noise) and a weak supervisor right half the time.
CLEAN = PlantedConfig(domain=DOMAIN, n_train=1500, n_hold=200, n_test=600, dim=32, classes=10, weak_acc=0.5,
                      image_noise=1.0, nuisance_noise=0.0, text_noise=0.8, seed=1)  # fmt: skip
FAST = dict(epochs=8, batch_size=128, min_steps=0)  # about a hundred steps, milliseconds on tiny caches
FAST_LR = {"linear": 0.1, "proto": None}  # at D = 32 a random linear probe needs a larger step than at 512
# A planted cache has no CLIP text tower for the prompt head: the *-tp methods are tested on a cache
# extracted with the tiny CLIP in tests/test_train_prompt.py.
PLANTED = [m.name for m in METHODS.values() if m.head != "prompt"]
WEAK_SUPERVISED = [n for n in PLANTED if not METHODS[n].uses_ground_truth]
TRAINED_W2S = [n for n in PLANTED if METHODS[n].targets == "weak"]
CEILINGS = [n for n in PLANTED if METHODS[n].uses_ground_truth]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    write_planted_cache(root, CLEAN)
    return root


@pytest.fixture(scope="module")
def permuted(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean cache with the ground-truth labels of its train and hold rows shuffled."""
    root = tmp_path_factory.mktemp("permuted")
    shutil.copytree(clean / DOMAIN, root / DOMAIN)
    permute_ground_truth(root / DOMAIN, seed=0)
    return root


def train(cache: Path, method: str, out: Path, select: str = "none", **kw) -> dict:
    """A short run of `method`, by default at its fixed values (`--select none`)."""
    m = METHODS[method]
    fast = {**FAST, **({"lr": FAST_LR[m.head]} if m.trains and FAST_LR[m.head] and select == "none" else {})}
    seed = kw.pop("seed", 0)
    return run_training(TrainConfig(method=method, domain=DOMAIN, cache_dir=cache, out=out, device="cpu",
                                    seed=seed, overrides={**(fast if m.trains else {}), **kw},
                                    select=select))  # fmt: skip


def test_weak_and_zeroshot_equal_their_definitions(clean: Path, tmp_path: Path):
    d = load_domain(clean, DOMAIN)
    test = d.split == SPLIT_CODES["test"]
    y, w = d.labels[test], d.weak_logits[test].argmax(1)
    zs = (F.normalize(d.image_embeds[test].double(), dim=1) @ d.text_embeds.double().T).argmax(1)
    weak = train(clean, "weak", tmp_path)["metrics"]
    zero = train(clean, "zeroshot", tmp_path)["metrics"]
    assert weak["test_acc"] == pytest.approx((w == y).double().mean().item(), abs=1e-7)
    assert weak["weak_agreement"] == 1.0
    assert zero["test_acc"] == pytest.approx((zs == y).double().mean().item(), abs=1e-7)
    assert zero["weak_agreement"] == pytest.approx((zs == w).double().mean().item(), abs=1e-7)


@pytest.mark.parametrize("select", ["none", "weak"])
@pytest.mark.parametrize("method", PLANTED)
def test_ground_truth_of_train_and_hold_is_read_by_ceilings_only(
    method: str, select: str, clean: Path, permuted: Path, tmp_path: Path
):
    """Without hold selection, nothing but a ceiling reads the ground truth of train or hold rows."""
    a = train(clean, method, tmp_path / "a", select=select)
    b = train(permuted, method, tmp_path / "b", select=select)
    if method in CEILINGS:
        assert b["metrics"]["test_acc"] < a["metrics"]["test_acc"] - 0.1  # trained on shuffled truth
    else:
        assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"]


@pytest.mark.parametrize("method", PLANTED)
def test_same_seed_same_metrics(method: str, clean: Path, tmp_path: Path):
    a = train(clean, method, tmp_path / "a", seed=3)
    b = train(clean, method, tmp_path / "b", seed=3)
    assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"]
    if METHODS[method].head == "linear":  # a random start: another seed is another run
        assert train(clean, method, tmp_path / "c", seed=4)["curve"] != a["curve"]


@pytest.mark.parametrize("method", TRAINED_W2S + CEILINGS)
def test_strong_students_beat_the_weak_supervisor_on_clean_features(method: str, clean: Path, tmp_path: Path):
    weak = train(clean, "weak", tmp_path)["metrics"]["test_acc"]
    got = train(clean, method, tmp_path)
    assert 0.45 < weak < 0.55
    assert got["metrics"]["test_acc"] > weak + 0.1, got["curve"]


def test_results_file_and_curve(clean: Path, tmp_path: Path):
    rec = train(clean, "cpl", tmp_path)
    name = "cpl+epochs=8+min_steps=0+batch_size=128+select=none"  # overrides and protocol join the name
    path = result_path(tmp_path, DOMAIN, name, 0)
    assert path == tmp_path / DOMAIN / f"{name}-seed0.json" and rec["path"] == str(path)
    on_disk = json.loads(path.read_text())
    assert on_disk == {k: v for k, v in rec.items() if k != "path"}
    assert (on_disk["domain"], on_disk["method"], on_disk["head"], on_disk["loss"]) == (
        DOMAIN,
        name,
        "proto",
        "kd",
    )
    assert on_disk["cache"] == load_domain(clean, DOMAIN).identity()
    assert on_disk["hparams"]["epochs"] == FAST["epochs"] and on_disk["device"] == "cpu"
    assert on_disk["flags"] == [] and on_disk["stack"] == [name]
    assert all(0.0 <= v <= 1.0 for v in on_disk["metrics"].values())
    steps = [c["step"] for c in on_disk["curve"]]
    per_epoch = -(-CLEAN.n_train // FAST["batch_size"])
    assert steps[0] == 0 and steps[-1] == FAST["epochs"] * per_epoch == on_disk["steps"]
    assert steps == sorted(set(steps))
    assert len(steps) == METHODS["cpl"].curve_points + 1
    assert on_disk["curve"][-1]["test_acc"] == on_disk["metrics"]["test_acc"]
    assert on_disk["curve"][0]["test_acc"] == train(clean, "zeroshot", tmp_path)["metrics"]["test_acc"]


def test_overrides_get_their_own_name_and_file(clean: Path, tmp_path: Path):
    cfg = TrainConfig(
        method="cpl", domain=DOMAIN, cache_dir=clean, out=tmp_path, overrides={"loss": "soft", "epochs": 2}
    )
    cell = resolve(cfg)
    assert cell.name == "cpl+loss=soft+epochs=2" and cell.hparams["loss"] == "soft"
    assert cell.hparams["head"] == "proto"
    assert resolve(dataclasses.replace(cfg, overrides={"loss": "kd", "epochs": 5})).name == "cpl"  # defaults
    rec = run_training(cfg)
    assert Path(rec["path"]).name == "cpl+loss=soft+epochs=2-seed0.json" and rec["base_method"] == "cpl"


# ------------------------------------------------------------------------------------ the command


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def train_args(method: str, cache: Path, out: Path) -> list[str]:
    """`cpl-cache train` of `method` on the test domain of `cache`, results under `out`."""
    return ["train", "--method", method, "--domain", DOMAIN, "--cache-dir", str(cache), "--out", str(out)]


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_command_prints_one_line_and_writes_results(clean: Path, tmp_path: Path):
    r = cli(
        "train", "--method", "naive-lp", "--domain", DOMAIN, "--cache-dir", str(clean),
        "--out", str(tmp_path),
        "--epochs", "2", "--batch-size", "256", "--device", "cpu", "--seed", "5",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 1 and "test acc" in r.stdout
    rec = json.loads((tmp_path / DOMAIN / "naive-lp+epochs=2+batch_size=256-seed5.json").read_text())
    assert rec["hparams"]["batch_size"] == 256 and rec["seed"] == 5 and rec["loss"] == "soft"


def test_methods_command_lists_every_method():
    r = cli("methods")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    names = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert names[:-2] == list(METHODS) and lines[-1].startswith("losses: soft, hard, kd, auxconf")
    assert "tau=0.5" in r.stdout and "min_steps=500" in r.stdout
    grid = ",".join(f"{x:g}" for x in METHODS["kd-lp"].candidates["T"])
    assert f"T={grid}" in r.stdout and r.stdout.count("candidates: lr=") == sum(
        1 for m in METHODS.values() if m.candidates
    )


@pytest.mark.parametrize(
    "flag,value,names",
    [("--method", "cpl2", list(METHODS)), ("--head", "mlp", ["proto", "linear"]),
     ("--loss", "focal", ["soft", "hard", "kd", "auxconf", "augconf", "adaptconf"])],
)  # fmt: skip
def test_unknown_names_list_the_valid_ones(
    flag: str, value: str, names: list[str], clean: Path, tmp_path: Path
):
    args = {
        "--method": "cpl",
        "--domain": DOMAIN,
        "--cache-dir": str(clean),
        "--out": str(tmp_path),
        flag: value,
    }
    one_line_error(cli("train", *[x for kv in args.items() for x in kv]), value, *names)


def test_overriding_a_method_that_trains_nothing_is_refused(clean: Path, tmp_path: Path):
    r = cli("train", "--method", "weak", "--domain", DOMAIN, "--cache-dir", str(clean), "--loss", "kd")
    one_line_error(r, "trains nothing")


def test_cache_without_test_rows_is_refused(tmp_path: Path):
    write_planted_cache(tmp_path, dataclasses.replace(CLEAN, n_train=50, n_hold=20, n_test=0))
    r = cli(
        "train", "--method", "cpl", "--domain", DOMAIN, "--cache-dir", str(tmp_path), "--out", str(tmp_path)
    )
    one_line_error(r, "no test rows")
    assert not (tmp_path / DOMAIN / "cpl-seed0.json").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weak_logits_are_refused(bad: float, tmp_path: Path):
    write_planted_cache(tmp_path, dataclasses.replace(CLEAN, n_train=50, n_hold=20, n_test=30))
    (shard,) = (tmp_path / DOMAIN).glob("shard-*.h5")
    with h5py.File(shard, "r+") as f:
        f["weak_logits"][7, 3] = bad
    r = cli("train", "--method", "naive-lp", "--domain", DOMAIN, "--cache-dir", str(tmp_path))
    one_line_error(r, "NaN or infinite weak logits", "[7]")


def test_results_never_depend_on_rows_outside_the_splits_used(clean: Path, tmp_path: Path):
    """Under the fixed values (`--select none`) hold rows feed nothing in stage two: dropping them from the
    tensors changes no metric. (Under `hold` they score the candidates: tests/test_select.py.)"""
    d = load_domain(clean, DOMAIN)
    keep = d.split != SPLIT_CODES["hold"]
    lean = dataclasses.replace(
        d, image_embeds=d.image_embeds[keep], weak_logits=d.weak_logits[keep], labels=d.labels[keep],
        split=d.split[keep], index=d.index[keep],
    )  # fmt: skip
    cfg = TrainConfig(
        method="cpl", domain=DOMAIN, cache_dir=clean, out=tmp_path, device="cpu", overrides=FAST,
        select="none",
    )  # fmt: skip
    assert run_training(cfg, d)["metrics"] == run_training(cfg, lean)["metrics"]
    assert torch.equal(d.labels, load_domain(clean, DOMAIN).labels)  # the caller's tensors are untouched


# ------------------------------------------------------------------------------------ stacks


def test_a_stacked_grid_gives_each_cell_the_metrics_it_gets_alone(clean: Path, tmp_path: Path):
    """`cpl-cache run` trains a domain's cells stacked; each must equal the same cell trained alone."""
    from cpl_cache.pipeline import PipelineConfig, run_pipeline

    grid = tmp_path / "grid.toml"
    trained = [n for n in PLANTED if METHODS[n].trains]
    grid.write_text(
        f'domains = ["{DOMAIN}"]\nseeds = [0, 1]\nmethods = {json.dumps(PLANTED)}\n'
        f"[defaults]\nepochs = 4\nbatch_size = 128\nmin_steps = 0\n"
    )
    summary = run_pipeline(
        PipelineConfig(
            pipeline=grid, cache_dir=clean, results=tmp_path / "grid", device="cpu", progress=False
        )
    )
    assert summary.ran == 2 * len(PLANTED)
    for seed in (0, 1):
        for method in PLANTED:
            kw = {"epochs": 4, "batch_size": 128, "min_steps": 0} if method in trained else {}
            alone = run_training(TrainConfig(method, DOMAIN, clean, tmp_path / "alone", seed, kw, "cpu"))
            stacked = json.loads(
                (tmp_path / "grid" / DOMAIN / Path(alone["path"]).name).read_text(encoding="utf-8")
            )
            if method in trained:
                assert len(stacked["stack"]) > 1  # it did train beside others
            for key in ("test_acc", "weak_agreement"):
                assert abs(stacked["metrics"][key] - alone["metrics"][key]) <= 1e-4, (method, seed)
            assert [c["step"] for c in stacked["curve"]] == [c["step"] for c in alone["curve"]]


def test_every_method_of_a_seed_starts_from_the_same_head(clean: Path, tmp_path: Path):
    """A paired comparison: one seed's linear probes share their initialisation (and batch order), so
    their curves start at one point; another seed starts elsewhere."""
    lp = [n for n in TRAINED_W2S + CEILINGS if METHODS[n].head == "linear"]
    starts = {
        seed: {train(clean, n, tmp_path / n, seed=seed)["curve"][0]["test_acc"] for n in lp}
        for seed in (0, 1)
    }
    assert len(starts[0]) == len(starts[1]) == 1 and starts[0] != starts[1]


def test_a_diverged_run_is_flagged_not_reported_as_healthy(clean: Path, tmp_path: Path):
    rec = train(clean, "naive-lp", tmp_path, lr=1e30)
    assert rec["flags"], rec["metrics"]
    assert any(f.startswith(("non-finite", "collapsed")) for f in rec["flags"])
    assert json.loads(Path(rec["path"]).read_text())["flags"] == rec["flags"]
    assert train(clean, "naive-lp", tmp_path)["flags"] == []
    r = cli(
        "train", "--method", "naive-lp", "--domain", DOMAIN, "--cache-dir", str(clean),
        "--out", str(tmp_path), "--lr", "1e30", "--epochs", "2", "--device", "cpu",
    )  # fmt: skip
    assert r.exit_code == 0 and "[" in r.stdout and ("non-finite" in r.stdout or "collapsed" in r.stdout)


def test_loss_constants_are_hyperparameters_of_the_run(clean: Path, tmp_path: Path):
    r = cli(
        "train", "--method", "adaptconf-lp", "--domain", DOMAIN, "--cache-dir", str(clean),
        "--out", str(tmp_path), "--set", "tau=4", "--set", "min_steps=0", "--epochs", "1", "--device", "cpu",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / DOMAIN / "adaptconf-lp+epochs=1+min_steps=0+tau=4-seed0.json").read_text())
    assert rec["hparams"]["loss_args"] == {"tau": 4.0, "T": 1.0}
    assert (
        rec["hparams"]["min_steps"] == 0
        and rec["hparams"]["weight_decay"] == METHODS["adaptconf-lp"].weight_decay
    )
    default = resolve(TrainConfig("adaptconf-lp", DOMAIN, clean)).hparams
    assert default["loss_args"] == {"tau": 0.5, "T": 1.0}


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--set", "tau=x"], ["tau must be a number"]),
        (["--set", "tau"], ["KEY=VALUE"]),
        (["--set", "alpha=0.3"], ["unknown setting", "alpha", "tau"]),
        (["--set", "batch_size=0"], ["batch_size must be an integer >= 1"]),
        (["--set", "epochs=2.5"], ["epochs must be an integer"]),
        (["--seed", "-1"], ["--seed -1 is out of range", "2**32-1"]),
        (["--seed", str(2**32)], [f"--seed {2**32} is out of range"]),
        (["--lr", "nan"], ["lr must be a number > 0"]),
        # every loss constant has a range (the reversed teacher at T = -1 trained to 7.5% with exit 0)
        (["--set", "tau=-5"], ["tau must be a number > 0"]),
        (["--set", "T=-1"], ["T must be a number > 0"]),
        (["--set", "T=0"], ["T must be a number > 0"]),
        (["--set", "T=[1.0, -1.0]"], ["T must be a number > 0"]),
        # a request that trains nothing, and one that would train for years
        (["--epochs", "0", "--set", "min_steps=0"], ["train nothing", "max(min_steps, epochs x steps"]),
        (["--epochs", "1000000000000"], ["epochs must be an integer >= 0 and <= 1e+07"]),
        (["--set", "min_steps=9223372036854775807"], ["min_steps must be an integer >= 0 and <= 1e+07"]),
        (["--set", "min_steps=99999999999999999999"], ["min_steps must be an integer >= 0 and <= 1e+07"]),
        (["--epochs", "9000000", "--batch-size", "1"], ["more than 10,000,000", "lower epochs or min_steps"]),
    ],
)
def test_bad_settings_are_one_line(args: list[str], needles: list[str], clean: Path, tmp_path: Path):
    one_line_error(cli(*train_args("adaptconf-lp", clean, tmp_path), *args), *needles)
    assert not (tmp_path / DOMAIN).exists()


@pytest.mark.parametrize(
    ("method", "setting", "needle"),
    [
        ("auxconf-lp", "warmup=-3", "warmup must be a number >= 0 and <= 1"),
        ("auxconf-lp", "alpha=1.5", "alpha must be a number >= 0 and <= 1"),
        ("augconf-lp", "beta=-0.1", "beta must be a number >= 0 and <= 1"),
        ("augconf-lp", "ramp=2", "ramp must be a number >= 0 and <= 1"),
    ],
)
def test_loss_constants_out_of_range_are_one_line(
    method: str, setting: str, needle: str, clean: Path, tmp_path
):
    one_line_error(cli(*train_args(method, clean, tmp_path), "--set", setting), needle)


@pytest.mark.parametrize("command", ["train", "run"])
def test_an_mps_device_that_is_not_there_is_one_line(command: str, clean: Path, tmp_path: Path):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("mps is available here")
    if command == "train":
        args = train_args("cpl", clean, tmp_path)
    else:
        grid = tmp_path / "grid.toml"
        grid.write_text(f'domains = ["{DOMAIN}"]\nseeds = [0]\nmethods = ["cpl"]\n')
        args = [
            "run",
            str(grid),
            "--cache-dir",
            str(clean),
            "--results",
            str(tmp_path / "r"),
            "--no-progress",
        ]
    one_line_error(cli(*args, "--device", "mps"), "device 'mps' requested", "--device cpu")
    assert not any(tmp_path.rglob("*.json"))


def test_every_loss_constant_declares_its_range():
    from cpl_cache.train.losses import LOSSES
    from cpl_cache.train.methods import CONSTANTS, loss_constants

    for name in LOSSES:
        for key, default in loss_constants(name).items():
            assert key in CONSTANTS, (name, key)
            spec = CONSTANTS[key]
            assert spec.minimum is not None or spec.maximum is not None, key
            assert type(default) is spec.kind, (name, key)


def test_zero_epochs_train_min_steps_as_the_readme_says(clean: Path, tmp_path: Path):
    """A run takes max(min_steps, epochs x steps per epoch): at epochs = 0, min_steps (it trained none)."""
    cfg = TrainConfig("naive-lp", DOMAIN, clean, tmp_path, 0, {"epochs": 0, "min_steps": 30}, "cpu", "none")
    rec = run_training(cfg)
    assert rec["steps"] == rec["budget"] == 30


# ------------------------------------------------------------------------------------ selection


def test_the_weak_model_is_beaten_on_an_independent_small_cache(tmp_path: Path):
    """On a 3,000-row Gaussian-mixture cache (64-d, 20 classes; not the planted story), every method at
    the registry's defaults: the linear probes and CPL above the weak model, each ceiling above its
    head's methods."""
    from cpl_cache.synth.planted import MixtureConfig, write_mixture_cache
    from cpl_cache.train.trainer import Cell, DomainTensors, train_cells

    write_mixture_cache(tmp_path / "cache", MixtureConfig(domain=DOMAIN))
    dt = DomainTensors(load_domain(tmp_path / "cache", DOMAIN), "cpu")
    plan = ["weak", "naive-lp", "auxconf-lp", "ceiling-lp", "cpl", "ceiling"]
    cells = [Cell.of(TrainConfig(m, DOMAIN, tmp_path / "cache", device="cpu")) for m in plan]
    acc = {r["base_method"]: r["metrics"]["test_acc"] for r in train_cells(cells, dt, tmp_path / "out")}
    weak = acc["weak"]
    assert 0.45 < weak < 0.55
    assert acc["naive-lp"] > weak + 0.08 and acc["auxconf-lp"] > weak + 0.15 and acc["cpl"] > weak + 0.08
    assert acc["ceiling-lp"] > max(acc["naive-lp"], acc["auxconf-lp"]) and acc["ceiling"] > acc["cpl"]


def test_a_missing_text_file_is_named_up_front_by_info_train_and_run(clean: Path, tmp_path: Path):
    """Without text.h5 `info` says so, and `run` stops before the first cell (it wrote the weak model's
    result and only then failed), naming the file rather than suggesting a head zero-shot refuses."""
    cache = tmp_path / "cache"
    shutil.copytree(clean / DOMAIN, cache / DOMAIN)
    (cache / DOMAIN / "text.h5").unlink()
    info = cli("info", "--cache-dir", str(cache))
    assert info.exit_code == 0 and "text.h5 is missing" in info.output, info.output
    grid = tmp_path / "grid.toml"
    grid.write_text(f'domains = ["{DOMAIN}"]\nseeds = [0]\nmethods = ["weak", "zeroshot", "naive-lp"]\n')
    r = cli("run", str(grid), "--cache-dir", str(cache), "--results", str(tmp_path / "r"), "--no-progress")
    one_line_error(r, "has no text.h5", "zeroshot", "--overwrite")
    assert not any((tmp_path / "r").rglob("*.json"))
    one_line_error(
        cli(
            "train", "--method", "cpl", "--domain", DOMAIN, "--cache-dir", str(cache), "--out", str(tmp_path)
        ),
        "has no text.h5",
    )
