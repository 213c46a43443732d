"""The text-prompt methods (*-tp) end to end on a cache extracted from the synthetic images with the tiny
CLIP: results written, the untrained head is zero-shot, one text-encoder pass per step, ground truth of
train read by ceiling-tp alone, and a planted cache refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cpl_cache.cache import load_domain
from cpl_cache.cli import app
from cpl_cache.synth.planted import PlantedConfig, permute_ground_truth, write_planted_cache
from cpl_cache.train.heads import get_head
from cpl_cache.train.methods import METHODS
from cpl_cache.train.prompt import PromptHead
from cpl_cache.train.trainer import TrainConfig, run_training

DOMAIN = "clipart"
TP = [m.name for m in METHODS.values() if m.head == "prompt"]
FAST = dict(epochs=4, batch_size=8, lr=0.05, min_steps=0)  # 16 steps on the synthetic domain's 25 train rows

torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU


@pytest.fixture(scope="module")
def cache(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cpl_cache.extract import ExtractConfig, run_extract

    root = tmp_path_factory.mktemp("tp-cache")
    models = synth_dir / "models"
    run_extract(
        ExtractConfig(
            domain=DOMAIN, data_root=synth_dir / "domainnet", strong=str(models / "clip-tiny"),
            weak=str(models / "resnet-tiny"), cache_dir=root, batch_size=16, workers=0, device="cpu",
            progress=False,
        )
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def permuted(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache with the ground-truth labels of its train and hold rows shuffled."""
    root = tmp_path_factory.mktemp("tp-permuted")
    shutil.copytree(cache / DOMAIN, root / DOMAIN)
    permute_ground_truth(root / DOMAIN, seed=0)
    return root


def train(cache: Path, method: str, out: Path, select: str = "none", **kw) -> dict:
    """A short run at the method's fixed values (`--select none`; test_select.py covers selection)."""
    fast = FAST if METHODS[method].trains else {}
    return run_training(TrainConfig(method=method, domain=DOMAIN, cache_dir=cache, out=out, device="cpu",
                                    overrides={**fast, **kw}, select=select))  # fmt: skip


def test_the_untrained_prompt_head_gives_the_zero_shot_logits(cache: Path):
    data = load_domain(cache, DOMAIN)
    x = F.normalize(data.image_embeds[data.rows("test")].float(), dim=1)
    head = get_head("prompt")(data, None)
    assert head.n_ctx == data.prefix_len  # "a photo of a", token for token
    torch.testing.assert_close(head(x), data.logit_scale * x @ data.text_embeds.T, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", TP)
def test_every_tp_method_trains_and_writes_its_results(method: str, cache: Path, tmp_path: Path, monkeypatch):
    passes = []
    encode = PromptHead._encode
    monkeypatch.setattr(PromptHead, "_encode", lambda self: passes.append(1) or encode(self))
    rec = train(cache, method, tmp_path)
    m, data = METHODS[method], load_domain(cache, DOMAIN)
    on_disk = json.loads(Path(rec["path"]).read_text())
    assert on_disk == {k: v for k, v in rec.items() if k != "path"}
    assert (rec["base_method"], rec["head"], rec["loss"]) == (method, "prompt", m.loss)
    assert rec["head_config"] == {"n_ctx": data.prefix_len, "init": "phrase"}
    steps = FAST["epochs"] * math.ceil(len(data.rows("train")) / FAST["batch_size"])
    assert [c["step"] for c in rec["curve"]][-1] == steps and len(rec["curve"]) == m.curve_points + 1
    # One pass of the text encoder per training step; each evaluation (test rows and train probe,
    # in chunks) reuses one pass.
    assert len(passes) == steps + len(rec["curve"])
    zeroshot = train(cache, "zeroshot", tmp_path)["metrics"]
    assert rec["curve"][0]["test_acc"] == zeroshot["test_acc"]
    assert rec["curve"][-1]["test_acc"] == rec["metrics"]["test_acc"]


@pytest.mark.parametrize("method", TP)
def test_ground_truth_of_train_is_read_by_the_ceiling_only(
    method: str, cache: Path, permuted: Path, tmp_path: Path
):
    a = train(cache, method, tmp_path / "a")
    b = train(permuted, method, tmp_path / "b")
    if METHODS[method].uses_ground_truth:
        assert a["curve"] != b["curve"]
    else:
        assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"]


@pytest.mark.parametrize("method", TP)
def test_a_planted_cache_is_refused_in_one_line(method: str, tmp_path: Path):
    cfg = PlantedConfig(domain=DOMAIN, n_train=40, n_hold=10, n_test=20, dim=8, classes=4)
    write_planted_cache(tmp_path / "cache", cfg)
    args = ["train", "--method", method, "--domain", DOMAIN, "--cache-dir", str(tmp_path / "cache")]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "results")])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "planted cache" in lines[0] and "--head proto or linear" in lines[0], lines
    assert not (tmp_path / "results").exists()
