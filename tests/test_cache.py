"""Schema 1: shards written and read back bit for bit, and every damaged cache refused in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cpl_cache.cache import (
    SPLIT_CODES,
    ShardWriter,
    atomic_write_text,
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
    split = np.concatenate([b["split"] for b in batches])
    manifest["counts"] = {name: int((split == code).sum()) for name, code in SPLIT_CODES.items()}
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


def _damage_shard_of_another_domain(root):
    """The tester's case: a shard of another domain, of the same row count, copied into this one."""
    _write_cache(root, domain="sketch", seed=1)
    shutil.copy(root / "sketch" / "shard-00001.h5", root / "clipart" / "shard-00001.h5")


def _damage_shard_swapped(root):
    shutil.copy(root / "clipart" / "shard-00000.h5", root / "clipart" / "shard-00001.h5")


def _edit_manifest(root, edit):
    path = root / "clipart" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _damage_file_outside(name):
    def damage(root):
        shutil.copy(root / "clipart" / "shard-00000.h5", root / "x.h5")
        _edit_manifest(root, lambda m: m["shards"][0].update(file=name))

    return damage


def _damage_field(key, value):
    return lambda root: _edit_manifest(root, lambda m: m.update({key: value}))


def _damage_old_format(root):
    """A cache written before shards carried their identity: no id in the manifest's entries."""
    _edit_manifest(root, lambda m: [(e.pop("id"), e.pop("range")) for e in m["shards"]])


def _damage_shard_without_identity(root):
    with h5py.File(root / "clipart" / "shard-00003.h5", "r+") as f:
        for key in ("id", "domain", "range"):
            del f.attrs[key]


IDENTITY_FIX = "restore the shard extract wrote there, or rerun extract with --overwrite"


