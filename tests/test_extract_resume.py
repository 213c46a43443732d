"""Stage one under SIGKILL and across ranks: a rerun finishes with exactly the rows of one clean run."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cpl_cache.cache import load_domain
from cpl_cache.cli import app
from cpl_cache.extract import ExtractConfig, run_extract

torch.set_num_threads(1)
DOMAIN = "painting"
SHARD, BATCH = 4, 2  # 40 images -> 10 shards of 2 batches: many moments to be killed in


def _args(synth_dir: Path, cache: Path) -> list[str]:
    m = synth_dir / "models"
    return [
        "extract", "--domain", DOMAIN, "--data-root", str(synth_dir / "domainnet"),
        "--strong", str(m / "clip-tiny"), "--weak", str(m / "resnet-tiny"), "--cache-dir", str(cache),
        "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--workers", "0", "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _cfg(synth_dir: Path, cache: Path) -> ExtractConfig:
    m = synth_dir / "models"
    return ExtractConfig(
        domain=DOMAIN, data_root=synth_dir / "domainnet", strong=str(m / "clip-tiny"),
        weak=str(m / "resnet-tiny"), cache_dir=cache, shard_size=SHARD, batch_size=BATCH, workers=0,
        device="cpu", progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def clean_run(synth_dir, tmp_path_factory):
    """One uninterrupted single-process run, in this process."""
    cache = tmp_path_factory.mktemp("clean")
    run_extract(_cfg(synth_dir, cache))
    return load_domain(cache, DOMAIN, with_paths=True)


def _assert_same_rows(got, want) -> None:
    assert got.index.tolist() == want.index.tolist()
    assert got.paths == want.paths
    assert torch.equal(got.labels, want.labels) and torch.equal(got.split, want.split)
    assert (got.image_embeds.float() - want.image_embeds.float()).abs().max() <= 1e-3
    assert (got.weak_logits - want.weak_logits).abs().max() <= 1e-5
    assert torch.allclose(got.text_embeds, want.text_embeds, atol=1e-6)


def _listed_shards_are_whole(ddir: Path) -> int:
    """Every shard the manifest lists is on disk, opens, and holds the rows it says; returns the count."""
    path = ddir / "manifest.json"
    if not path.exists():
        return 0
    m = json.loads(path.read_text())
    for entry in m["shards"]:
        with h5py.File(ddir / entry["file"], "r") as f:
            assert f["index"].shape[0] == entry["rows"] == f["image_embeds"].shape[0]
    return len(m["shards"])


def test_sigkill_at_random_moments_then_rerun_gives_the_rows_of_a_clean_run(synth_dir, tmp_path, clean_run):
    """Each try runs the extraction in a forked child (this process has torch and transformers loaded
    already, so a try costs a second, not an interpreter start) and SIGKILLs it at a random moment."""
    rng = random.Random(1234)
    cache = tmp_path / "cache"
    ddir = cache / DOMAIN
    cfg = _cfg(synth_dir, cache)
    ctx = multiprocessing.get_context("fork")
    # Kills at a random moment of start-up, then each once a random number more shards are listed,
    # plus a random few milliseconds (inside a batch, a shard write or a manifest write).
    partial = 0
    for attempt in range(5):
        child = ctx.Process(target=run_extract, args=(cfg,))
        child.start()
        start, target = time.monotonic(), min(9, _count_listed(ddir) + rng.randint(1, 3))
        wait = rng.uniform(0.0, 0.5)
        while child.is_alive():
            if attempt == 0 and time.monotonic() - start >= wait:
                break
            if attempt > 0 and _count_listed(ddir) >= target:
                time.sleep(rng.uniform(0.0, 0.02))
                break
            time.sleep(0.001)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join()
        listed = _listed_shards_are_whole(ddir)
        partial += child.exitcode == -signal.SIGKILL and 0 < listed < 10
    assert partial >= 2

    # What a kill inside each atomic write leaves, whether or not the random kills above hit one.
    for name in (".manifest.json.tmp-99999", ".text.h5.tmp-99999", ".shard-00007.h5.tmp-99999"):
        (ddir / name).write_bytes(b"half")

    # The same command, as a user would rerun it.
    done = CliRunner().invoke(app, _args(synth_dir, cache))
    assert done.exit_code == 0, done.output
    assert _listed_shards_are_whole(ddir) == 10
    _assert_same_rows(load_domain(cache, DOMAIN, with_paths=True), clean_run)
    m = json.loads((ddir / "manifest.json").read_text())
    assert sorted(p.name for p in ddir.glob("shard-*.h5")) == sorted(s["file"] for s in m["shards"])
    assert not list(ddir.glob(".*tmp-*"))  # a kill's half-written files are cleared by the rerun


def _count_listed(ddir: Path) -> int:
    try:
        return len(json.loads((ddir / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_two_process_torchrun_on_cpu_gives_the_rows_of_one_process(synth_dir, tmp_path, clean_run):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "cpl_cache", *_args(synth_dir, cache)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("40 rows") == 1  # one summary line, from rank 0
    ddir = cache / DOMAIN
    m = json.loads((ddir / "manifest.json").read_text())
    files = [s["file"] for s in m["shards"]]
    assert files == [f"shard-r00-{i:05d}.h5" for i in range(5)] + [f"shard-r01-{i:05d}.h5" for i in range(5)]
    assert m["complete"] and m["layout"]["world_size"] == 2 and not list(ddir.glob("progress-*"))
    got = load_domain(cache, DOMAIN, with_paths=True)
    assert len(np.unique(got.index.numpy())) == len(got.index) == 40  # no padding, no duplicates
    _assert_same_rows(got, clean_run)


@pytest.mark.parametrize(("name", "after"), [("shard-00003.h5", 0), ("manifest.json", 3), ("text.h5", 0)])
def test_a_full_disk_ends_in_one_line_leaves_no_temporaries_and_the_rerun_resumes(
    synth_dir, tmp_path, clean_run, full_disk, name, after
):
    """The disk fills up writing a shard, the manifest (after the fresh one and two shard updates), or
    text.h5: one line naming the file, exit 2, no half-written file; the same command then finishes."""
    cache = tmp_path / "cache"
    ddir = cache / DOMAIN
    full_disk(name, after)
    res = CliRunner().invoke(app, _args(synth_dir, cache))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines == [
        f"cpl-cache: error: cannot write {ddir / name} (No space left on device); free space on that disk "
        "(or use another folder) and rerun the same command"
    ], res.output
    assert not list(ddir.glob(".*tmp-*"))
    listed = _listed_shards_are_whole(ddir)
    assert listed == {"shard-00003.h5": 3, "manifest.json": 2, "text.h5": 0}[name]

    full_disk(None)  # the disk has room again
    done = CliRunner().invoke(app, _args(synth_dir, cache))
    assert done.exit_code == 0, done.output
    assert f"({40 - 4 * listed} new, 0 skipped)" in done.output
    _assert_same_rows(load_domain(cache, DOMAIN, with_paths=True), clean_run)


def test_a_second_extract_into_the_same_cache_is_refused_naming_the_lock(synth_dir, tmp_path):
    from cpl_cache.extract.writer import domain_lock

    ddir = tmp_path / "cache" / DOMAIN
    ddir.mkdir(parents=True)
    with domain_lock(ddir):  # what the first extract holds while it runs
        res = CliRunner().invoke(app, _args(synth_dir, tmp_path / "cache"))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and f"another extract (pid {os.getpid()}) is writing {ddir}" in lines[0], (
        res.output
    )
    assert f"it holds the lock {ddir / '.extract.lock'}" in lines[0]
    assert not (ddir / "manifest.json").exists()  # it wrote nothing
