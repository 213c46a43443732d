"""`cpl-cache synth`: DomainNet layout and traps, byte-identical for a seed, learnable, loadable offline."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH_CLASSES, SYNTH_PER_CLASS
from PIL import Image
from typer.testing import CliRunner

from cpl_cache.cli import app
from cpl_cache.datasets import DOMAINS, check_files, load_domainnet, load_rgb, prompt_for
from cpl_cache.synth.images import ImageSetConfig, class_names, draw_pretraining, label_order, write_images
from cpl_cache.synth.models import PretrainConfig, write_clip


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        res = runner.invoke(
            app,
            ["synth", str(tmp_path / name), "--classes", "3", "--per-class", "3", "--seed", "3"]
            + ["--pretrain-steps", "0"],
        )
        assert res.exit_code == 0, res.output
        assert "wrote 54 images of 3 classes in 6 domains" in res.output
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a == b  # images, lists, weights and configs alike
    assert len(a) == 6 * 3 * 3 + 12 + 8  # images + lists + checkpoint files

    cfg = ImageSetConfig(classes=3, per_class=3, seed=4, domains=("real",))
    write_images(tmp_path / "c", cfg)
    write_clip(tmp_path / "c-clip", seed=4)
    c = _digests(tmp_path / "c")
    assert {k for k in c if c[k] != a.get("domainnet/" + k)} == set(c)
    assert _digests(tmp_path / "c-clip") != _digests(tmp_path / "a" / "models" / "clip-tiny")


# A short pretraining (seconds): enough for zero-shot to work on the colour domains with 5 classes.
SHORT = PretrainConfig(images=600, steps=150)


@pytest.fixture(scope="module")
def pretrained_clip(tmp_path_factory) -> tuple[Path, list[str]]:
    names = label_order(class_names(5), 0)
    return write_clip(tmp_path_factory.mktemp("clip") / "clip", classes=names, pretrain=SHORT), names


def test_pretraining_is_deterministic_and_changes_the_weights(tmp_path, pretrained_clip):
    names = label_order(class_names(5), 0)
    tiny = PretrainConfig(images=32, steps=3, batch_size=16)
    a = _digests(write_clip(tmp_path / "a", classes=names, pretrain=tiny))
    b = _digests(write_clip(tmp_path / "b", classes=names, pretrain=tiny))
    plain = _digests(write_clip(tmp_path / "plain"))
    assert a == b
    assert a["model.safetensors"] != plain["model.safetensors"]
    assert {k for k in a if a[k] != plain[k]} == {"model.safetensors"}  # same config and processor
    assert _digests(pretrained_clip[0])["model.safetensors"] != a["model.safetensors"]


def test_pretraining_images_are_not_the_image_sets(tmp_path):
    """Pretraining draws from a seed stream of its own: none of its images is a dataset image."""
    cfg = ImageSetConfig(classes=3, per_class=6, seed=0, domains=("clipart", "quickdraw"))
    write_images(tmp_path, cfg)
    ours = {np.asarray(load_rgb(p)).tobytes() for p in tmp_path.rglob("*.*") if p.suffix != ".txt"}
    drawn = draw_pretraining(3, 200, 0, (1, 0, 0, 1, 0, 0))
    assert {d for _, _, d in drawn} == {"clipart", "quickdraw"}
    assert sorted({label for _, label, _ in drawn}) == [0, 1, 2]
    assert not ours & {np.asarray(im).tobytes() for im, _, _ in drawn}


def _zero_shot(clip_dir: Path, images, names: list[str]) -> float:
    import torch
    from transformers import AutoProcessor, CLIPModel

    proc = AutoProcessor.from_pretrained(clip_dir)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    pics = [load_rgb(images.root / p) for p in images.paths]
    with torch.no_grad():
        img = clip.get_image_features(**proc(images=pics, return_tensors="pt")).pooler_output
        prompts = [prompt_for(c) for c in names]
        txt = clip.get_text_features(**proc(text=prompts, return_tensors="pt", padding=True)).pooler_output
    pred = (img @ torch.nn.functional.normalize(txt, dim=-1).T).argmax(1).numpy()
    return float((pred == images.labels).mean())


@pytest.mark.parametrize("domain", ["clipart", "real"])
def test_pretrained_clip_classifies_unseen_images_zero_shot(tmp_path, pretrained_clip, domain):
    """Zero-shot with "a photo of a {class}." on image-set images (none seen in pretraining): far above
    the 20% of chance, where the same CLIP with its random weights is not."""
    clip_dir, names = pretrained_clip
    write_images(tmp_path / "data", ImageSetConfig(classes=5, per_class=12, seed=0, domains=(domain,)))
    images = load_domainnet(tmp_path / "data", domain)
    assert list(images.classes) == names
    acc = _zero_shot(clip_dir, images, names)
    assert acc >= 0.6, acc  # measured: clipart 0.92, real 0.77 (60 images each); random weights 0.2
    assert _zero_shot(write_clip(tmp_path / "plain"), images, names) <= 0.4


def test_refuses_a_folder_that_already_holds_synthetic_data(synth_dir):
    res = CliRunner().invoke(app, ["synth", str(synth_dir)])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "already holds synthetic data" in res.output


@pytest.mark.parametrize("domain", DOMAINS)
def test_lists_are_in_the_official_format_with_a_label_order_of_their_own(synth_dir, domain):
    root = synth_dir / "domainnet"
    ext = "png" if domain == "quickdraw" else "jpg"
    pattern = re.compile(rf"^{domain}/([a-z_]+)/{domain}_\d{{3}}_\d{{6}}\.{ext} (\d+)$")
    folder_of = {}
    n = 0
    for part in ("train", "test"):
        for line in (root / f"{domain}_{part}.txt").read_text().splitlines():
            m = pattern.match(line)
            assert m, line
            assert folder_of.setdefault(int(m[2]), m[1]) == m[1]
            n += 1
    assert sorted(folder_of) == list(range(SYNTH_CLASSES))
    in_label_order = [folder_of[k] for k in range(SYNTH_CLASSES)]
    assert in_label_order != sorted(in_label_order)
    assert sorted(p.name for p in (root / domain).iterdir()) == sorted(in_label_order)
    assert n == SYNTH_CLASSES * SYNTH_PER_CLASS

    images = load_domainnet(root, domain)
    assert images.classes == tuple(in_label_order)
    check_files(images)
    # Every class has test images; every class but painting's last has train images, as in DomainNet.
    train_classes = set(images.labels[images.rows("train")].tolist())
    expected = set(range(SYNTH_CLASSES)) - ({SYNTH_CLASSES - 1} if domain == "painting" else set())
    assert train_classes == expected
    assert set(images.labels[images.rows("test")].tolist()) == set(range(SYNTH_CLASSES))


def test_traps_are_present_and_decode_to_rgb(synth_dir):
    root = synth_dir / "domainnet"
    modes = {}
    for domain in ("sketch", "painting", "quickdraw"):
        for p in sorted((root / domain).rglob("*.*")):
            with Image.open(p) as im:
                modes.setdefault(domain, []).append((im.mode, "transparency" in im.info, p))
    assert [m for m, _, _ in modes["sketch"]].count("L") == 1
    assert [m for m, _, _ in modes["painting"]].count("CMYK") == 1
    palettes = [p for m, t, p in modes["quickdraw"] if m == "P" and t]
    assert len(palettes) == 1

    # The transparent palette entry is the white background: after decoding, corners are white
    # and the drawing (black strokes) survives.
    rgb = np.asarray(load_rgb(palettes[0]))
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    assert (rgb[0, 0] == 255).all() and rgb.min() == 0
    cmyk = next(p for m, _, p in modes["painting"] if m == "CMYK")
    with Image.open(cmyk) as im:
        ref = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(load_rgb(cmyk)), ref)


def _features(images, rows) -> np.ndarray:
    return np.stack(
        [
            np.asarray(load_rgb(images.root / images.paths[i]).resize((12, 12)), np.float32).ravel()
            for i in rows
        ]
    )


@pytest.mark.parametrize(("domain", "floor"), [("real", 0.55), ("quickdraw", 0.45)])
def test_classes_are_learnable_from_pixels(synth_dir, domain, floor):
    """A nearest-centroid classifier on 12x12 pixels beats chance by far: the content depends on the class."""
    images = load_domainnet(synth_dir / "domainnet", domain)
    tr, te = images.rows("train"), np.concatenate([images.rows("hold"), images.rows("test")])
    xtr, xte = _features(images, tr), _features(images, te)
    centroids = np.stack([xtr[images.labels[tr] == c].mean(0) for c in range(SYNTH_CLASSES)])
    pred = ((xte[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    acc = (pred == images.labels[te]).mean()
    assert acc >= floor, acc  # chance is 0.2; hues wander around the class's, outlines vary in raw pixels


def test_checkpoints_load_by_path_offline_and_run(synth_dir):
    import torch
    from transformers import AutoModelForImageClassification, AutoProcessor, CLIPModel

    images = load_domainnet(synth_dir / "domainnet", "clipart")
    pics = [load_rgb(images.root / p) for p in images.paths[:3]]

    clip_dir = synth_dir / "models" / "clip-tiny"
    proc = AutoProcessor.from_pretrained(clip_dir)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    prompts = [prompt_for(c) for c in images.classes]
    with torch.no_grad():
        img = clip.get_image_features(**proc(images=pics, return_tensors="pt")).pooler_output
        txt = clip.get_text_features(**proc(text=prompts, return_tensors="pt", padding=True)).pooler_output
    assert img.shape == (3, 32) and txt.shape == (SYNTH_CLASSES, 32)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    # Byte-level tokens: any text is covered, no byte falls back to the unknown token.
    ids = proc.tokenizer("birthday_cake ü")["input_ids"]
    assert ids[0] == proc.tokenizer.bos_token_id and ids[-1] == proc.tokenizer.eos_token_id
    assert proc.tokenizer.unk_token_id not in ids[1:-1]
    assert proc.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "birthday_cakeü"

    weak_dir = synth_dir / "models" / "resnet-tiny"
    proc = AutoProcessor.from_pretrained(weak_dir)
    weak = AutoModelForImageClassification.from_pretrained(weak_dir).eval()
    assert [weak.config.id2label[i] for i in range(SYNTH_CLASSES)] == list(images.classes)
    with torch.no_grad():
        logits = weak(**proc(images=pics, return_tensors="pt")).logits
    assert logits.shape == (3, SYNTH_CLASSES)


def test_synth_shows_its_progress_and_logs_one_line_per_stage(tmp_path):
    args = ["--classes", "2", "--per-class", "2", "--pretrain-steps", "5"]
    res = CliRunner().invoke(app, ["synth", str(tmp_path / "s"), *args])  # stderr is no terminal: no bar
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("wrote 24 images of 2 classes") and len(res.stdout.splitlines()) == 1
    lines = res.stderr.splitlines()
    assert "\r" not in res.stderr and len(lines) == 2, res.stderr
    assert re.fullmatch(r"synth images: 24/24 img in \d+\.\ds", lines[0])
    assert re.fullmatch(r"pretrain tiny CLIP: 5/5 step in \d+\.\ds \(loss=\d+\.\d{3}\)", lines[1])

    res = CliRunner().invoke(app, ["synth", str(tmp_path / "q"), *args, "--no-progress"])
    assert res.exit_code == 0 and res.stderr == "", res.output


def test_synth_cache_says_when_even_a_ceiling_would_be_near_chance(tmp_path):
    """600 rows of 32 dims made a cache where the ground-truth ceiling sat near chance, silently."""
    from typer.testing import CliRunner

    from cpl_cache.cli import app

    base = ["synth-cache", "--cache-dir", str(tmp_path), "--domain", "clipart", "--overwrite"]
    weak = CliRunner().invoke(
        app, [*base, "--train", "600", "--test", "200", "--dim", "32", "--classes", "10"]
    )
    assert weak.exit_code == 0 and "barely separate its classes" in weak.stderr, weak.output
    assert "chance 10.0%" in weak.stderr
    fine = CliRunner().invoke(app, [*base, "--train", "2000", "--test", "500"])
    assert fine.exit_code == 0 and "barely separate" not in fine.stderr, fine.output
