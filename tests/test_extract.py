"""Stage one: cached rows against the models run the plain way, preprocessing plans, bad inputs refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cpl_cache.cache import load_domain
from cpl_cache.cli import app
from cpl_cache.datasets import load_domainnet, load_rgb, prompt_for
from cpl_cache.extract import ExtractConfig, run_extract
from cpl_cache.extract import resample as resample_mod
from cpl_cache.extract.mapper import Mapper, plans_for
from cpl_cache.extract.reader import plan_for, rank_share, shard_ranges
from cpl_cache.train.prompt import prompt_token_ids

torch.set_num_threads(1)


def _models(synth_dir: Path) -> tuple[str, str]:
    return str(synth_dir / "models" / "clip-tiny"), str(synth_dir / "models" / "resnet-tiny")


def _cfg(synth_dir: Path, cache: Path, domain: str, **kw) -> ExtractConfig:
    strong, weak = _models(synth_dir)
    base = dict(
        domain=domain, data_root=synth_dir / "domainnet", strong=strong, weak=weak, cache_dir=cache,
        batch_size=8, workers=0, device="cpu", shard_size=16, progress=False,
    )  # fmt: skip
    base.update(kw)
    return ExtractConfig(**base)


def _reference(synth_dir: Path, root: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each image alone through each model's own processor and forward, the plain way."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, CLIPModel, CLIPProcessor

    strong, weak = _models(synth_dir)
    clip, proc = CLIPModel.from_pretrained(strong).eval(), CLIPProcessor.from_pretrained(strong)
    wmodel = AutoModelForImageClassification.from_pretrained(weak).eval()
    wproc = AutoImageProcessor.from_pretrained(weak)
    embeds, logits = [], []
    with torch.no_grad():
        for rel in paths:
            img = load_rgb(root / rel)
            e = clip.get_image_features(**proc(images=img, return_tensors="pt")).pooler_output
            embeds.append((e / e.norm(dim=-1, keepdim=True))[0].numpy())
            logits.append(wmodel(**wproc(images=img, return_tensors="pt")).logits[0].numpy())
    return np.stack(embeds), np.stack(logits)


# The three domains with DomainNet's decoding traps: CMYK JPEG, grayscale JPEG, palette PNG with transparency.
@pytest.mark.parametrize("domain", ["painting", "sketch", "quickdraw"])
def test_cached_rows_equal_each_model_run_on_its_own_processor(synth_dir, tmp_path, domain):
    cache = tmp_path / "cache"
    summary = run_extract(_cfg(synth_dir, cache, domain, workers=1 if domain == "painting" else 0))
    images = load_domainnet(synth_dir / "domainnet", domain)
    assert summary["rows"] == len(images) and summary["skipped"] == 0
    got = load_domain(cache, domain, with_paths=True)
    assert got.index.tolist() == list(range(len(images)))
    assert got.paths == list(images.paths)
    assert got.labels.tolist() == images.labels.tolist()
    assert got.split.numpy().tolist() == images.split.tolist()

    ref_e, ref_l = _reference(synth_dir, images.root, list(images.paths))
    assert got.image_embeds.dtype == torch.float16
    assert np.abs(got.image_embeds.float().numpy() - ref_e).max() <= 2e-3
    assert np.abs(got.weak_logits.numpy() - ref_l).max() <= 1e-3
    assert np.allclose(np.linalg.norm(got.image_embeds.float().numpy(), axis=1), 1.0, atol=2e-3)

    m = got.manifest
    assert m["complete"] and m["counts"] == {s: len(images.rows(s)) for s in ("train", "hold", "test")}
    assert m["split"]["hold_hash"] == images.hold_hash() and m["classes"] == list(images.classes)
    assert [s["file"] for s in m["shards"]] == [f"shard-{i:05d}.h5" for i in range(len(m["shards"]))]

    # text.h5: the prompts' embeddings through the processor's tokenizer, padded only to the longest.
    from transformers import CLIPModel, CLIPProcessor

    strong, _ = _models(synth_dir)
    clip, proc = CLIPModel.from_pretrained(strong).eval(), CLIPProcessor.from_pretrained(strong)
    prompts = [prompt_for(c) for c in images.classes]
    with torch.no_grad():
        t = clip.get_text_features(**proc(text=prompts, padding=True, return_tensors="pt")).pooler_output
    t = (t / t.norm(dim=-1, keepdim=True)).numpy()
    assert np.abs(got.text_embeds.numpy() - t).max() <= 1e-5
    assert got.logit_scale == pytest.approx(float(clip.logit_scale.detach().exp()))
    with h5py.File(cache / domain / "text.h5") as f:
        assert f["prompts"].asstr()[:].tolist() == prompts
    # The same prompts' token ids and the context phrase's length: the prompt head needs no tokenizer.
    ids, prefix_len = prompt_token_ids(proc.tokenizer, list(images.classes))
    assert got.prefix_len == prefix_len > 0 and got.token_ids.dtype == torch.int64
    assert got.token_ids[:, : ids.shape[1]].tolist() == ids.tolist()
    assert (got.token_ids[:, ids.shape[1] :] == proc.tokenizer.pad_token_id).all()


def _processors():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return {
        "clip-224": CLIPImageProcessorPil(),
        "clip-odd": CLIPImageProcessorPil(size={"shortest_edge": 37}, crop_size={"height": 31, "width": 29}),
        "clip-pad": CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 27, "width": 23}),
        "convnext-224": ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875),
        "convnext-384": ConvNextImageProcessorPil(size={"shortest_edge": 384}),
        "vit": ViTImageProcessorPil(size={"height": 40, "width": 56}),
    }


@pytest.mark.parametrize("name", list(_processors()))
def test_planned_preprocessing_equals_the_processor(name):
    """Worker-side resize and crop plus device-side normalisation reproduce `processor(images=img)`."""
    proc = _processors()[name]
    plan = plan_for(proc)
    assert plan.mode == "uint8"
    rng = np.random.default_rng(0)
    sizes = [(300, 410), (411, 301), (64, 64), (17, 90)]
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    mapper = Mapper.__new__(Mapper)  # only the normalisation step: no weights needed
    mapper.device, mapper.plans = torch.device("cpu"), (plan, plan)
    mapper._consts = [(torch.tensor(plan.mean).view(1, 3, 1, 1), torch.tensor(plan.std).view(1, 3, 1, 1))] * 2
    for img in imgs:
        want = proc(images=img, return_tensors="np")["pixel_values"]
        got = mapper._pixel_values(torch.from_numpy(plan.apply(img)[None].copy()), 0).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("name", list(_processors()))
def test_torch_resize_is_within_one_level_of_the_processor(name):
    """--resize torch: same sizes and crops; every pixel within one level of PIL's."""
    proc = _processors()[name]
    exact, fast = plan_for(proc), plan_for(proc, "torch")
    assert fast.backend == "torch" and fast.describe() != exact.describe()
    rng = np.random.default_rng(1)
    for h, w in [(300, 410), (411, 301), (64, 64), (17, 90)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        a, b = exact.apply(img).astype(int), fast.apply(img).astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_torch_resize_extract_is_close_to_the_exact_one(synth_dir, tmp_path):
    run_extract(_cfg(synth_dir, tmp_path / "exact", "painting"))
    run_extract(_cfg(synth_dir, tmp_path / "fast", "painting", resize="torch", workers=1))
    exact, fast = load_domain(tmp_path / "exact", "painting"), load_domain(tmp_path / "fast", "painting")
    assert fast.manifest["preprocessing"]["strong"]["backend"] == "torch"
    assert torch.equal(exact.index, fast.index)
    assert (exact.image_embeds.float() - fast.image_embeds.float()).abs().max() <= 2e-2
    assert (exact.weak_logits - fast.weak_logits).abs().max() <= 2e-2


@pytest.mark.parametrize("resample", [2, 3])
def test_device_resample_of_one_axis_is_pillows_bit_for_bit(resample):
    """Pillow's fixed-point weights and rounding, as matrix products: one-axis resizes equal PIL's exactly,
    up- and downscaling, cropped and padded windows included."""
    rng = np.random.default_rng(resample)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(3, 150, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ww = int(rng.integers(2, 160))
        crop = int(rng.integers(1, ww + 8))  # sometimes wider than the resized image: zero padding
        left = (ww - crop) // 2
        want = np.asarray(Image.fromarray(img).resize((ww, h), resample=resample)).astype(np.int64)
        want = np.pad(want, ((0, 0), (max(0, -left), max(0, crop - ww - max(0, -left))), (0, 0)))
        want = want[:, max(0, left) : max(0, left) + crop]
        k = resample_mod.fixed_point_weights(
            torch.tensor([w]), torch.tensor([ww]), torch.tensor([left]), crop, w, resample
        )
        x = torch.from_numpy(img).permute(2, 0, 1)[None].double()
        got = resample_mod._round_pass(x @ k.transpose(1, 2)[:, None])[0].permute(1, 2, 0).long().numpy()
        assert np.array_equal(got, want), (h, w, ww, crop)


def _device_pixels(plan, imgs: list[Image.Image]) -> np.ndarray:
    """The device path of the mapper on the CPU: decoded images packed as a worker packs them."""
    from cpl_cache.extract.reader import _pack

    mapper = Mapper.__new__(Mapper)  # only the preprocessing: no weights needed
    mapper.device, mapper.plans = torch.device("cpu"), (plan, plan)
    mapper._consts = [(torch.tensor(plan.mean).view(1, 3, 1, 1), torch.tensor(plan.std).view(1, 3, 1, 1))] * 2
    return mapper._resized_on_device(_pack([np.asarray(i) for i in imgs]))[0].numpy()


def _photo(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Smooth colour fields with a little grain: resizes like a photograph, not like white noise."""
    base = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.integers(-6, 7, (h, w, 3))
    return Image.fromarray((np.asarray(base).astype(int) + grain).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", ["clip-odd", "clip-pad", "convnext-224"])
def test_device_resize_gives_the_processors_pixels(name):
    """--resize-on device: the processor's own pixel values on photo-like images of every shape.

    Pillow 13 runs the two passes of some resizes vertical-first; the device always runs them
    horizontal-first, as earlier Pillows do. On photographs the two orders agree to the bit for most
    images and within one level for all (on white noise, whose overshoots are clipped between the
    passes, by a few levels)."""
    proc = _processors()[name]
    plan = dataclasses.replace(plan_for(proc), on_device=True)
    assert plan.device_capable and plan.describe() == plan_for(proc).describe()  # same cache identity
    rng = np.random.default_rng(2)
    one_level = plan.scale / min(plan.std)
    for low, high in [(150, 600), (8, 200)]:  # DomainNet-like sizes; tiny images
        imgs = [_photo(rng, int(h), int(w)) for h, w in rng.integers(low, high, (16, 2))]
        got = _device_pixels(plan, imgs)
        want = np.concatenate([proc(images=img, return_tensors="np")["pixel_values"] for img in imgs])
        off = np.abs(got - want).reshape(len(imgs), -1).max(axis=1)
        assert got.shape == want.shape and off.max() <= one_level + 1e-5
        assert (off <= 1e-5).mean() >= 0.75  # most images bit for bit


def test_plans_resize_on_the_device_only_where_they_can():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip, vit = CLIPImageProcessorPil(size={"shortest_edge": 37}, crop_size=31), _processors()["vit"]
    assert plans_for(clip, vit, resize_on="auto", device="cpu")[0].on_device is False
    on = plans_for(clip, vit, resize_on="auto", device="cuda")
    assert on[0].on_device and not on[1].on_device  # a fixed-size resize changes the aspect: workers
    assert not plans_for(clip, clip, resize="torch", resize_on="device")[0].on_device


def test_device_resize_extract_equals_the_workers_one(synth_dir, tmp_path):
    """The whole extract with resizes on the device (here the CPU) matches the workers' extract."""
    run_extract(_cfg(synth_dir, tmp_path / "workers", "painting", resize_on="workers"))
    run_extract(_cfg(synth_dir, tmp_path / "device", "painting", resize_on="device", workers=1))
    a, b = load_domain(tmp_path / "workers", "painting"), load_domain(tmp_path / "device", "painting")
    assert a.manifest["preprocessing"] == b.manifest["preprocessing"]
    assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
    assert (a.image_embeds.float() - b.image_embeds.float()).abs().max() <= 2e-3
    assert (a.weak_logits - b.weak_logits).abs().max() <= 1e-3


def test_unknown_processor_falls_back_to_calling_it():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    no_crop = CLIPImageProcessorPil(do_center_crop=False)  # output size would vary per image
    assert plan_for(no_crop).mode == "processor"


def test_rank_shares_are_disjoint_and_cover_every_row():
    for n, world in [(0, 2), (1, 3), (40, 2), (41, 4), (1000, 7)]:
        rows = [r for k in range(world) for r in range(*rank_share(n, k, world))]
        assert rows == list(range(n))
    assert shard_ranges(5, 30, 10) == [(5, 15), (15, 25), (25, 30)]


# ------------------------------------------------------------------------------------ bad inputs


def _copy_domain(synth_dir: Path, dst: Path, domain: str) -> tuple[Path, list[str]]:
    root = dst / "domainnet"
    shutil.copytree(synth_dir / "domainnet" / domain, root / domain)
    for part in ("train", "test"):
        shutil.copy(synth_dir / "domainnet" / f"{domain}_{part}.txt", root)
    return root, list(load_domainnet(root, domain).paths)


def _extract_cli(synth_dir: Path, root: Path, cache: Path, *extra: str):
    strong, weak = _models(synth_dir)
    args = ["extract", "--domain", "painting", "--data-root", str(root), "--strong", strong, "--weak", weak]
    args += ["--cache-dir", str(cache), "--device", "cpu", "--workers", "0", "--batch-size", "8"]
    args += ["--no-progress"]
    return CliRunner().invoke(app, args + list(extra))


def _damage(root: Path, rel: str, how: str) -> None:
    path = root / rel
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not-an-image":
        path.write_text("this is a text file with a .jpg name\n")
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "empty", "not-an-image", "missing"])
def test_bad_image_with_error_ends_in_one_line_naming_it(synth_dir, tmp_path, how):
    root, paths = _copy_domain(synth_dir, tmp_path, "painting")
    bad = paths[21]
    _damage(root, bad, how)
    # Decoding failures come from a loader worker: the run must stop cleanly, not hang.
    workers = "0" if how in ("empty", "missing") else "1"
    res = _extract_cli(synth_dir, root, tmp_path / "cache", "--shard-size", "16", "--workers", workers)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cpl-cache: error:") and bad in lines[0], res.output
    assert "Traceback" not in res.output
    if how in ("empty", "missing"):  # found before any model is loaded: nothing written yet
        assert "1 of 40" in lines[0]
        assert not (tmp_path / "cache" / "painting" / "manifest.json").exists()
    else:  # found while decoding: the shards before the bad image are kept for a rerun
        m = json.loads((tmp_path / "cache" / "painting" / "manifest.json").read_text())
        assert not m["complete"] and sum(s["rows"] for s in m["shards"]) == 16  # rows 0..15


def test_bad_images_with_skip_are_listed_and_the_rest_is_extracted(synth_dir, tmp_path):
    root, paths = _copy_domain(synth_dir, tmp_path, "painting")
    bad = {paths[3]: "truncated", paths[17]: "empty", paths[18]: "not-an-image", paths[35]: "missing"}
    for rel, how in bad.items():
        _damage(root, rel, how)
    res = _extract_cli(synth_dir, root, tmp_path / "cache", "--on-bad-image", "skip", "--shard-size", "4")
    assert res.exit_code == 0, res.output
    assert "40 rows" not in res.output and "36 rows in 10 shard(s)" in res.output
    assert "(36 new, 4 skipped)" in res.output  # skipped images are not new rows
    got = load_domain(tmp_path / "cache", "painting", with_paths=True)
    assert got.paths == [p for p in paths if p not in bad]
    skipped = got.manifest["skipped"]
    assert [s["path"] for s in skipped] == [paths[i] for i in (3, 17, 18, 35)]
    reasons = {s["path"]: s["reason"] for s in skipped}
    assert "truncated" in reasons[paths[3]] and "0 bytes" in reasons[paths[17]]
    assert "not found" in reasons[paths[35]]
    assert got.manifest["rows"] == 36 and got.manifest["complete"]


def test_overwrite_keeps_the_old_cache_until_the_new_one_is_complete(synth_dir, tmp_path):
    root, paths = _copy_domain(synth_dir, tmp_path, "painting")
    cache, ddir = tmp_path / "cache", tmp_path / "cache" / "painting"
    assert _extract_cli(synth_dir, root, cache, "--shard-size", "16").exit_code == 0
    before = (ddir / "manifest.json").read_bytes()
    old = load_domain(cache, "painting", with_paths=True)

    def unchanged():
        assert (ddir / "manifest.json").read_bytes() == before
        got = load_domain(cache, "painting", with_paths=True)
        assert got.paths == old.paths and torch.equal(got.image_embeds, old.image_embeds)

    # The images are checked first: a missing one stops the run before anything is written.
    (root / paths[5]).rename(tmp_path / "aside.jpg")
    res = _extract_cli(synth_dir, root, cache, "--shard-size", "16", "--overwrite")
    assert res.exit_code == 2 and "1 of 40" in res.output, res.output
    unchanged()
    (tmp_path / "aside.jpg").rename(root / paths[5])

    # An image that fails to decode half-way: the old cache is still the one a reader gets.
    _damage(root, paths[21], "truncated")
    res = _extract_cli(synth_dir, root, cache, "--shard-size", "16", "--overwrite")
    assert res.exit_code == 2 and paths[21] in res.output, res.output
    unchanged()

    # The same command once the image is back: resumes the new cache (rows 16..39) and swaps it in.
    shutil.copy(synth_dir / "domainnet" / paths[21], root / paths[21])
    res = _extract_cli(synth_dir, root, cache, "--shard-size", "16", "--overwrite")
    assert res.exit_code == 0 and "40 rows in 3 shard(s)" in res.output and "(24 new," in res.output, (
        res.output
    )
    new = load_domain(cache, "painting", with_paths=True)
    assert (
        new.paths == old.paths and (new.image_embeds.float() - old.image_embeds.float()).abs().max() <= 1e-3
    )
    ids = {e["id"] for e in new.manifest["shards"]}
    assert ids.isdisjoint(e["id"] for e in old.manifest["shards"])
    assert sorted(p.name for p in ddir.iterdir()) == [
        ".extract.lock", "manifest.json", "shard-00000.h5", "shard-00001.h5", "shard-00002.h5", "text.h5"
    ]  # fmt: skip


def test_symlinks_out_of_the_data_root_are_refused_unless_followed(synth_dir, tmp_path):
    root, paths = _copy_domain(synth_dir, tmp_path, "painting")
    outside = tmp_path / "elsewhere.jpg"
    (root / paths[7]).rename(outside)
    (root / paths[7]).symlink_to(outside)
    res = _extract_cli(synth_dir, root, tmp_path / "cache")
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and f"{root / paths[7]} is a symbolic link to {outside}" in lines[0]
    assert "--follow-symlinks" in lines[0] and not (tmp_path / "cache" / "painting").exists()
    res = _extract_cli(synth_dir, root, tmp_path / "cache", "--follow-symlinks")
    assert res.exit_code == 0 and "40 rows" in res.output, res.output


def test_a_duplicate_list_line_is_refused_before_any_model_loads(synth_dir, tmp_path):
    root, paths = _copy_domain(synth_dir, tmp_path, "painting")
    lines = (root / "painting_test.txt").read_text().splitlines()
    (root / "painting_test.txt").write_text("\n".join([*lines, lines[2]]) + "\n")
    res = _extract_cli(synth_dir, root, tmp_path / "cache", "--strong", str(tmp_path / "no-such-model"))
    assert res.exit_code == 2, res.output
    want = f"{root / 'painting_test.txt'}:{len(lines) + 1}: {lines[2].split()[0]!r} is listed twice"
    assert want in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_weak_checkpoint_with_other_labels_is_refused(synth_dir, tmp_path):
    from cpl_cache.synth.models import write_resnet

    classes = list(load_domainnet(synth_dir / "domainnet", "painting").classes)
    root = synth_dir / "domainnet"
    for name, labels, expect in [
        ("reordered", classes[::-1], "calls label 0"),
        ("fewer", classes[:-1], f"has {len(classes) - 1} labels"),
    ]:
        weak = write_resnet(tmp_path / name, labels)
        strong, _ = _models(synth_dir)
        res = CliRunner().invoke(
            app,
            ["extract", "--domain", "painting", "--data-root", str(root), "--strong", strong,
             "--weak", str(weak), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"],
        )  # fmt: skip
        assert res.exit_code == 2 and expect in res.output and "train-weak" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1


def test_cache_of_another_model_is_refused_and_overwrite_starts_over(synth_dir, tmp_path):
    from cpl_cache.synth.models import write_clip

    cache = tmp_path / "cache"
    run_extract(_cfg(synth_dir, cache, "painting", shard_size=64))
    other = write_clip(tmp_path / "clip-other", seed=1)
    res = _extract_cli(synth_dir, synth_dir / "domainnet", cache, "--strong", str(other))
    assert res.exit_code == 2 and "another strong model" in res.output and "--overwrite" in res.output
    res = _extract_cli(synth_dir, synth_dir / "domainnet", cache, "--strong", str(other), "--overwrite")
    assert res.exit_code == 0, res.output
    m = load_domain(cache, "painting").manifest
    assert m["strong"]["id"] == str(other) and m["complete"]
    # The same command again finds the cache complete and leaves it as it is.
    res = _extract_cli(synth_dir, synth_dir / "domainnet", cache, "--strong", str(other))
    assert res.exit_code == 0 and "0 new" in res.output


# ------------------------------------------------------------------------------------ writer


def _sink(ddir: Path, manifest: dict, rank: int, world: int, ranges: dict):
    from cpl_cache.extract.writer import ShardSink

    n = 8
    return ShardSink(
        ddir, manifest, rank=rank, world=world, ranges=ranges, dim=2, num_classes=3,
        labels=np.arange(n) % 3, split=np.zeros(n, np.uint8), paths=tuple(f"d/c/{i}.jpg" for i in range(n)),
    )  # fmt: skip


def _fake_rows(rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(rows, np.int64)  # embeddings row + 1: an all-zero embedding is refused as damage
    embeds = np.tile(r[:, None] + 1, (1, 2)).astype(np.float16)
    return r, embeds, np.tile(r[:, None], (1, 3)).astype(np.float32)


def test_ranks_record_progress_and_rank_zero_lists_every_shard_once_all_are_done(tmp_path):
    """Two ranks of 8 rows, shards of 2: each rank's progress file, then one manifest in index order."""
    from cpl_cache.cache import new_manifest
    from cpl_cache.errors import UserError
    from cpl_cache.extract.writer import done_shards, finish, open_cache

    ddir = tmp_path / "d"
    fresh = new_manifest(
        domain="d", classes=["a", "b", "c"], dim=2, strong={"id": "s"}, weak={"id": "w"},
        split={}, counts={"train": 8}, layout={"world_size": 2, "shard_size": 2},
    )  # fmt: skip
    manifest = open_cache(ddir, fresh, overwrite=False, is_writer=True)
    expected = {0: 2, 1: 2}
    for rank in (1, 0):
        start, stop = rank_share(8, rank, 2)
        ranges = dict(enumerate(shard_ranges(start, stop, 2)))
        sink = _sink(ddir, manifest, rank, 2, ranges)
        for number, (a, b) in ranges.items():
            if rank == 0 and number == 1:
                break  # rank 0 "crashes" before its last shard
            rows = [r for r in range(a, b) if r != 5]  # row 5 fails to decode
            sink.add(number, *_fake_rows(rows))
            if 5 in range(a, b):
                sink.skip(5, "OSError: broken data stream")
            sink.close_shard(number)
    assert not json.loads((ddir / "manifest.json").read_text())["shards"]  # only progress files so far
    with pytest.raises(UserError, match="rank 0 finished 1 of 2 shards"):
        finish(ddir, json.loads((ddir / "manifest.json").read_text()), 2, expected)
    # The rerun: rank 0 finds its one finished shard and writes the other.
    manifest = open_cache(ddir, fresh, overwrite=False, is_writer=True)
    assert list(done_shards(ddir, manifest, 0, 2)) == [0] and list(done_shards(ddir, manifest, 1, 2)) == [
        0,
        1,
    ]
    sink = _sink(ddir, manifest, 0, 2, {0: (0, 2), 1: (2, 4)})
    sink.add(1, *_fake_rows([2, 3]))
    sink.close_shard(1)
    m = finish(ddir, manifest, 2, expected)
    assert [s["file"] for s in m["shards"]] == [f"shard-r0{r}-0000{i}.h5" for r in (0, 1) for i in (0, 1)]
    assert m["complete"] and m["rows"] == 7 and [s["index"] for s in m["skipped"]] == [5]
    assert not list(ddir.glob("progress-*"))
    got = load_domain(tmp_path, "d", with_text=False)
    assert got.index.tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert got.image_embeds[:, 0].tolist() == [1, 2, 3, 4, 5, 7, 8]  # row + 1


def test_an_unfinished_cache_resumes_only_with_its_layout_unless_nothing_was_done(tmp_path):
    from cpl_cache.cache import new_manifest
    from cpl_cache.errors import UserError
    from cpl_cache.extract.writer import open_cache

    def fresh(shard_size):
        return new_manifest(
            domain="d", classes=["a"], dim=2, strong={"id": "s"}, weak={"id": "w"}, split={},
            counts={"train": 8}, layout={"world_size": 1, "shard_size": shard_size},
        )  # fmt: skip

    ddir = tmp_path / "d"
    open_cache(ddir, fresh(4), overwrite=False, is_writer=True)
    assert open_cache(ddir, fresh(2), overwrite=False, is_writer=True)["layout"]["shard_size"] == 2
    m = json.loads((ddir / "manifest.json").read_text())
    m["shards"] = [
        {"file": "shard-00000.h5", "rows": 2, "id": "0" * 32, "range": [0, 2], "number": 0, "rank": 0}
    ]
    (ddir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="--shard-size 2; resume it with the same"):
        open_cache(ddir, fresh(4), overwrite=False, is_writer=True)
    other = fresh(2) | {"weak": {"id": "w2"}}
    with pytest.raises(UserError, match="another weak model.*--overwrite"):
        open_cache(ddir, other, overwrite=False, is_writer=True)
    assert open_cache(ddir, other, overwrite=True, is_writer=True)["shards"] == []


@pytest.mark.parametrize("device", ["mps", "cuda"])
def test_a_device_that_is_not_there_is_one_line_and_writes_nothing(synth_dir, tmp_path, device):
    import torch

    if (device == "mps" and torch.backends.mps.is_available()) or (
        device == "cuda" and torch.cuda.is_available()
    ):
        pytest.skip(f"{device} is available here")
    root, _ = _copy_domain(synth_dir, tmp_path, "painting")
    res = _extract_cli(synth_dir, root, tmp_path / "cache", "--device", device)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"device '{device}' requested" in lines[0] and "--device cpu" in lines[0], (
        lines
    )
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_a_cache_of_another_shape_names_both_values():
    """A wrong class count named neither the cache's value nor the one asked for ("a different classes")."""
    from cpl_cache.extract.writer import identity_mismatch

    base = {"dataset": "domainnet", "domain": "d", "classes": ["a", "b", "c"], "dim": 512}
    assert identity_mismatch(base, {**base, "classes": ["a", "b"]}) == "3 classes (this run: 2)"
    assert identity_mismatch(base, {**base, "classes": ["a", "x", "c"]}) == (
        "other class names (class 1: 'b', this run 'x')"
    )
    assert identity_mismatch(base, {**base, "dim": 768}) == "dim 512 (this run: 768)"
    assert identity_mismatch(base, dict(base)) is None
