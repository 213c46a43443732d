"""Office-Home and class-folder layouts: label order, the seeded three-way split, one-line errors, and
trees with spaces and non-ASCII names carried through train-weak, extract, train and the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cpl_cache.cache import load_domain
from cpl_cache.cli import app
from cpl_cache.datasets import (
    DATASETS,
    OFFICEHOME_DOMAINS,
    SPLIT_CODES,
    TRAIN_FRAC,
    check_files,
    load_dataset,
    load_domainnet,
    load_folder,
    load_officehome,
    load_rgb,
    split_three_ways,
)
from cpl_cache.errors import UserError
from cpl_cache.pipeline import load_grid, parse_grid
from cpl_cache.report import render_table
from cpl_cache.reproduce import ReproduceConfig, reproduce
from cpl_cache.weak import check_split_record

torch.set_num_threads(1)

TRAIN, HOLD, TEST = SPLIT_CODES["train"], SPLIT_CODES["hold"], SPLIT_CODES["test"]
# Folder names as they might arrive: a space, accents, CJK, an underscore; deliberately not in sorted order.
CLASSES = ["日本", "café au lait", "Alarm_Clock"]
SUFFIXES = [".jpg", ".PNG", ".jpeg", ".bmp", ".webp", ".JPG", ".png", ".jpg"]


def _image(path, label: int, i: int) -> None:
    """A 12x12 image whose colour says its class (each suffix in its own format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = [(220, 40, 40), (40, 200, 60), (50, 60, 230)][label % 3]
    arr = np.full((12, 12, 3), colour, np.uint8)
    arr[i % 12, :] = 255
    Image.fromarray(arr).save(path, format={".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower()))


def _tree(root, domain: str, classes=CLASSES, per_class: int = 8) -> list[str]:
    """root/domain/class/* with mixed suffixes, names with spaces, and files that are not images."""
    rels = []
    for label, cls in enumerate(classes):
        for i in range(per_class):
            rel = f"{domain}/{cls}/photo {i:02d}{SUFFIXES[i % len(SUFFIXES)]}"
            _image(root / rel, label, i)
            rels.append(rel)
        (root / domain / cls / "notes.txt").write_text("not an image")
        (root / domain / cls / "._photo 00.jpg").write_bytes(b"\0\0")  # macOS archive debris
    (root / domain / ".thumbnails").mkdir()
    (root / domain / "__MACOSX").mkdir()
    return rels


# ------------------------------------------------------------------------------ reading trees


@pytest.mark.parametrize("name", ["officehome", "folder"])
def test_sorted_class_folders_give_the_labels_and_sorted_files_the_rows(tmp_path, name):
    rels = _tree(tmp_path, "Real World")
    images = load_dataset(name, tmp_path, "Real World")
    order = sorted(CLASSES)  # code-point order: upper case, then lower case, then CJK
    assert images.classes == ("Alarm_Clock", "café au lait", "日本") == tuple(order)
    expected = sorted(rels, key=lambda r: (order.index(r.split("/")[1]), r.split("/")[2]))
    assert images.paths == tuple(expected)
    assert images.labels.tolist() == [order.index(r.split("/")[1]) for r in expected]
    assert (images.dataset, images.domain, images.root) == (name, "Real World", tmp_path)
    check_files(images)  # every path names a file on disk
    assert images.split_record()["dataset"] == name and images.split_record()["classes"] == order


def test_officehome_and_folder_split_one_tree_alike_and_files_order_does_not_matter(tmp_path):
    _tree(tmp_path / "a", "Art")
    # The same files created in the opposite order: directory order must not leak into labels or rows.
    for rel in reversed(
        sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*"))
    ):
        src, dst = tmp_path / "a" / rel, tmp_path / "b" / rel
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    a = load_officehome(tmp_path / "a", "Art", hold_frac=0.5, split_seed=4)
    b = load_folder(tmp_path / "b", "Art", hold_frac=0.5, split_seed=4)
    assert a.paths == b.paths and a.classes == b.classes
    assert a.split.tolist() == b.split.tolist() and a.hold_hash() == b.hold_hash()
    assert load_officehome(tmp_path / "a", "Art", split_seed=5).split.tolist() != a.split.tolist()


def _by_hand(labels, train_frac, hold_frac, seed):
    """The documented rule written out class by class: one permutation from default_rng([seed, class]);
    a uniform draw rounds each fractional count up with its own probability; train, hold, test in turn."""
    codes = {}
    for c in sorted(set(labels)):
        rows = [i for i, lab in enumerate(labels) if lab == c]
        rng = np.random.default_rng([seed, c])
        n_train = int(train_frac * len(rows) // 1)
        n_train += rng.random() < train_frac * len(rows) - n_train
        rest = len(rows) - n_train
        n_hold = int(hold_frac * rest // 1)
        n_hold += rng.random() < hold_frac * rest - n_hold
        perm = [rows[j] for j in rng.permutation(len(rows))]
        for k, r in enumerate(perm):
            codes[r] = TRAIN if k < n_train else HOLD if k < n_train + n_hold else TEST
    return [codes[i] for i in range(len(labels))]


@pytest.mark.parametrize("hold_frac", [0.0, 0.25, 0.5, 1.0])
def test_three_way_split_follows_the_rule_and_hold_frac_never_moves_train(hold_frac):
    labels = np.repeat(np.arange(7), [1, 2, 5, 10, 11, 17, 40])
    codes = split_three_ways(labels, hold_frac, seed=3)
    assert codes.dtype == np.uint8
    assert codes.tolist() == _by_hand(labels.tolist(), TRAIN_FRAC, hold_frac, 3)
    for c in range(7):
        n = int((labels == c).sum())
        n_train = int(((labels == c) & (codes == TRAIN)).sum())
        n_hold = int(((labels == c) & (codes == HOLD)).sum())
        assert np.floor(TRAIN_FRAC * n) <= n_train <= np.ceil(TRAIN_FRAC * n)
        assert np.floor(hold_frac * (n - n_train)) <= n_hold <= np.ceil(hold_frac * (n - n_train))
    reference_train = split_three_ways(labels, 0.5, seed=3) == TRAIN
    assert ((codes == TRAIN) == reference_train).all()


def test_three_way_split_of_one_class_does_not_move_when_another_changes_and_totals_are_unbiased():
    a = split_three_ways(np.repeat([0, 1, 2], [9, 13, 6]), 0.5, seed=0)
    b = split_three_ways(np.repeat([0, 1, 2], [9, 3, 6]), 0.5, seed=0)
    assert a[:9].tolist() == b[:9].tolist() and a[22:].tolist() == b[12:].tolist()
    # 2000 classes of 7 images: 4.2 train and 1.4 hold expected per class; totals within 2 %.
    codes = split_three_ways(np.repeat(np.arange(2000), 7), 0.5, seed=1)
    assert abs((codes == TRAIN).sum() / 14000 - 0.6) < 0.012
    assert abs((codes == HOLD).sum() / 14000 - 0.2) < 0.012
    with pytest.raises(UserError, match="--hold-frac must be between 0 and 1"):
        split_three_ways(np.zeros(3), 1.5, seed=0)
    with pytest.raises(UserError, match="--split-seed must be a non-negative integer"):
        split_three_ways(np.zeros(3), 0.5, seed=-1)


def test_folder_lists_rule_with_paths_that_hold_spaces(tmp_path):
    rels = _tree(tmp_path, "Ölbild 日本", per_class=4)
    # Labels from the lists, unlike the sorted folder order; split on the last whitespace only.
    label = {"日本": 0, "café au lait": 1, "Alarm_Clock": 2}
    lines = [f"{r} {label[r.split('/')[1]]}" for r in rels]
    train, test = lines[0::2], lines[1::2]
    (tmp_path / "Ölbild 日本_train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (tmp_path / "Ölbild 日本_test.txt").write_text("\n".join(test) + "\n", encoding="utf-8")
    images = load_folder(tmp_path, "Ölbild 日本", hold_frac=0.5, split_seed=0)
    assert images.classes == tuple(CLASSES)
    assert images.paths == tuple(r for r in rels[0::2]) + tuple(r for r in rels[1::2])
    assert images.labels.tolist() == [int(x.rsplit(maxsplit=1)[1]) for x in train + test]
    assert (images.split[: len(train)] == TRAIN).all() and (images.split[len(train) :] != TRAIN).all()
    check_files(images)

    (tmp_path / "Ölbild 日本_test.txt").unlink()
    with pytest.raises(UserError, match="_train.txt exists but .*_test.txt does not; give both lists"):
        load_folder(tmp_path, "Ölbild 日本")


def _one_line(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as err:
        fn(*args, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_bad_trees_and_names_end_in_one_line_naming_the_fix(tmp_path):
    _tree(tmp_path, "Real World", per_class=2)
    msg = _one_line(load_officehome, tmp_path, "real_world")
    assert 'did you mean "Real World"? quote it: --domain "Real World"' in msg
    assert all(repr(d) in msg for d in OFFICEHOME_DOMAINS)
    assert "has no Art/ folder" in _one_line(load_officehome, tmp_path, "Art")
    assert "does not exist" in _one_line(load_officehome, tmp_path / "nowhere", "Art")
    assert "domains there: 'Real World'" in _one_line(load_folder, tmp_path, "Sketch")
    assert "is not a folder name" in _one_line(load_folder, tmp_path, "../Real World")
    assert "pass --dataset officehome" in _one_line(load_domainnet, tmp_path, "Clipart")
    msg = _one_line(load_dataset, "imagenet", tmp_path, "Real World")
    assert msg == "unknown dataset 'imagenet'; use one of domainnet, folder, officehome"
    assert set(DATASETS) == {"domainnet", "folder", "officehome"}

    (tmp_path / "Real World" / "kiwi").mkdir()
    (tmp_path / "Real World" / "kiwi" / "readme.txt").write_text("no images here")
    assert "class folder" in _one_line(load_officehome, tmp_path, "Real World")
    assert "kiwi holds no images" in _one_line(load_folder, tmp_path, "Real World")


def test_grid_names_its_dataset_and_reproduce_takes_it_unless_told(tmp_path, monkeypatch):
    g = parse_grid({"dataset": "officehome", "domains": ["Real World"], "seeds": [0], "methods": ["weak"]})
    assert g.dataset == "officehome" and g.domains == ("Real World",)
    assert parse_grid({"domains": ["real"], "seeds": [0], "methods": ["weak"]}).dataset is None
    with pytest.raises(UserError, match="unknown dataset 'office'; use one of domainnet, folder, officehome"):
        parse_grid({"dataset": "office", "domains": ["Art"], "seeds": [0], "methods": ["weak"]})
    t6 = load_grid("pipelines/table6.toml")
    assert t6.dataset == "officehome" and t6.domains == OFFICEHOME_DOMAINS

    seen = []

    def stop(cfg, domain, out):
        seen.append((cfg.dataset, domain))
        raise UserError("stop")

    monkeypatch.setattr("cpl_cache.reproduce._train_weak", stop)
    grid = tmp_path / "g.toml"
    grid.write_text('dataset = "officehome"\ndomains = ["Real World"]\nseeds = [0]\nmethods = ["weak"]\n')
    cfg = ReproduceConfig(pipeline=grid, data_root=tmp_path, weak_dir=tmp_path / "w", progress=False)
    for given, used in [(None, "officehome"), ("folder", "folder")]:
        with pytest.raises(UserError, match="stop"):
            reproduce(ReproduceConfig(**{**cfg.__dict__, "dataset": given}))
        assert seen.pop() == (used, "Real World")
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        reproduce(ReproduceConfig(**{**cfg.__dict__, "dataset": "imagenet"}))
    assert not seen


# --------------------------------------------------------------------- through the whole pipeline


def _cli(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize(
    ("layout", "domain"),
    [("officehome", "Real World"), ("folder", "Ölbild 日本"), ("folder-lists", "Real World")],
)
def test_trees_go_through_extract_train_and_the_table(synth_dir, tmp_path, layout, domain):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from cpl_cache.synth.models import write_resnet

    data = tmp_path / "data root"
    rels = _tree(data, domain)
    dataset = "folder" if layout == "folder-lists" else layout
    if layout == "folder-lists":
        label = {c: i for i, c in enumerate(CLASSES)}  # list order, not sorted folder order
        lines = [f"{r} {label[r.split('/')[1]]}" for r in rels]
        (data / f"{domain}_train.txt").write_text("\n".join(lines[0::2]) + "\n", encoding="utf-8")
        (data / f"{domain}_test.txt").write_text("\n".join(lines[1::2]) + "\n", encoding="utf-8")
    images = load_dataset(dataset, data, domain)
    weak = tmp_path / "weak" / domain
    if layout == "officehome":  # train-weak from the synth ResNet (other classes: its head is replaced)
        out = _cli(
            "train-weak", "--dataset", dataset, "--domain", domain, "--data-root", str(data),
            "--out", str(weak), "--model", str(synth_dir / "models" / "resnet-tiny"), "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress",
        )  # fmt: skip
        assert f"weak model for {domain}: test acc" in out
        assert json.loads((weak / "split.json").read_text(encoding="utf-8")) == images.split_record()
        other = load_dataset(dataset, data, domain, split_seed=1)
        with pytest.raises(UserError, match="train-weak --dataset officehome --domain 'Real World' --hold"):
            check_split_record(weak, other)
    else:
        write_resnet(weak, list(images.classes))

    cache, results = tmp_path / "cache", tmp_path / "results"
    out = _cli(
        "extract", "--dataset", dataset, "--domain", domain, "--data-root", str(data), "--weak", str(weak),
        "--strong", str(synth_dir / "models" / "clip-tiny"), "--cache-dir", str(cache), "--batch-size", "16",
        "--workers", "0", "--device", "cpu", "--shard-size", "10", "--no-progress",
    )  # fmt: skip
    assert out.startswith(f"{domain}: {len(images)} rows in 3 shard(s)")

    got = load_domain(cache, domain, with_paths=True)
    assert got.paths == list(images.paths) and got.index.tolist() == list(range(len(images)))
    assert got.labels.tolist() == images.labels.tolist() and got.split.tolist() == images.split.tolist()
    m = json.loads((cache / domain / "manifest.json").read_text(encoding="utf-8"))
    assert (m["dataset"], m["domain"], m["classes"]) == (dataset, domain, list(images.classes))
    # The rows hold the images their paths name: weak logits of two rows against the model run by hand.
    model = AutoModelForImageClassification.from_pretrained(weak).eval()
    proc = AutoImageProcessor.from_pretrained(weak)
    rows = [0, len(images) - 1]
    with torch.no_grad():
        pics = [load_rgb(data / got.paths[r]) for r in rows]
        ref = model(**proc(images=pics, return_tensors="pt")).logits.numpy()
    assert np.abs(got.weak_logits[rows].numpy() - ref).max() <= 1e-3

    for method in ("weak", "zeroshot", "cpl", "ceiling"):
        _cli("train", "--method", method, "--domain", domain, "--cache-dir", str(cache),
             "--out", str(results), "--device", "cpu")  # fmt: skip
    rec = json.loads((results / domain / "cpl-seed0.json").read_text(encoding="utf-8"))
    assert rec["domain"] == domain
    table = render_table(results, "markdown")
    assert table.splitlines()[0] == f"| Method | {domain} | Avg | PGR |"
    assert f"{domain},{domain}_std,{domain}_n" in render_table(results, "csv").splitlines()[0]
    assert json.loads(render_table(results, "json"))["domains"] == [domain]
    assert domain in _cli("table", "--results", str(results))
