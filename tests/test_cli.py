"""The command line a newcomer meets: one-line refusals, help texts and flags, progress in logs."""

from __future__ import annotations

import argparse
import io
import re
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from cpl_cache.cli import app
from cpl_cache.synth.planted import PlantedConfig, write_planted_cache

SEED_RANGE = "from 0 to 2**32-1"
WEIGHTS_RULE = "only safetensors files or weights-only PyTorch checkpoints load"


def _one_line_error(res) -> str:
    """The refusal's one line, after checking the refusal is exactly that."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "╭" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cpl-cache: error:"), res.output
    return lines[0]


# ------------------------------------------------------------------------------------ seeds


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-cache")
    write_planted_cache(root, PlantedConfig(domain="quickdraw", n_train=60, n_hold=20, n_test=40, dim=16,
                                            classes=5))  # fmt: skip
    return root


@pytest.mark.parametrize("seed", [-1, 2**32, 10**20])
def test_train_refuses_a_seed_out_of_range_in_one_line(cache, tmp_path, seed):
    args = ["train", "--method", "cpl", "--domain", "quickdraw", "--cache-dir", str(cache),
            "--out", str(tmp_path / "r"), "--device", "cpu", "--seed", str(seed)]  # fmt: skip
    line = _one_line_error(CliRunner().invoke(app, args))
    assert f"--seed {seed}" in line and SEED_RANGE in line
    assert not (tmp_path / "r").exists()


def test_the_largest_seed_is_taken(tmp_path):
    from cpl_cache.runtime import SEED_MAX, check_seed, seed_everything

    assert SEED_MAX == 2**32 - 1 and check_seed(SEED_MAX) == SEED_MAX and check_seed(0) == 0
    seed_everything(SEED_MAX)  # NumPy, torch and Python take it
    # (Not `train` here: a CPU training run turns on flushing subnormals, which the kernel tests,
    # run later in the same process, must find off.)
    args = ["synth-cache", "--cache-dir", str(tmp_path), "--train", "20", "--test", "10", "--dim", "4",
            "--classes", "3", "--seed", str(SEED_MAX)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("seeds", ["-1", "0,4294967296"])
def test_run_refuses_seeds_out_of_range_in_one_line(cache, tmp_path, seeds):
    grid = tmp_path / "g.toml"
    grid.write_text('domains = ["quickdraw"]\nseeds = [0]\nmethods = ["cpl"]\n')
    args = ["run", str(grid), "--cache-dir", str(cache), "--results", str(tmp_path / "r"), "--device", "cpu",
            "--no-progress", f"--seeds={seeds}"]  # fmt: skip
    line = _one_line_error(CliRunner().invoke(app, args))
    assert "--seeds" in line and SEED_RANGE in line
    assert not (tmp_path / "r").exists()  # refused before any cell trained


def test_train_weak_and_synth_refuse_a_seed_out_of_range(synth_dir, tmp_path):
    args = ["train-weak", "--domain", "real", "--data-root", str(synth_dir / "domainnet"),
            "--model", str(synth_dir / "models" / "resnet-tiny"), "--out", str(tmp_path / "w"),
            "--epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress",
            "--seed", str(2**32)]  # fmt: skip
    assert SEED_RANGE in _one_line_error(CliRunner().invoke(app, args))
    for seed in ("-1", str(2**64)):
        args = ["synth", str(tmp_path / f"s{seed}"), "--classes", "2", "--per-class", "2",
                "--pretrain-steps", "0", "--seed", seed]  # fmt: skip
        res = CliRunner().invoke(app, args)
        assert SEED_RANGE in _one_line_error(res)


# ------------------------------------------------------------------------------------ checkpoints


def _corrupt(src: Path, dst: Path, how: str) -> Path:
    """A copy of a `save_pretrained` folder whose weights do not load."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "garbage-safetensors":
        weights.write_bytes(b"this is not a safetensors file" * 4)
    elif how == "truncated-safetensors":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "pickle-bin":  # an old training script's .bin: tensors and the run's arguments
        weights.unlink()
        torch.save({"weight": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, dst / "pytorch_model.bin")
    elif how == "garbage-bin":
        weights.unlink()
        (dst / "pytorch_model.bin").write_bytes(b"\x80\x02 not a pickle at all")
    return dst / ("pytorch_model.bin" if how.endswith("-bin") else "model.safetensors")


def _check_weights_refusal(res, bad_file: Path) -> None:
    line = _one_line_error(res)
    assert WEIGHTS_RULE in line and str(bad_file) in line, line
    assert "weights_only=False" not in res.output and "weights_only` set to `False" not in res.output


HOWS = ["garbage-safetensors", "truncated-safetensors", "pickle-bin", "garbage-bin"]


@pytest.mark.parametrize("role", ["weak", "strong"])
@pytest.mark.parametrize("how", HOWS)
def test_extract_refuses_a_checkpoint_whose_weights_do_not_load(synth_dir, tmp_path, role, how):
    models = {"strong": synth_dir / "models" / "clip-tiny", "weak": synth_dir / "models" / "resnet-tiny"}
    bad_file = _corrupt(models[role], tmp_path / role, how)
    models[role] = tmp_path / role
    args = ["extract", "--domain", "sketch", "--data-root", str(synth_dir / "domainnet"),
            "--strong", str(models["strong"]), "--weak", str(models["weak"]), "--cache-dir",
            str(tmp_path / "c"), "--device", "cpu", "--workers", "0", "--no-progress"]  # fmt: skip
    _check_weights_refusal(CliRunner().invoke(app, args), bad_file)


@pytest.mark.parametrize("how", ["garbage-safetensors", "pickle-bin"])
def test_train_weak_refuses_a_model_whose_weights_do_not_load(synth_dir, tmp_path, how):
    bad_file = _corrupt(synth_dir / "models" / "resnet-tiny", tmp_path / "m", how)
    args = ["train-weak", "--domain", "real", "--data-root", str(synth_dir / "domainnet"),
            "--model", str(tmp_path / "m"), "--out", str(tmp_path / "w"), "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    _check_weights_refusal(CliRunner().invoke(app, args), bad_file)
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------ help and flags


def _command(name: str):
    return typer.main.get_command(app).commands[name]


def _param(command: str, name: str):
    return next(p for p in _command(command).params if p.name == name)


def test_commands_are_listed_in_the_order_a_user_meets_them():
    want = ["synth", "train-weak", "extract", "info", "methods", "train", "run", "table", "plot", "reproduce",
            "demo", "synth-cache", "bench-regret"]  # fmt: skip
    group = typer.main.get_command(app)
    assert group.list_commands(None) == want
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    listed = re.findall(r"^\W*([a-z][a-z-]+)\s{2,}\S", res.output.split("Commands", 1)[1], flags=re.M)
    assert listed == want, res.output


def test_extract_help_and_overwrite_pair():
    data_root = _param("extract", "data_root")
    assert "DomainNet folder" not in data_root.help and "(see --dataset)" in data_root.help
    overwrite = _param("extract", "overwrite")
    assert overwrite.opts == ["--overwrite"] and overwrite.secondary_opts == ["--no-overwrite"]
    assert overwrite.default is False
    res = CliRunner().invoke(app, ["extract", "--help"])
    assert res.exit_code == 0 and "--no-overwrite" in res.output


def test_synth_help_shows_the_pretraining_default():
    from cpl_cache.synth.models import PretrainConfig

    assert _param("synth", "pretrain_steps").default == PretrainConfig().steps
    res = CliRunner().invoke(app, ["synth", "--help"])
    flat = re.sub(r"[\s│]+", " ", res.output)
    part = flat.split("--pretrain-steps", 1)[1].split("--progress", 1)[0]
    assert f"[default: {PretrainConfig().steps}]" in part, res.output


# ------------------------------------------------------------------------------------ progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_plain_line_per_stage_where_stderr_is_no_terminal():
    from cpl_cache.runtime import PlainProgress, progress

    log = io.StringIO()
    assert list(progress(range(1000), desc="stage one", unit="img", file=log)) == list(range(1000))
    bar = progress(total=5, desc="stage two", unit="cell", initial=2, file=log)
    bar.set_postfix_str("clipart cpl seed 0")
    bar.update(3)
    bar.write("a note", file=log)
    bar.close()
    bar.close()  # once only
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 3, lines
    assert re.fullmatch(r"stage one: 1000/1000 img in \d+\.\ds", lines[0])
    assert lines[1] == "a note"
    assert re.fullmatch(r"stage two: 5/5 cell in \d+\.\ds \(clipart cpl seed 0\)", lines[2])

    quiet = io.StringIO()
    assert list(progress([1, 2], file=quiet, disable=True)) == [1, 2]
    assert list(progress([1, 2], file=quiet, leave=False)) == [1, 2]  # a bar that vanishes leaves nothing
    assert quiet.getvalue() == ""
    assert isinstance(progress(range(2), file=io.StringIO()), PlainProgress)
    assert not isinstance(progress(range(2), file=_Terminal()), PlainProgress)  # a real bar on a terminal


def test_train_weak_logs_no_bars(synth_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    args = ["train-weak", "--domain", "real", "--data-root", str(synth_dir / "domainnet"),
            "--model", str(synth_dir / "models" / "resnet-tiny"), "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--batch-size", "8"]  # fmt: skip
    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()  # as a fresh process starts
        res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a"), "--no-progress"])
        assert res.exit_code == 0, res.output
        assert "Loading weights" not in res.output and res.stderr == "", res.output

        hf_logging.enable_progress_bar()
        res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b")])  # progress on, stderr a log
        assert res.exit_code == 0, res.output
        assert "Loading weights" not in res.output and "\r" not in res.output and "it/s" not in res.output
        assert res.stdout.startswith("weak model for real:") and len(res.stdout.splitlines()) == 1
        assert re.fullmatch(r"epoch 1/1: loss \S+, hold acc \S+, test acc \S+\n", res.stderr), res.stderr
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
