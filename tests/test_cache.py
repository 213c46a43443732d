"""Schema 1: shards written and read back bit for bit, and every damaged cache refused in one line."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cpl_cache.cache import (
    ShardWriter,
    describe,
    load_domain,
    new_manifest,
    read_manifest,
    write_manifest,
    write_text,
)
from cpl_cache.cli import app
from cpl_cache.errors import UserError
from cpl_cache.synth.planted import PlantedConfig, write_planted_cache

K, D = 7, 16


def _rows(rng: np.random.Generator, n: int, start: int) -> dict:
    return dict(
        image_embeds=rng.standard_normal((n, D)).astype(np.float16),
        weak_logits=rng.standard_normal((n, K)).astype(np.float32),
        labels=rng.integers(0, K, n).astype(np.int16),
        split=rng.integers(0, 3, n).astype(np.uint8),
        index=np.arange(start, start + n, dtype=np.int64),
        paths=[f"dom/cls_{i % K}/img ü {i}.jpg" for i in range(start, start + n)],
    )


def _write_cache(root, domain="clipart", sizes=(13, 5, 9), shard_size=6, seed=0):
    """A small cache written batch by batch, as extract does; returns the rows written."""
    rng = np.random.default_rng(seed)
    ddir = root / domain
    manifest = new_manifest(
        domain=domain,
        classes=[f"c{k}" for k in range(K)],
        dim=D,
        strong={"id": "s", "revision": None},
        weak={"id": "w", "revision": None},
        split={"hold_frac": 0.5, "seed": 0},
        counts={"train": 27},
    )

    def listed(entry):
        manifest["shards"].append(entry)
        write_manifest(ddir, manifest)

    writer = ShardWriter(ddir, dim=D, num_classes=K, shard_size=shard_size, on_shard=listed)
    batches, start = [], 0
    for n in sizes:
        rows = _rows(rng, n, start)
        writer.add(**rows)
        batches.append(rows)
        start += n
    writer.flush()
    write_text(ddir, np.eye(K, D, dtype=np.float32), [f"a photo of a c{k}." for k in range(K)], 100.0)
    manifest["complete"] = True
    write_manifest(ddir, manifest)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_round_trip_is_bit_identical(tmp_path):
    rows = _write_cache(tmp_path)
    manifest = json.loads((tmp_path / "clipart" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [6, 6, 6, 6, 3]
    assert sorted(p.name for p in (tmp_path / "clipart").iterdir() if p.name.startswith(".")) == []

    data = load_domain(tmp_path, "clipart", num_classes=K, dim=D, with_paths=True)
    for key in ("image_embeds", "weak_logits", "split", "index"):
        got = getattr(data, key).numpy()
        assert got.dtype == rows[key].dtype
        assert got.tobytes() == rows[key].tobytes(), key
    assert data.labels.numpy().tolist() == rows["labels"].astype(np.int64).tolist()
    assert data.paths == list(rows["paths"])
    assert data.text_embeds.numpy().tobytes() == np.eye(K, D, dtype=np.float32).tobytes()
    assert data.logit_scale == 100.0
    assert data.rows("test").tolist() == np.flatnonzero(rows["split"] == 2).tolist()


def test_shards_out_of_order_are_read_in_index_order(tmp_path):
    rows = _write_cache(tmp_path)
    mpath = tmp_path / "clipart" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["shards"].reverse()  # as ranks that finished in another order would list them
    mpath.write_text(json.dumps(manifest))
    data = load_domain(tmp_path, "clipart", with_paths=True)
    assert data.index.numpy().tolist() == rows["index"].tolist()
    assert data.image_embeds.numpy().tobytes() == rows["image_embeds"].tobytes()
    assert data.paths == list(rows["paths"])


def test_reader_checks_the_manifest_against_the_request(tmp_path):
    _write_cache(tmp_path)
    with pytest.raises(UserError, match="7 classes, expected 345"):
        load_domain(tmp_path, "clipart", num_classes=345)
    with pytest.raises(UserError, match="16-d embeddings, expected 512"):
        load_domain(tmp_path, "clipart", dim=512)
    manifest = read_manifest(tmp_path, "clipart")
    manifest["complete"] = False
    write_manifest(tmp_path / "clipart", manifest)
    with pytest.raises(UserError, match="unfinished extraction.*resume"):
        load_domain(tmp_path, "clipart")
    manifest["schema"] = 99
    write_manifest(tmp_path / "clipart", manifest)
    with pytest.raises(UserError, match="schema 99"):
        load_domain(tmp_path, "clipart")


def _info(*args):
    return CliRunner().invoke(app, ["info", *args])


def _damage_other_domain(root):
    shutil.copytree(root / "clipart", root / "sketch")


def _damage_missing_manifest(root):
    (root / "clipart" / "manifest.json").unlink()


def _damage_missing_shard(root):
    (root / "clipart" / "shard-00002.h5").unlink()


def _damage_truncated_shard(root):
    path = root / "clipart" / "shard-00001.h5"
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize(
    ("damage", "domain", "message"),
    [
        (_damage_other_domain, "sketch", "holds domain 'clipart', not 'sketch'"),
        (_damage_missing_manifest, "clipart", "no cached domain 'clipart'"),
        (_damage_missing_shard, "clipart", "shard-00002.h5 is listed in the manifest but missing"),
        (_damage_truncated_shard, "clipart", "shard-00001.h5 is unreadable"),
    ],
)
def test_info_refuses_damaged_caches_in_one_line(tmp_path, damage, domain, message):
    _write_cache(tmp_path)
    ok = _info("--cache-dir", str(tmp_path))
    assert ok.exit_code == 0, ok.output
    assert "clipart: complete; train" in ok.output
    damage(tmp_path)
    result = _info("--cache-dir", str(tmp_path), "--domain", domain)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_truncated_shard_is_refused_by_the_reader_too(tmp_path):
    _write_cache(tmp_path)
    _damage_truncated_shard(tmp_path)
    with pytest.raises(UserError, match="unreadable"):
        load_domain(tmp_path, "clipart")


def test_info_reports_counts_per_split(tmp_path):
    rows = _write_cache(tmp_path)
    text = describe(tmp_path, "clipart")
    counts = np.bincount(rows["split"], minlength=3)
    assert f"train {counts[0]}, hold {counts[1]}, test {counts[2]}" in text
    assert "D=16 K=7; 5 shard(s)" in text


def test_missing_cache_dir_is_one_line(tmp_path):
    result = _info("--cache-dir", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_planted_cache_is_deterministic_and_hits_its_weak_accuracy(tmp_path):
    cfg = PlantedConfig(
        domain="real", n_train=3000, n_hold=100, n_test=1000, dim=32, classes=20, weak_acc=0.6
    )
    stats = write_planted_cache(tmp_path / "a", cfg)
    write_planted_cache(tmp_path / "b", cfg)
    a, b = load_domain(tmp_path / "a", "real"), load_domain(tmp_path / "b", "real")
    assert a.image_embeds.numpy().tobytes() == b.image_embeds.numpy().tobytes()
    assert a.weak_logits.numpy().tobytes() == b.weak_logits.numpy().tobytes()
    # The weak accuracy computed from the cached tensors is the planted one, up to sampling noise.
    acc = (a.weak_logits.argmax(1) == a.labels).double().mean().item()
    assert acc == pytest.approx(stats["weak_acc"], abs=1e-9)
    assert abs(acc - 0.6) < 0.03
    assert np.allclose(np.linalg.norm(a.image_embeds.float().numpy(), axis=1), 1.0, atol=2e-3)
    assert a.rows("train").numel() == 3000 and a.rows("test").numel() == 1000
    with pytest.raises(UserError, match="--overwrite"):
        write_planted_cache(tmp_path / "a", cfg)


def test_shard_files_are_only_visible_once_complete(tmp_path):
    """The writer lists a shard only after its final file is on disk and fully readable."""
    seen = []

    def on_shard(entry):
        path = tmp_path / "d" / entry["file"]
        with h5py.File(path, "r") as f:
            seen.append((entry["rows"], f["index"].shape[0]))

    writer = ShardWriter(tmp_path / "d", dim=D, num_classes=K, shard_size=4, on_shard=on_shard)
    writer.add(**_rows(np.random.default_rng(1), 10, 0))
    assert seen == [(4, 4), (4, 4)]
    writer.flush()
    assert seen[-1] == (2, 2)
