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
from cpl_cache.methods import METHODS
from cpl_cache.synth.planted import PlantedConfig, permute_ground_truth, write_planted_cache
from cpl_cache.train import cpu_kernel
from cpl_cache.train.heads import get_head
from cpl_cache.train.losses import LOGIT_GRADS, get_loss
from cpl_cache.train.trainer import (
    TRUTH_OFF,
    AdamW,
    Targets,
    TrainConfig,
    batch_order,
    fit,
    resolve,
    result_path,
    run_training,
)

DOMAIN = "clipart"
# Clean strong features (small image noise) and a weak supervisor right half the time.
CLEAN = PlantedConfig(domain=DOMAIN, n_train=1500, n_hold=200, n_test=600, dim=32, classes=10, weak_acc=0.5,
                      image_noise=1.0, nuisance_noise=0.0, text_noise=0.8, seed=1)  # fmt: skip
FAST = dict(epochs=8, batch_size=128)  # about a hundred steps, milliseconds on tiny caches
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


def train(cache: Path, method: str, out: Path, **kw) -> dict:
    m = METHODS[method]
    fast = {**FAST, "lr": FAST_LR[m.head]} if m.trains else {}
    return run_training(TrainConfig(method=method, domain=DOMAIN, cache_dir=cache, out=out, device="cpu",
                                    **{**fast, **kw}))  # fmt: skip


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


@pytest.mark.parametrize("method", PLANTED)
def test_ground_truth_of_train_and_hold_is_read_by_ceilings_only(
    method: str, clean: Path, permuted: Path, tmp_path: Path
):
    a = train(clean, method, tmp_path / "a")
    b = train(permuted, method, tmp_path / "b")
    if method in CEILINGS:
        assert b["metrics"]["test_acc"] < a["metrics"]["test_acc"] - 0.1  # trained on shuffled truth
    else:
        assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"]


def steps_setup(cache: Path, method: str, dtype: torch.dtype):
    """The cache, a hundred-step run's hyperparameters, and its rows and targets in `dtype`, as the
    trainer builds them (ground truth as logits for the ceilings)."""
    data = load_domain(cache, DOMAIN)
    _, hp, _ = resolve(TrainConfig(method=method, domain=DOMAIN, cache_dir=cache, epochs=4, batch_size=64))
    train_rows = data.rows("train")
    x = F.normalize(data.image_embeds[train_rows].to(dtype), dim=1)
    if METHODS[method].uses_ground_truth:
        y = data.labels[train_rows]
        targets = torch.full((len(y), data.num_classes), TRUTH_OFF, dtype=dtype).scatter_(1, y[:, None], 0.0)
    else:
        targets = data.weak_logits[train_rows].to(dtype)
    return data, hp, x, targets


# The class-balanced losses (auxconf-lp, augconf-lp) have no closed form: they train through autograd.
CLOSED_FORM = [n for n in PLANTED if METHODS[n].trains and get_loss(METHODS[n].loss) in LOGIT_GRADS]


@pytest.mark.parametrize("method", CLOSED_FORM)
def test_closed_form_steps_equal_autograd_steps(method: str, clean: Path):
    """Every trained method: the trainer's closed-form step and autograd through the loss itself give
    the same parameters after a hundred steps (float64, so only rounding can tell them apart)."""
    data, hp, x, targets = steps_setup(clean, method, torch.float64)
    assert get_loss(hp.loss) in LOGIT_GRADS
    params = []
    for closed in (True, False):
        head = get_head(hp.head)(data, torch.Generator().manual_seed(0)).double()
        fit(
            head,
            get_loss(hp.loss),
            x,
            Targets.of(targets),
            hp,
            torch.Generator().manual_seed(1),
            closed_form=closed,
        )
        params.append([p.detach() for p in head.parameters()])
    start = [
        p.detach() for p in get_head(hp.head)(data, torch.Generator().manual_seed(0)).double().parameters()
    ]
    for closed, auto, p0 in zip(*params, start, strict=True):
        assert (closed - p0).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(closed, auto, rtol=1e-9, atol=1e-10)


