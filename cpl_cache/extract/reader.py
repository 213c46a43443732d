"""Decode each image once, in DataLoader workers, and run both models' preprocessing on that decode.

A worker turns a run of rows into one batch: for each model a uint8 array of resized, cropped
pixels (normalisation happens on the device, batched), or float32 pixel values straight from the
model's processor where its steps are not ones we replicate. A file that cannot be decoded does not
raise in the worker (a raising worker can stall a loader): it comes back as `(row, reason)` in the
batch's `failed` list, and the main process decides whether to stop or skip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpl_cache.datasets import ImageList, load_rgb, missing_files_error, scan_files
from cpl_cache.errors import UserError

# Processors whose steps are resize (shortest edge or fixed size), centre crop, rescale, normalise,
# as the PIL backend of transformers runs them. ConvNeXt's resizes to shortest_edge / crop_pct first.
_PLANNED = {"CLIPImageProcessor", "ViTImageProcessor", "BitImageProcessor", "DeiTImageProcessor"}
_CROP_PCT = {"ConvNextImageProcessor"}


def _base_name(processor: Any) -> str:
    name = type(processor).__name__
    for suffix in ("Pil", "Fast"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _size(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


@dataclass(frozen=True)
class ImagePlan:
    """One model's preprocessing, as data: PIL resize and crop in workers, normalise on the device.

    `mode` "uint8": workers return (n, H, W, 3) uint8 and the device computes
    `(x * scale - mean) / std`, exactly the transformers PIL backend's arithmetic.
    `mode` "processor": workers call the processor itself and return (n, 3, H, W) float32.
    `backend` "pil" resizes with PIL, bit for bit the processor's pixels; "torch" downscales with
    torch's antialiased uint8 kernels, 3-4x faster, pixels within one level of PIL's.
    """

    mode: str
    processor_class: str
    resize: tuple[str, int, int] | None = None  # ("shortest", edge, 0) or ("exact", height, width)
    crop: tuple[int, int] | None = None  # (height, width)
    resample: int = 3
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    backend: str = "pil"
    # Resize and crop on the device from the decoded image (`cpl_cache.extract.resample`): PIL's
    # arithmetic, so not part of `describe()`; workers then only decode.
    on_device: bool = False

    @property
    def device_capable(self) -> bool:
        """Whether `resample` can run this plan's resize: PIL's bilinear or bicubic, aspect kept, cropped."""
        from cpl_cache.extract.resample import DEVICE_RESAMPLES

        return (
            self.mode == "uint8"
            and self.backend == "pil"
            and self.resample in DEVICE_RESAMPLES
            and self.resize is not None
            and self.resize[0] == "shortest"
            and self.crop is not None
        )

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) of an image of size (w, h) after this plan's resize."""
        if self.resize is None:
            return w, h
        kind, a, b = self.resize
        if kind != "shortest":
            return b, a
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(a * long / short)  # as transformers' get_resize_output_image_size
        return (a, new_long) if w <= h else (new_long, a)

    @property
    def out_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, when the plan fixes it (a crop or a fixed-size resize)."""
        if self.mode != "uint8":
            return None
        if self.crop is not None:
            return self.crop
        return (self.resize[1], self.resize[2]) if self.resize else None

    def describe(self) -> dict[str, Any]:
        """What the manifest records: enough to tell two preprocessings apart."""
        return {
            "processor": self.processor_class,
            "resize": list(self.resize) if self.resize else None,
            "crop": list(self.crop) if self.crop else None,
            "resample": self.resample,
            "rescale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "mode": self.mode,
            "backend": self.backend,
        }

    def apply(self, img: Any, full: np.ndarray | None = None) -> np.ndarray:
        """The pixels of one RGB PIL image: (H, W, 3) uint8 in "uint8" mode.

        `full` is `np.asarray(img)` when the caller already has it (one copy out of PIL per image).
        """
        if self.resize is not None:
            w, h = img.size
            size = self.resized_size(w, h)
            if size != img.size and self.backend == "torch" and size[0] <= w and size[1] <= h:
                # Downscaling only: torch's upscaling kernel is not PIL's (a=-0.75, not -0.5).
                arr = _torch_resize(np.asarray(img) if full is None else full, size, self.resample)
            elif size != img.size:
                arr = np.asarray(img.resize(size, resample=self.resample))
            else:
                arr = np.asarray(img) if full is None else full
        else:
            arr = np.asarray(img) if full is None else full
        if self.crop is not None:
            arr = _center_crop(arr, *self.crop)
        return arr


def _torch_resize(arr: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Antialiased resize of an (H, W, 3) uint8 image to (W, H) = size with torch's uint8 CPU kernels."""
    import warnings

    import torch

    with warnings.catch_warnings():  # read-only view of the decoded pixels; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None]  # NCHW view, channels-last strides
    mode = "bicubic" if resample == 3 else "bilinear"
    y = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode=mode, antialias=True)
    return y[0].permute(1, 2, 0).numpy()


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' `center_crop` on an (H, W, C) array, zero padding included."""
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return arr[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    out = np.zeros((nh, nw) + arr.shape[2:], dtype=arr.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    out[tp : tp + h, lp : lp + w] = arr
    top, left = top + tp, left + lp
    return out[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


RESIZE_BACKENDS = ("pil", "torch")
RESIZE_PLACES = ("auto", "workers", "device")


def place_resizes(plans: Sequence[ImagePlan], where: str, device: str) -> tuple[ImagePlan, ...]:
    """Plans with `on_device` set where `where` ("auto": on a CUDA device, "device", "workers") asks
    for it and the plan can run there; the others stay in the workers."""
    import dataclasses

    on = where == "device" or (where == "auto" and device.startswith("cuda"))
    return tuple(dataclasses.replace(p, on_device=on and p.device_capable) for p in plans)


def _per_channel(value: Any) -> tuple[float, float, float] | None:
    """A processor's mean or std (a number, a list, an array) as three floats; None if not RGB."""
    vals = np.asarray(value, dtype=np.float64).ravel()
    if vals.size == 1:
        vals = np.repeat(vals, 3)
    return tuple(float(v) for v in vals) if vals.size == 3 else None  # type: ignore[return-value]


def plan_for(processor: Any, resize_backend: str = "pil") -> ImagePlan:
    """The plan that reproduces `processor(images=img)` for the processors we know, else a call to it.

    `resize_backend` "torch" applies to bilinear and bicubic resizes; others stay with PIL.
    """
    name = _base_name(processor)
    fallback = ImagePlan(mode="processor", processor_class=name)
    if name not in _PLANNED | _CROP_PCT or getattr(processor, "do_pad", False):
        return fallback
    try:
        resample = int(getattr(processor, "resample", 3))
    except (TypeError, ValueError):
        return fallback
    size, crop_size = processor.size, getattr(processor, "crop_size", None)
    resize = crop = None
    if getattr(processor, "do_resize", False):
        short, longest = _size(size, "shortest_edge"), _size(size, "longest_edge")
        height, width = _size(size, "height"), _size(size, "width")
        if short and not longest:
            if name in _CROP_PCT and short < 384:
                resize, crop = ("shortest", int(short / processor.crop_pct), 0), (short, short)
            elif name in _CROP_PCT:
                resize = ("exact", short, short)
            else:
                resize = ("shortest", short, 0)
        elif height and width and not short:
            resize = ("exact", height, width)
        else:
            return fallback
    if getattr(processor, "do_center_crop", False):
        if crop is not None or crop_size is None:
            return fallback
        crop = (_size(crop_size, "height"), _size(crop_size, "width"))
    if crop is None and (resize is None or resize[0] != "exact"):
        return fallback  # output size would vary from image to image
    scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else 1.0
    mean, std = (0.0,) * 3, (1.0,) * 3
    if getattr(processor, "do_normalize", False):
        mean, std = _per_channel(processor.image_mean), _per_channel(processor.image_std)
        if mean is None or std is None:
            return fallback
    backend = "torch" if resize_backend == "torch" and resample in (2, 3) else "pil"
    return ImagePlan("uint8", name, resize, crop, resample, scale, mean, std, backend)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ rows and batches


def rank_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of one rank: contiguous, disjoint, covering 0..n-1 (no padding)."""
    return n * rank // world, n * (rank + 1) // world


def shard_ranges(start: int, stop: int, shard_size: int) -> list[tuple[int, int]]:
    """Fixed row ranges of a rank's shards; a resumed run recomputes the same ones."""
    return [(a, min(a + shard_size, stop)) for a in range(start, stop, shard_size)]


@dataclass(frozen=True)
class BatchSpec:
    shard: int  # shard number within the rank
    start: int  # rows [start, stop) of the image list
    stop: int
    last: bool  # the shard's last batch


def batch_specs(ranges: dict[int, tuple[int, int]], batch_size: int) -> list[BatchSpec]:
    """Batches that never straddle a shard, so each shard is flushed after its last batch."""
    out = []
    for k, (a, b) in sorted(ranges.items()):
        for s in range(a, b, batch_size):
            out.append(BatchSpec(k, s, min(s + batch_size, b), s + batch_size >= b))
    return out


def _describe_error(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class DecodedBatches:
    """Map-style dataset whose item b is batch b, decoded and preprocessed for every plan."""

    def __init__(
        self,
        images: ImageList,
        specs: list[BatchSpec],
        plans: Sequence[ImagePlan],
        processors: Sequence[Any],
        known_bad: dict[int, str] | None = None,
    ):
        self.root = Path(images.root)
        self.known_bad = dict(known_bad or {})
        self.paths = images.paths
        self.specs = specs
        self.plans = tuple(plans)
        # Processors travel to workers only where a plan calls them.
        self.processors = tuple(
            p if plan.mode == "processor" else None for p, plan in zip(processors, plans, strict=True)
        )
        self._needs_array = sum(plan.backend == "torch" for plan in self.plans) > 1
        self._raw = any(plan.on_device for plan in self.plans)  # the decoded image goes to the device

    def __len__(self) -> int:
        return len(self.specs)

    def decode(self, row: int) -> tuple[list[np.ndarray | None], np.ndarray | None]:
        """Every plan's pixels for one row, from one decode of the file (None for a plan resized on
        the device), and the decoded (H, W, 3) image itself where such a plan needs it."""
        img = load_rgb(self.root / self.paths[row])
        full = np.asarray(img) if self._needs_array or self._raw else None
        out: list[np.ndarray | None] = []
        for plan, proc in zip(self.plans, self.processors, strict=True):
            if plan.on_device:
                out.append(None)
            elif plan.mode == "uint8":
                out.append(plan.apply(img, full))
            else:
                out.append(np.asarray(proc(images=img, return_tensors="np")["pixel_values"][0], np.float32))
        return out, full if self._raw else None

    def __getitem__(self, b: int) -> dict[str, Any]:
        import torch

        spec = self.specs[b]
        n = spec.stop - spec.start
        # Fixed-size outputs are written in place into shared memory: no stacking copy, and no copy
        # when the batch crosses to the main process.
        outs = [
            torch.empty((n, *plan.out_size, 3), dtype=torch.uint8).share_memory_()
            if plan.out_size and not plan.on_device
            else None
            for plan in self.plans
        ]
        lists: list[list[np.ndarray]] = [[] for _ in self.plans]
        decoded: list[np.ndarray] = []
        rows: list[int] = []
        failed: list[tuple[int, str]] = []
        for row in range(spec.start, spec.stop):
            if row in self.known_bad:
                failed.append((row, self.known_bad[row]))
                continue
            try:
                arrays, full = self.decode(row)
            except Exception as err:  # noqa: BLE001 - every decode failure becomes a marker, never a raise
                failed.append((row, _describe_error(err)))
                continue
            if full is not None:
                decoded.append(full)
            for plan, out, store, arr in zip(self.plans, outs, lists, arrays, strict=True):
                if out is not None:
                    out[len(rows)].numpy()[...] = arr
                elif not plan.on_device:
                    store.append(arr)
            rows.append(row)
        k = len(rows)
        stacked = [
            None
            if not k or plan.on_device
            else (out[:k] if out is not None else torch.from_numpy(np.stack(store)))
            for plan, out, store in zip(self.plans, outs, lists, strict=True)
        ]
        return {
            "shard": spec.shard,
            "last": spec.last,
            "start": spec.start,
            "stop": spec.stop,
            "rows": torch.as_tensor(rows, dtype=torch.int64),
            "pixels": stacked,
            "raw": _pack(decoded) if self._raw and k else None,
            "failed": failed,
        }


def _pack(images: list[np.ndarray]) -> dict[str, Any]:
    """Decoded (H, W, 3) uint8 images back to back in one shared-memory buffer, with their sizes."""
    import torch

    sizes = [img.shape[:2] for img in images]
    flat = torch.empty(sum(h * w * 3 for h, w in sizes), dtype=torch.uint8).share_memory_()
    buf, at = flat.numpy(), 0
    for img in images:
        buf[at : at + img.size] = img.reshape(-1)
        at += img.size
    return {"flat": flat, "sizes": torch.as_tensor(sizes, dtype=torch.int64).reshape(-1, 2)}


def loader(dataset: DecodedBatches, workers: int, device: str):
    """A DataLoader over whole batches; workers prefetch so decoding overlaps the forward passes."""
    import torch

    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"prefetch_factor": 2}  # 2 batches a worker: enough to hide a slow file, bounded shm
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        collate_fn=_identity,
        **kwargs,
    )


def _identity(item: Any) -> Any:
    return item


# ------------------------------------------------------------------------------------ file checks


def check_before_models(
    images: ImageList, on_bad_image: str, limit: int = 5, *, follow_symlinks: bool = False
) -> dict[int, str]:
    """The checks that cost seconds, before any model is loaded: missing and zero-byte files, and
    symbolic links out of the data root (refused unless `follow_symlinks`).

    With `error` a problem raises a UserError (count and first few paths); with `skip` the rows come
    back as {row: reason} to leave out of the run.
    """
    missing, empty = scan_files(images, follow_symlinks=follow_symlinks)
    if on_bad_image == "error":
        if missing:
            raise missing_files_error(images, missing, len(images), limit)
        if empty:
            shown = ", ".join(images.paths[r] for r in empty[:limit]) + (
                ", ..." if len(empty) > limit else ""
            )
            raise UserError(
                f"{len(empty)} of {len(images)} images listed for {images.domain} are empty (0 bytes) under "
                f"{images.root} ({shown}); restore them, or pass --on-bad-image skip to leave them out"
            )
        return {}
    bad = {r: "file not found" for r in missing}
    bad.update({r: "empty file (0 bytes)" for r in empty})
    return bad
