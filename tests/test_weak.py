"""train-weak: learns the synthetic classes well above chance, saves its split, and fails in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cpl_cache.cli import app
from cpl_cache.datasets import load_domainnet, load_rgb
from cpl_cache.errors import UserError
from cpl_cache.synth.images import ImageSetConfig, write_images
from cpl_cache.weak import WeakConfig, check_split_record, load_classifier, read_split_record, train_weak

K = 4  # classes of the weak-training set; chance is 1/4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One domain with enough hold images to learn from: 4 classes x 40 images, 8 hold and 8 test each."""
    root = tmp_path_factory.mktemp("weak-data")
    write_images(root, ImageSetConfig(classes=K, per_class=40, seed=1, domains=("real",)))
    return root


@pytest.fixture(scope="module")
def trained(data_root, synth_dir, tmp_path_factory):
    """train-weak through the CLI from the synth ResNet (5 classes, so its head must be replaced)."""
    out = tmp_path_factory.mktemp("weak") / "real"
    args = ["train-weak", "--domain", "real", "--data-root", str(data_root), "--out", str(out),
            "--model", str(synth_dir / "models" / "resnet-tiny"), "--epochs", "8", "--lr", "1e-2",
            "--batch-size", "16", "--workers", "0", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return out, res.output


def _accuracy_by_hand(out, images) -> float:
    """Reload the checkpoint and score the test rows with its own processor, outside train-weak."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    proc = AutoImageProcessor.from_pretrained(out)
    rows = images.rows("test")
    pics = [load_rgb(images.root / images.paths[i]) for i in rows]
    with torch.no_grad():
        pred = model(**proc(images=pics, return_tensors="pt")).logits.argmax(-1).numpy()
    return float((pred == images.labels[rows]).mean())


def test_train_weak_learns_the_classes_well_above_chance(trained, data_root):
    out, output = trained
    record = json.loads((out / "train_record.json").read_text())
    assert [e["epoch"] for e in record["epochs"]] == list(range(1, 9))
    # 8 epochs, AdamW lr 1e-2, batch 16, on 32 hold images from scratch: ~0.97 here, chance 0.25.
    assert record["test_acc"] >= 0.75, record["epochs"]
    assert f"weak model for real: test acc {record['test_acc']:.4f} after 8 epoch(s)" in output

    images = load_domainnet(data_root, "real")
    assert record["num_test_scored"] == len(images.rows("test")) == 32
    assert _accuracy_by_hand(out, images) == pytest.approx(record["test_acc"], abs=1e-9)

    config = json.loads((out / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(K)] == list(images.classes)
    assert config["label2id"] == {c: i for i, c in enumerate(images.classes)}
    assert read_split_record(out) == images.split_record()
    assert check_split_record(out, images) == images.split_record()


def test_augmentation_does_not_depend_on_the_worker_count(data_root, synth_dir, tmp_path):
    states = []
    for workers in (0, 2):
        cfg = WeakConfig(
            domain="real", data_root=data_root, out=tmp_path / f"w{workers}", epochs=1, batch_size=16,
            model=str(synth_dir / "models" / "resnet-tiny"), workers=workers, progress=False,
        )  # fmt: skip
        train_weak(cfg)
        from transformers import AutoModelForImageClassification

        states.append(AutoModelForImageClassification.from_pretrained(cfg.out).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _tiny(kind: str, path, classes: list[str]):
    """A tiny checkpoint of another architecture, saved with a ConvNeXt-style processor."""
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        CvtConfig,
        CvtForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
    )
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    labels = dict(id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    if kind == "cvt":
        config = CvtConfig(
            embed_dim=[8, 16, 16], num_heads=[1, 1, 2], depth=[1, 2, 3], **labels
        )  # cvt-13: [1, 2, 10]
        model = CvtForImageClassification(config)
    elif kind == "convnext":
        config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **labels)
        model = ConvNextForImageClassification(config)
    else:
        config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **labels)
        model = ResNetForImageClassification(config)
    model.save_pretrained(path)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["cvt", "convnext"])
def test_other_architectures_train_with_a_replaced_head(kind, data_root, tmp_path):
    base = _tiny(kind, tmp_path / kind, [f"imagenet_{i}" for i in range(7)])
    cfg = WeakConfig(domain="real", data_root=data_root, out=tmp_path / "out", model=str(base), epochs=1,
                     batch_size=32, workers=0, progress=False)  # fmt: skip
    record = train_weak(cfg)
    assert 0.0 <= record["test_acc"] <= 1.0 and len(record["epochs"]) == 1
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(cfg.out)
    assert model.config.num_labels == K
    assert model.config.id2label == dict(enumerate(load_domainnet(data_root, "real").classes))


def test_a_head_of_the_same_size_for_other_classes_starts_afresh(data_root, tmp_path):
    classes = load_domainnet(data_root, "real").classes
    from transformers import AutoModelForImageClassification

    other = _tiny("resnet", tmp_path / "other", ["w", "x", "y", "z"])
    before = AutoModelForImageClassification.from_pretrained(other).classifier[1].weight
    model, _ = load_classifier(str(other), classes)
    assert model.classifier[1].weight.shape == before.shape
    assert not torch.equal(model.classifier[1].weight, before)
    stem = AutoModelForImageClassification.from_pretrained(other).resnet.embedder.embedder.convolution.weight
    assert torch.equal(model.resnet.embedder.embedder.convolution.weight, stem)

    same = _tiny("resnet", tmp_path / "same", list(classes))  # same classes: the head is kept
    model, _ = load_classifier(str(same), classes)
    kept = AutoModelForImageClassification.from_pretrained(same).classifier[1].weight
    assert torch.equal(model.classifier[1].weight, kept)


def _one_line_error(args, *needles):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("cpl-cache: error: "), res.output
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_user_errors_are_one_line_with_exit_status_2(data_root, synth_dir, tmp_path):
    base = ["train-weak", "--data-root", str(data_root), "--out", str(tmp_path / "o"), "--workers", "0"]
    tiny = ["--model", str(synth_dir / "models" / "resnet-tiny")]
    _one_line_error(
        [*base, "--domain", "real", "--model", "nobody/no-such-classifier"],
        "model 'nobody/no-such-classifier' is not on disk and the hub is offline; "
        "pass a local path to --model",
    )
    _one_line_error([*base, "--domain", "real", "--model", "./no/such/folder"], "does not exist", "--model")
    _one_line_error([*base, "--domain", "real", "--model", str(data_root)], "is not an image classifier")
    _one_line_error([*base, "--domain", "photo", *tiny], "unknown DomainNet domain 'photo'", "quickdraw")
    _one_line_error([*base, "--domain", "sketch", *tiny], "sketch_train.txt not found")
    bad_root = ["train-weak", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    _one_line_error([*bad_root, "--domain", "real", *tiny], "does not exist; --data-root must be")
    _one_line_error([*base, "--domain", "real", "--epochs", "0", *tiny], "--epochs must be at least 1")
    _one_line_error(
        [*base, "--domain", "real", "--hold-frac", "2", *tiny], "--hold-frac must be between 0 and 1"
    )
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "config.json").write_text("{}")
    _one_line_error([*base, "--domain", "real", *tiny], "is not empty; pass --overwrite")


def test_missing_hold_or_test_images_are_counted(data_root, synth_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    images = load_domainnet(root, "real")
    for i in images.rows("test")[:3]:
        (root / images.paths[i]).unlink()
    _one_line_error(
        [
            "train-weak",
            "--domain",
            "real",
            "--data-root",
            str(root),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(synth_dir / "models" / "resnet-tiny"),
        ],  # fmt: skip
        "3 of 64 images listed for real are missing",
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (dict(split_seed=1), "split-seed 0, but this run splits with hold-frac 0.5, split-seed 1"),
        (dict(hold_frac=0.25), "pass --hold-frac 0.5 --split-seed 0"),
        (dict(domain="quickdraw"), "was trained on domainnet/real, not domainnet/quickdraw"),
        (dict(classes=True), "classes in another order"),
        (dict(lists=True), "lists changed?"),
    ],
)
def test_a_mismatched_split_record_is_refused(trained, data_root, tmp_path, change, needle):
    out, _ = trained
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    domain = change.get("domain", "real")
    if domain != "real":  # the same lists under another domain's name
        for part in ("train", "test"):
            text = (root / f"real_{part}.txt").read_text().replace("real/", f"{domain}/")
            (root / f"{domain}_{part}.txt").write_text(text)
    if change.get("classes"):  # two labels swapped: the same folders in another label order
        for part in ("train", "test"):
            lines = (root / f"real_{part}.txt").read_text().splitlines()
            swap = {"0": "1", "1": "0"}
            lines = [f"{p} {swap.get(lab, lab)}" for p, lab in (line.rsplit(" ", 1) for line in lines)]
            (root / f"real_{part}.txt").write_text("\n".join(lines) + "\n")
    if change.get("lists"):  # one test image dropped from the list: another hold set, same split settings
        lines = (root / "real_test.txt").read_text().splitlines()
        (root / "real_test.txt").write_text("\n".join(lines[1:]) + "\n")
    images = load_domainnet(root, domain, hold_frac=change.get("hold_frac", 0.5),
                            split_seed=change.get("split_seed", 0))  # fmt: skip
    with pytest.raises(UserError) as err:
        check_split_record(out, images)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "retrain with `cpl-cache train-weak" in str(err.value)


def test_records_that_are_absent_or_damaged(tmp_path, data_root):
    images = load_domainnet(data_root, "real")
    assert read_split_record(tmp_path) is None and check_split_record(tmp_path, images) is None
    assert read_split_record("microsoft/resnet-18") is None  # a hub id: nothing on disk to compare
    (tmp_path / "split.json").write_text("{not json")
    with pytest.raises(UserError, match="split.json is not readable JSON"):
        read_split_record(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"dataset": "domainnet", "domain": "real"}))
    with pytest.raises(UserError, match="lacks hold_frac, split_seed, hold_hash, num_hold, classes"):
        read_split_record(tmp_path)


def test_extract_refuses_a_weak_checkpoint_trained_on_another_split(trained, data_root, synth_dir, tmp_path):
    out, _ = trained
    args = ["extract", "--domain", "real", "--data-root", str(data_root), "--weak", str(out),
            "--strong", str(synth_dir / "models" / "clip-tiny"), "--cache-dir", str(tmp_path / "cache"),
            "--split-seed", "1", "--workers", "0", "--no-progress"]  # fmt: skip
    _one_line_error(args, f"weak checkpoint {out} was trained on the hold split", "--split-seed 0")
    assert not (tmp_path / "cache" / "real" / "manifest.json").exists()


def test_split_record_hash_matches_a_hash_computed_from_the_lists(trained, data_root):
    """The recorded hold hash is a pure function of the lists, fraction and seed."""
    out, _ = trained
    record = read_split_record(out)
    images = load_domainnet(data_root, "real", hold_frac=record["hold_frac"], split_seed=record["split_seed"])
    import hashlib

    hold = sorted(images.paths[i] for i in np.flatnonzero(images.split == 1))
    assert record["hold_hash"] == hashlib.sha256("\n".join(hold).encode()).hexdigest()
    assert record["num_hold"] == len(hold) == 32


def test_links_out_of_the_root_and_images_in_both_lists_are_refused_before_the_model_loads(
    data_root, tmp_path
):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    images = load_domainnet(root, "real")
    no_model = ["--model", "./no/such/folder"]  # reached only once the data passed its checks
    base = ["train-weak", "--domain", "real", "--data-root", str(root), "--out", str(tmp_path / "o")]
    rel = images.paths[images.rows("hold")[0]]
    (root / rel).rename(tmp_path / "elsewhere.jpg")
    (root / rel).symlink_to(tmp_path / "elsewhere.jpg")
    _one_line_error([*base, *no_model], f"{root / rel} is a symbolic link to", "pass --follow-symlinks")
    _one_line_error([*base, *no_model, "--follow-symlinks"], "model folder ./no/such/folder does not exist")

    train, test = (root / "real_train.txt").read_text(), (root / "real_test.txt").read_text()
    (root / "real_train.txt").write_text(train + test.splitlines()[3] + "\n")  # a test image trained on
    n = len(train.splitlines()) + 1
    _one_line_error(
        [*base, *no_model, "--follow-symlinks"],
        f"{root / 'real_test.txt'}:4: {test.splitlines()[3].split()[0]!r} is in the test list and in the "
        f"train list ({root / 'real_train.txt'}:{n})",
    )