@pytest.mark.skipif(not cpu_kernel.available(), reason="the CPU kernel needs a C compiler")
@pytest.mark.parametrize("method", CLOSED_FORM)
def test_cpu_kernel_steps_equal_torch_form_steps(method: str, clean: Path, monkeypatch: pytest.MonkeyPatch):
    """In float32 on the CPU the trainer's step reads the kernel; without it (no compiler), torch's forms:
    the same parameters after a hundred steps, to float32 rounding."""
    data, hp, x, targets = steps_setup(clean, method, torch.float32)
    calls = []
    kernel = cpu_kernel.logit_grad_
    monkeypatch.setattr(cpu_kernel, "logit_grad_", lambda *a: calls.append(1) or kernel(*a))
    params = []
    for on in (True, False):
        monkeypatch.setattr(cpu_kernel, "available", lambda on=on: on)
        head = get_head(hp.head)(data, torch.Generator().manual_seed(0))
        fit(head, get_loss(hp.loss), x, Targets.of(targets), hp, torch.Generator().manual_seed(1))
        params.append([p.detach() for p in head.parameters()])
        assert len(calls) == (4 * -(-len(x) // 64) if on else 0)  # every step, with it; none without
        calls.clear()
    start = get_head(hp.head)(data, torch.Generator().manual_seed(0)).parameters()
    for k, t, p0 in zip(*params, start, strict=True):
        assert (k - p0.detach()).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(k, t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_steps_equal_torch_optim_adamw(fused: bool):
    """The trainer's AdamW moves parameters as torch.optim.AdamW(fused=True) does over steps of changing
    learning rate, with weight decay: bit for bit through the fused kernel, to rounding without it."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=g), torch.randn(5, generator=g)]
    scales = torch.logspace(-9, 0, 5)  # rows from where eps dominates the step to where it is negligible
    grads = [
        [torch.randn(p.shape, generator=g) * scales.view(-1, *[1] * (p.dim() - 1)) for p in start]
        for _ in range(6)
    ]
    lrs = [0.1 * 0.7**i for i in range(6)]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    opt = torch.optim.AdamW(ref, lr=lrs[0], weight_decay=1e-2, fused=True)
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    mine = AdamW(ours, weight_decay=1e-2, fused=fused)
    for gs, lr in zip(grads, lrs, strict=True):
        for p, gp in zip(ref, gs, strict=True):
            p.grad = gp
        opt.param_groups[0]["lr"] = lr
        opt.step()
        mine.step(gs, lr)
    for a, b, p0 in zip(ours, ref, start, strict=True):
        assert (a - p0).abs().min() > 1e-3  # every element moved
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if not fused else 0)


@pytest.mark.parametrize("n, bs", [(1000, 64), (1024, 256), (70, 64)])
def test_batch_order_is_the_seeded_permutation_sorted_within_each_batch(n: int, bs: int):
    """The batches are the slices of torch.randperm's permutation (same seed), each in ascending order;
    a short last batch included."""
    got = batch_order(n, bs, torch.Generator().manual_seed(7)).tolist()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    assert got == [r for i in range(0, n, bs) for r in sorted(perm[i : i + bs])]
    assert sorted(got) == list(range(n)) and got != sorted(got)


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
    name = "cpl+epochs=8+batch=128"  # the overrides of FAST are part of the name
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
    assert on_disk["cpu_kernel"] is cpu_kernel.available()
    with cpu_kernel.turned_off():
        assert train(clean, "cpl", tmp_path / "torch")["cpu_kernel"] is False
    assert all(0.0 <= v <= 1.0 for v in on_disk["metrics"].values())
    steps = [c["step"] for c in on_disk["curve"]]
    per_epoch = -(-CLEAN.n_train // FAST["batch_size"])
    assert steps[0] == 0 and steps[-1] == FAST["epochs"] * per_epoch and steps == sorted(set(steps))
    assert len(steps) == METHODS["cpl"].curve_points + 1
    assert on_disk["curve"][-1]["test_acc"] == on_disk["metrics"]["test_acc"]
    assert on_disk["curve"][0]["test_acc"] == train(clean, "zeroshot", tmp_path)["metrics"]["test_acc"]


def test_overrides_get_their_own_name_and_file(clean: Path, tmp_path: Path):
    cfg = TrainConfig(method="cpl", domain=DOMAIN, cache_dir=clean, out=tmp_path, loss="soft", epochs=2)
    _, hp, name = resolve(cfg)
    assert name == "cpl+loss=soft+epochs=2" and hp.loss == "soft" and hp.head == "proto"
    assert resolve(dataclasses.replace(cfg, loss="kd", epochs=None))[2] == "cpl"  # same as the default
    rec = run_training(cfg)
    assert Path(rec["path"]).name == "cpl+loss=soft+epochs=2-seed0.json" and rec["base_method"] == "cpl"


# ------------------------------------------------------------------------------------ the command


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


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
    rec = json.loads((tmp_path / DOMAIN / "naive-lp+epochs=2+batch=256-seed5.json").read_text())
    assert rec["hparams"]["batch_size"] == 256 and rec["seed"] == 5 and rec["loss"] == "soft"


def test_methods_command_lists_every_method():
    r = cli("methods")
    assert r.exit_code == 0
    assert [line.split()[0] for line in r.stdout.strip().splitlines()] == list(METHODS)


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
    """Hold rows feed nothing in stage two: dropping them from the tensors changes no metric."""
    d = load_domain(clean, DOMAIN)
    keep = d.split != SPLIT_CODES["hold"]
    lean = dataclasses.replace(
        d, image_embeds=d.image_embeds[keep], weak_logits=d.weak_logits[keep], labels=d.labels[keep],
        split=d.split[keep], index=d.index[keep],
    )  # fmt: skip
    cfg = TrainConfig(method="cpl", domain=DOMAIN, cache_dir=clean, out=tmp_path, device="cpu", **FAST)
    assert run_training(cfg, d)["metrics"] == run_training(cfg, lean)["metrics"]
    assert torch.equal(d.labels, load_domain(clean, DOMAIN).labels)  # the caller's tensors are untouched
