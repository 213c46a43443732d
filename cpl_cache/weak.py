"""train-weak: fine-tune a small image classifier on the `hold` split, the paper's weak supervisor.

    cpl-cache train-weak --domain real --data-root data/domainnet --out ckpt/real-resnet18
    cpl-cache train-weak --domain real --data-root data/domainnet --model microsoft/cvt-13 --out ckpt/real-cvt

The weak model sees ground truth only on `hold` (a seeded half of the test list) and is scored on
`test`. It is saved with `save_pretrained` plus `split.json`, the identity of the split it trained
on; extract compares that record with its own split and refuses a mismatch, so the weak model's
logits are never computed on images it was trained on. The last epoch is kept: picking an epoch
by test accuracy would leak the test set.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpl_cache.checkpoint import weights_error
from cpl_cache.datasets import ImageList, check_files, load_dataset, load_rgb
from cpl_cache.errors import UserError
from cpl_cache.runtime import quiet_transformers

SPLIT_RECORD = "split.json"
TRAIN_RECORD = "train_record.json"
SPLIT_KEYS = ("dataset", "domain", "hold_frac", "split_seed", "hold_hash", "num_hold", "classes")


@dataclass(frozen=True)
class WeakConfig:
    """Everything `train-weak` does, built by the command and passed down."""

    domain: str
    data_root: Path
    out: Path
    model: str = "microsoft/resnet-18"
    dataset: str = "domainnet"
    epochs: int = 10
    lr: float = 5e-4
    batch_size: int = 64
    weight_decay: float = 0.05
    warmup_frac: float = 0.1  # share of all steps spent warming up linearly, then cosine to zero
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.25, 1.0)  # random resized crop: share of the image area kept
    device: str = "auto"
    hold_frac: float = 0.5
    split_seed: int = 0
    seed: int = 0
    workers: int = 4
    overwrite: bool = False
    progress: bool = True
    follow_symlinks: bool = False  # read images through symbolic links that leave the data root


# ------------------------------------------------------------------------------ split record


def read_split_record(weak_dir: Path | str) -> dict | None:
    """The split record of a weak checkpoint folder, or None (a hub id, or a folder without one)."""
    path = Path(weak_dir) / SPLIT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"{path} is not readable JSON ({err}); retrain the weak model with train-weak"
        ) from None
    missing = [k for k in SPLIT_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; retrain the weak model with train-weak")
    return record


def check_split_record(weak_dir: Path | str, images: ImageList) -> dict | None:
    """Refuse a weak checkpoint trained on another split than `images` has; returns its record.

    A checkpoint without a record (a hub id, a model trained elsewhere) passes unchecked: there is
    nothing to compare, and the caller decides whether to warn.
    """
    record = read_split_record(weak_dir)
    if record is None:
        return None
    ours = images.split_record()
    dataset = "" if images.dataset == "domainnet" else f" --dataset {images.dataset}"
    retrain = (
        f"retrain with `cpl-cache train-weak{dataset} --domain {shlex.quote(images.domain)} "
        f"--hold-frac {images.hold_frac:g} --split-seed {images.split_seed}`"
    )
    if (record["dataset"], record["domain"]) != (ours["dataset"], ours["domain"]):
        raise UserError(
            f"weak checkpoint {weak_dir} was trained on {record['dataset']}/{record['domain']}, not "
            f"{ours['dataset']}/{ours['domain']}; pass the weak model of this domain or {retrain}"
        )
    if list(record["classes"]) != ours["classes"]:
        raise UserError(
            f"weak checkpoint {weak_dir} was trained on {len(record['classes'])} classes in another order "
            f"than the {len(ours['classes'])} classes of these lists; {retrain}"
        )
    if (float(record["hold_frac"]), int(record["split_seed"])) != (ours["hold_frac"], ours["split_seed"]):
        raise UserError(
            f"weak checkpoint {weak_dir} was trained on the hold split of hold-frac {record['hold_frac']:g}, "
            f"split-seed {record['split_seed']}, but this run splits with hold-frac {ours['hold_frac']:g}, "
            f"split-seed {ours['split_seed']}: its training images would be scored as test; pass "
            f"--hold-frac {record['hold_frac']:g} --split-seed {record['split_seed']}, or {retrain}"
        )
    if record["hold_hash"] != ours["hold_hash"]:
        raise UserError(
            f"weak checkpoint {weak_dir} was trained on other hold images ({record['num_hold']}) than "
            f"these lists give ({ours['num_hold']}) with the same split (lists changed?); {retrain}"
        )
    return record


# ------------------------------------------------------------------------------ loading


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or flag.upper() in ("1", "ON", "YES", "TRUE")


def load_classifier(name: str, classes: tuple[str, ...]) -> tuple[Any, Any]:
    """An `AutoModelForImageClassification` with a fresh head for `classes`, and its image processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.exists():
        raise UserError(
            f"model folder {name} does not exist; pass a checkpoint folder or a hub id to --model"
        )
    source = str(local) if local.exists() else name
    try:
        base = AutoConfig.from_pretrained(source)
        model = AutoModelForImageClassification.from_pretrained(
            source,
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
            ignore_mismatched_sizes=True,
        )
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception as err:
        # Weights that do not deserialize (a damaged file, a pickle that is not weights-only) fail
        # inside safetensors or torch.load with many lines of advice: say it in one.
        unreadable = weights_error(
            "--model", source, err, "pass a checkpoint folder written by save_pretrained, or a hub id"
        )
        if unreadable is not None:
            raise unreadable from None
        if isinstance(err, OSError):
            if not local.exists() and hub_offline():
                raise UserError(
                    f"model {name!r} is not on disk and the hub is offline; pass a local path to --model"
                ) from None
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"could not load model {name!r} ({first}); pass an image-classification checkpoint "
                "folder or hub id"
            ) from None
        if isinstance(err, (ValueError, KeyError)):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"{name!r} is not an image classifier transformers can load ({first[:160]}); "
                "pass an AutoModelForImageClassification checkpoint such as microsoft/resnet-18"
            ) from None
        raise
    old = [getattr(base, "id2label", {}).get(i) for i in range(getattr(base, "num_labels", 0))]
    if old != list(classes) and len(old) == len(classes):
        # Same class count, other classes: from_pretrained kept the old head; it must start afresh.
        _reset_head(model, len(classes), name)
    return model, processor