@pytest.mark.parametrize(
    ("damage", "domain", "message"),
    [
        (_damage_other_domain, "sketch", "holds domain 'clipart', not 'sketch'"),
        (_damage_missing_manifest, "clipart", "no cached domain 'clipart'"),
        (_damage_missing_shard, "clipart", "shard-00002.h5 is listed in the manifest but missing"),
        (_damage_truncated_shard, "clipart", "shard-00001.h5 is unreadable"),
        (_damage_shard_of_another_domain, "clipart", "holds rows of domain 'sketch', not 'clipart'"),
        (_damage_shard_swapped, "clipart", "shard-00001.h5 is not the shard the manifest lists"),
        (_damage_file_outside("../x.h5"), "clipart", "file '../x.h5', which is not a file name inside"),
        (_damage_file_outside("/abs/x.h5"), "clipart", "file '/abs/x.h5', which is not a file name inside"),
        (_damage_field("num_classes", "ten"), "clipart", "has 'num_classes' \"ten\", expected an integer"),
        (_damage_field("shards", 5), "clipart", "has 'shards' 5, expected a list"),
        (_damage_field("dim", None), "clipart", "has 'dim' null, expected an integer"),
        (_damage_old_format, "clipart", "written by an older cpl-cache); re-extract with --overwrite"),
        (_damage_shard_without_identity, "clipart", "shard-00003.h5 carries no identity"),
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


def test_calibrated_scale_is_where_the_zero_shot_cross_entropy_is_least():
    """The bisection's kappa against torch: autograd's derivative of the mean cross-entropy is zero
    there, and a dense grid of scales finds nothing lower."""
    import torch

    from cpl_cache.synth.planted import calibrated_scale

    rng = np.random.default_rng(3)
    cos = rng.uniform(-0.3, 0.3, (400, 12))
    labels = rng.integers(0, 12, 400)
    cos[np.arange(400), labels] += 0.1  # the truth a little closer: a finite optimum
    kappa = calibrated_scale(cos, labels)
    c, y = torch.from_numpy(cos), torch.from_numpy(labels)
    k = torch.tensor(kappa, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.cross_entropy(k * c, y).backward()
    assert abs(k.grad.item()) < 1e-6
    grid = torch.linspace(0.5 * kappa, 2 * kappa, 2001, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(g * c, y) for g in grid])
    assert grid[nll.argmin()].item() == pytest.approx(kappa, rel=1e-3)


def test_mixture_cache_rows_do_not_depend_on_its_logit_scale(tmp_path):
    """The calibration's pretraining pairs are drawn apart from the rows: a cache at the calibrated
    scale and one at 100 hold the same embeddings, weak logits and labels, and differ in kappa only.
    The calibrated kappa is the one computed on those pairs, not the written default."""
    from cpl_cache.synth.planted import MixtureConfig, write_mixture_cache

    base = dict(domain="real", n_train=500, n_hold=50, n_test=200)
    write_mixture_cache(tmp_path / "a", MixtureConfig(**base))
    write_mixture_cache(tmp_path / "b", MixtureConfig(**base, logit_scale=100.0))
    a, b = load_domain(tmp_path / "a", "real"), load_domain(tmp_path / "b", "real")
    for field in ("image_embeds", "weak_logits", "labels"):
        assert getattr(a, field).numpy().tobytes() == getattr(b, field).numpy().tobytes()
    assert b.logit_scale == 100.0 and 8.0 < a.logit_scale < 16.0
    assert read_manifest(tmp_path / "a", "real")["mixture"]["logit_scale"] == pytest.approx(a.logit_scale)


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


# ------------------------------------------------------------------------------------ integrity


def test_each_shard_carries_its_domain_row_range_and_id_as_the_manifest_lists_them(tmp_path):
    _write_cache(tmp_path)
    manifest = read_manifest(tmp_path, "clipart")
    assert [e["range"] for e in manifest["shards"]] == [[0, 6], [6, 12], [12, 18], [18, 24], [24, 27]]
    assert len({e["id"] for e in manifest["shards"]}) == 5
    for entry in manifest["shards"]:
        with h5py.File(tmp_path / "clipart" / entry["file"]) as f:
            assert f.attrs["domain"] == "clipart" and f.attrs["id"] == entry["id"]
            assert f.attrs["range"].tolist() == entry["range"] and f.attrs["rows"] == entry["rows"]


@pytest.mark.parametrize(
    "damage",
    [
        _damage_shard_of_another_domain,
        _damage_shard_swapped,
        _damage_file_outside("../x.h5"),
        _damage_old_format,
    ],
)
def test_the_reader_refuses_a_shard_that_is_not_the_listed_one(tmp_path, damage):
    """What `train` loads: quickdraw scored 69.23% on a sketch shard copied in (the truth: 34.62%)."""
    _write_cache(tmp_path)
    damage(tmp_path)
    with pytest.raises(UserError, match="--overwrite") as err:
        load_domain(tmp_path, "clipart")
    assert "\n" not in str(err.value) and str(tmp_path / "clipart") in str(err.value)


def test_rows_outside_a_shards_range_or_claimed_twice_are_refused(tmp_path):
    _write_cache(tmp_path)
    with h5py.File(tmp_path / "clipart" / "shard-00001.h5", "r+") as f:
        f["index"][0] = 99
    with pytest.raises(UserError, match="shard-00001.h5 holds rows outside its range"):
        load_domain(tmp_path, "clipart")
    _edit_manifest(tmp_path, lambda m: m["shards"][2].update(range=[10, 18]))
    with pytest.raises(UserError, match="shards shard-00001.h5 and shard-00002.h5 both claim row 10"):
        load_domain(tmp_path, "clipart")


# Every key a reader relies on, with a value of the wrong JSON type.
MANIFEST_KEYS = {
    "schema": "1", "dataset": 3, "domain": 3, "classes": {}, "num_classes": "ten", "dim": None,
    "strong": "s", "weak": [], "preprocessing": 0, "split": [], "counts": [], "shards": 5, "skipped": {},
    "complete": 1,
}  # fmt: skip


@pytest.mark.parametrize(("key", "wrong"), MANIFEST_KEYS.items())
def test_every_manifest_key_is_checked_against_the_schema(tmp_path, key, wrong):
    _write_cache(tmp_path)
    _edit_manifest(tmp_path, lambda m: m.pop(key))
    with pytest.raises(UserError, match=f"lacks '{key}'|has schema null"):
        read_manifest(tmp_path, "clipart")
    _edit_manifest(tmp_path, lambda m: m.update({key: wrong}))
    with pytest.raises(UserError, match=f"has '{key}' .*, expected|has schema \"1\", this"):
        read_manifest(tmp_path, "clipart")
    result = _info("--cache-dir", str(tmp_path), "--domain", "clipart")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(
    ("code", "at", "fix"),
    [
        (errno.ENOSPC, "write", "free space on that disk"),
        (errno.EDQUOT, "write", "free space on that disk"),
        (errno.EROFS, "open", "not writable"),
        (errno.EACCES, "open", "not writable"),
    ],
)
def test_a_failed_atomic_write_keeps_the_old_file_leaves_no_temporary_and_names_the_path(
    tmp_path, monkeypatch, code, at, fix
):
    import builtins

    import cpl_cache.cache as cache

    path = tmp_path / "results.json"
    path.write_text("old\n")

    def fake_open(name, mode="r", *args, **kwargs):
        if at == "open":
            raise OSError(code, os.strerror(code), str(name))
        fh = builtins.open(name, mode, *args, **kwargs)

        def write(data):
            raise OSError(code, os.strerror(code))

        fh.write = write
        return fh

    monkeypatch.setattr(cache, "open", fake_open, raising=False)
    with pytest.raises(UserError) as err:
        atomic_write_text(path, "new\n")
    assert str(err.value).startswith(f"cannot write {path} ({os.strerror(code)}); ") and fix in str(err.value)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_train_on_a_full_disk_is_one_line_naming_the_results_file_and_leaves_no_temporary(
    tmp_path, full_disk
):
    write_planted_cache(tmp_path / "cache", PlantedConfig(domain="real", n_train=40, n_hold=10, n_test=10,
                                                          dim=8, classes=4))  # fmt: skip
    full_disk("weak-seed0.json")
    args = ["train", "--method", "weak", "--domain", "real", "--cache-dir", str(tmp_path / "cache")]
    try:
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "results"), "--device", "cpu"])
    finally:
        import torch

        torch.set_flush_denormal(False)  # train sets it for the whole process; later tests expect it off
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    want = f"cannot write {tmp_path / 'results' / 'real' / 'weak-seed0.json'} (No space left on device)"
    assert len(lines) == 1 and want in lines[0], result.stderr
    assert list((tmp_path / "results" / "real").iterdir()) == []