def _reset_head(model: Any, num_classes: int, name: str) -> None:
    """Re-initialise the final classification layer(s) with the model's own initialiser."""
    import torch

    heads = [
        m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and m.out_features == num_classes
        and ("classifier" in n or "head" in n)
    ]
    if not heads:
        raise UserError(f"cannot find the classification head of {name!r} to replace; pass another --model")
    for m in heads:
        m.reset_parameters()
        if hasattr(model, "_init_weights"):
            model._init_weights(m)


def input_geometry(processor: Any) -> tuple[tuple[int, int], np.ndarray, np.ndarray, float]:
    """(height, width), mean, std and rescale factor the model expects, read from its image processor."""

    def hw(d: Any) -> tuple[int, int] | None:
        d = dict(d or {})
        if "height" in d and "width" in d:
            return int(d["height"]), int(d["width"])
        if "shortest_edge" in d:
            return int(d["shortest_edge"]), int(d["shortest_edge"])
        return None

    size = hw(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    size = size or hw(getattr(processor, "size", None)) or (224, 224)
    if getattr(processor, "do_normalize", True):
        mean = np.asarray(processor.image_mean, np.float32)
        std = np.asarray(processor.image_std, np.float32)
    else:
        mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    scale = (
        float(getattr(processor, "rescale_factor", 1 / 255))
        if getattr(processor, "do_rescale", True)
        else 1.0
    )
    return size, mean, std, scale


# ------------------------------------------------------------------------------ data


class HoldTestImages:
    """A map-style dataset of (pixels, label, row, ok). Training rows get a random resized crop and a
    flip drawn from `default_rng([seed, epoch, row])`, so augmentation does not depend on the worker
    count; evaluation rows go through the model's own image processor. An unreadable image yields
    ok=False (and zeros) instead of killing the worker; the loop skips and reports it.
    """

    def __init__(self, images: ImageList, rows: np.ndarray, processor: Any, train: bool, cfg: WeakConfig):
        self.root, self.paths, self.labels = images.root, images.paths, images.labels
        self.rows, self.processor, self.train = rows, processor, train
        self.size, self.mean, self.std, self.scale = input_geometry(processor)
        self.crop_scale, self.seed, self.epoch = cfg.crop_scale, cfg.seed, 0

    def __len__(self) -> int:
        return len(self.rows)

    def augment(self, im: Any, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        w, h = im.size
        area = w * h
        for _ in range(10):  # the usual random resized crop: area share and aspect ratio
            target = area * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                break
        else:  # fall back to the central crop of clamped aspect ratio
            cw, ch = min(w, round(h * 4 / 3)), min(h, round(w * 4 / 3))
            x0, y0 = (w - cw) // 2, (h - ch) // 2
        out_h, out_w = self.size
        im = im.resize((out_w, out_h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(im, np.float32) * self.scale
        return ((x - self.mean) / self.std).transpose(2, 0, 1)

    def __getitem__(self, i: int):
        import torch

        row = int(self.rows[i])
        label = int(self.labels[row])
        try:
            im = load_rgb(self.root / self.paths[row])
            if self.train:
                x = self.augment(im, np.random.default_rng([self.seed, self.epoch, row]))
            else:
                x = self.processor(images=im, return_tensors="np")["pixel_values"][0]
            return torch.from_numpy(np.ascontiguousarray(x, np.float32)), label, row, True
        except (OSError, ValueError, SyntaxError):  # PIL raises these on damaged files
            return torch.zeros(3, *self.size), label, row, False


def _loader(ds: HoldTestImages, cfg: WeakConfig, shuffle: bool):
    """Batches in a seeded order; worker seeds come from a generator of their own, so the order (and
    with the per-row augmentation seeds, the whole run) is the same for any worker count."""
    import torch

    sampler = (
        torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(cfg.seed))
        if shuffle
        else None
    )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=max(0, min(cfg.workers, os.cpu_count() or 1)),
        generator=torch.Generator().manual_seed(cfg.seed + 1),
        pin_memory=torch.cuda.is_available(),
    )


# ------------------------------------------------------------------------------ training


def _param_groups(model: Any, weight_decay: float) -> list[dict]:
    """Decay weights of matrices and kernels only; biases and norm scales stay free."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def evaluate(model: Any, loader: Any, device: str, bad: set[int]) -> tuple[float, int]:
    """Accuracy on the loader's readable images, and how many were scored."""
    import torch

    model.eval()
    correct = seen = 0
    amp = device.startswith("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        for x, y, row, ok in loader:
            bad.update(row[~ok].tolist())
            if not ok.any():
                continue
            logits = model(pixel_values=x[ok].to(device, non_blocking=True)).logits
            correct += int((logits.argmax(-1).cpu() == y[ok]).sum())
            seen += int(ok.sum())
    return correct / max(seen, 1), seen


def train_weak(cfg: WeakConfig) -> dict[str, Any]:
    """Fine-tune `cfg.model` on the hold split, score it on test each epoch, save it under `cfg.out`."""
    import torch
    import torch.nn.functional as F
    from transformers import get_cosine_schedule_with_warmup

    from cpl_cache.runtime import progress, quiet_transformers_bars, resolve_device, seed_everything

    for name, value, lo in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1)):
        if value < lo:
            raise UserError(f"{name} must be at least {lo}, got {value}")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out} is not empty; pass --overwrite to replace it or choose another --out")

    images = load_dataset(
        cfg.dataset, cfg.data_root, cfg.domain, hold_frac=cfg.hold_frac, split_seed=cfg.split_seed
    )
    hold, test = images.rows("hold"), images.rows("test")
    if len(hold) == 0:
        raise UserError(
            f"the hold split of {cfg.domain} is empty (--hold-frac {cfg.hold_frac:g}); raise --hold-frac"
        )
    check_files(images, rows=np.concatenate([hold, test]), follow_symlinks=cfg.follow_symlinks)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    quiet_transformers_bars(cfg.progress)  # its "Loading weights" bar, where ours are off or logged
    model, processor = load_classifier(cfg.model, images.classes)
    model.to(device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True

    train_ds = HoldTestImages(images, hold, processor, True, cfg)
    test_ds = HoldTestImages(images, test, processor, False, cfg)
    train_dl = _loader(train_ds, cfg, shuffle=True)
    test_dl = _loader(test_ds, cfg, shuffle=False)

    steps = cfg.epochs * len(train_dl)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = get_cosine_schedule_with_warmup(opt, round(cfg.warmup_frac * steps), steps)
    amp = device.startswith("cuda")
    bad: set[int] = set()
    history = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        train_ds.epoch = epoch  # workers are re-created each epoch and copy this value
        loss_sum = correct = seen = 0.0
        bar = progress(
            train_dl, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False
        )
        for x, y, row, ok in bar:
            bad.update(row[~ok].tolist())
            if not ok.any():
                continue
            x, y = x[ok].to(device, non_blocking=True), y[ok].to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = model(pixel_values=x).logits
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += float((logits.argmax(-1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        test_acc, scored = evaluate(model, test_dl, device, bad)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(seen, 1),
                "hold_acc": correct / max(seen, 1),  # on augmented hold images, as trained
                "test_acc": test_acc,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        if cfg.progress:
            bar.write(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]['train_loss']:.3f}, "
                f"hold acc {history[-1]['hold_acc']:.3f}, test acc {test_acc:.3f}",
                file=sys.stderr,
            )
    if bad and len(bad) >= len(hold) + len(test):
        raise UserError(f"none of the {len(bad)} hold and test images of {cfg.domain} could be decoded")

    record = {
        "model": cfg.model,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "device": device,
        "epochs": history,
        "test_acc": history[-1]["test_acc"],
        "num_test_scored": scored,
        "seconds": round(time.perf_counter() - start, 3),
        "unreadable": sorted(images.paths[i] for i in bad),
    }
    _save(out, model, processor, images.split_record(), record, cfg.overwrite)
    return record


def _save(out: Path, model: Any, processor: Any, split: dict, record: dict, overwrite: bool) -> None:
    """Write the checkpoint beside `out`, then move it into place: a crash never leaves half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / SPLIT_RECORD).write_text(json.dumps(split, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp / TRAIN_RECORD).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise UserError(f"{out} appeared while training; the model is in {tmp}")
        shutil.rmtree(out)
    os.replace(tmp, out)