def _set_rows(root, key, value, rows=(1, 2, 3), shard="shard-00001.h5"):
    with h5py.File(root / "clipart" / shard, "r+") as f:
        data = f[key][:]
        data[list(rows)] = value
        f[key][:] = data


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda r: _set_rows(r, "image_embeds", np.nan),
            "3 image embedding(s) that are NaN, infinite or all zero",
        ),
        (
            lambda r: _set_rows(r, "image_embeds", np.inf),
            "3 image embedding(s) that are NaN, infinite or all zero",
        ),
        (
            lambda r: _set_rows(r, "image_embeds", 0.0),
            "3 image embedding(s) that are NaN, infinite or all zero",
        ),
        (lambda r: _set_rows(r, "split", 7), "3 row(s) of split [7], not 0 (train), 1 (hold) or 2 (test)"),
        (
            lambda r: _edit_manifest(r, lambda m: m["counts"].update(test=m["counts"]["test"] + 3)),
            "but the shards hold",
        ),
    ],
)
def test_broken_rows_and_counts_are_refused_by_info_and_the_reader(tmp_path, damage, message):
    """NaN, infinite or zero embeddings were scored as predictions, split codes outside 0-2 dropped rows
    silently, and edited manifest counts were trusted: info and every reader refuse each, naming it."""
    _write_cache(tmp_path)
    damage(tmp_path)
    result = _info("--cache-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    with pytest.raises(UserError, match="rerun extract with --overwrite"):
        load_domain(tmp_path, "clipart")
