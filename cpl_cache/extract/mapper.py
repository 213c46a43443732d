"""Both networks of stage one: the CLIP image and text towers, and the weak classifier.

Models load with `from_pretrained` from a hub id or a local folder. On a GPU the forward passes
run under float16 autocast, on the CPU in float32. Pixels arrive as uint8 and are normalised here,
batched on the device, with the processor's own constants; where a plan says so, they arrive as
the decoded images and are resized and cropped on the device too (`cpl_cache.extract.resample`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from cpl_cache.errors import UserError
from cpl_cache.extract.reader import ImagePlan, place_resizes, plan_for

_FINGERPRINT_SUFFIXES = {".json", ".safetensors", ".bin", ".txt", ".model", ".pt"}


def fingerprint(id_or_path: str) -> str | None:
    """sha256 of a local checkpoint folder's files (names and bytes); None for a hub id."""
    root = Path(id_or_path)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def model_identity(id_or_path: str, config: Any) -> dict[str, Any]:
    """What the manifest records about a checkpoint: id, hub revision, content fingerprint."""
    return {
        "id": str(id_or_path),
        "revision": getattr(config, "_commit_hash", None),
        "fingerprint": fingerprint(id_or_path),
        "class": (config.architectures or [type(config).__name__])[0],
    }


def _load_failed(kind: str, id_or_path: str, err: Exception, hint: str) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load the {kind} checkpoint {id_or_path!r} ({first[:200]}); {hint}")


def load_config(kind: str, id_or_path: str) -> Any:
    """The checkpoint's config alone (seconds): checks run on it before any weights load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(id_or_path)
    except (OSError, ValueError) as err:
        raise _load_failed(kind, id_or_path, err, _HINTS[kind]) from None


_HINTS = {
    "strong": "pass a CLIP model id or a folder written by CLIPModel.save_pretrained",
    "weak": "pass the folder `cpl-cache train-weak` wrote, or an image-classification model id",
}


def load_image_processor(kind: str, id_or_path: str) -> Any:
    """The checkpoint's image processor, PIL backend: the reference the cache must match."""
    from transformers import AutoImageProcessor

    try:
        try:
            return AutoImageProcessor.from_pretrained(id_or_path, backend="pil")
        except TypeError:  # an older transformers without `backend`
            return AutoImageProcessor.from_pretrained(id_or_path, use_fast=False)
    except (OSError, ValueError) as err:
        raise _load_failed(kind, id_or_path, err, _HINTS[kind]) from None


def _norm_name(name: str) -> str:
    return re.sub(r"[\s_]+", " ", str(name)).strip().lower()


def check_weak_classes(config: Any, classes: tuple[str, ...], weak: str, domain: str) -> None:
    """Refuse a weak checkpoint whose labels are not this domain's classes, in this order."""
    k = len(classes)
    n = int(getattr(config, "num_labels", 0) or 0)
    fix = f"train one for these classes with `cpl-cache train-weak --domain {domain}`"
    if n != k:
        raise UserError(
            f"weak checkpoint {weak} has {n} labels, but the {domain} lists have {k} classes; {fix}"
        )
    id2label = {int(i): name for i, name in (config.id2label or {}).items()}
    for label, cls in enumerate(classes):
        name = id2label.get(label)
        if name is None or _norm_name(name) != _norm_name(cls):
            raise UserError(
                f"weak checkpoint {weak} calls label {label} {name!r}, but the {domain} lists call it "
                f"{cls!r}; its id2label must follow the lists' label order ({fix})"
            )


def _load(kind: str, cls: Any, id_or_path: str) -> Any:
    from cpl_cache.checkpoint import weights_error

    try:
        return cls.from_pretrained(id_or_path).eval()
    except Exception as err:
        # Weights that do not deserialize (a damaged file, a pickle that is not weights-only) fail
        # inside safetensors or torch.load with many lines of advice: say it in one.
        unreadable = weights_error(f"the {kind} checkpoint", id_or_path, err, _HINTS[kind])
        if unreadable is not None:
            raise unreadable from None
        if isinstance(err, (OSError, ValueError)):
            raise _load_failed(kind, id_or_path, err, _HINTS[kind]) from None
        raise


def _pooled(out: Any) -> Any:
    """transformers 5 returns an output object whose `pooler_output` is the projection."""
    return out if hasattr(out, "dim") else out.pooler_output


class Mapper:
    """Runs CLIP's image tower and the weak classifier on one batch of pixels."""

    def __init__(self, strong: str, weak: str, plans: tuple[ImagePlan, ImagePlan], device: str):
        import torch
        from transformers import AutoModelForImageClassification, CLIPModel

        from cpl_cache.runtime import quiet_transformers

        self.device = torch.device(device)
        self.plans = plans
        with quiet_transformers():  # one bar per weight file is noise next to the extract bar
            self.clip = _load("strong", CLIPModel, strong).to(self.device)
            self.weak = _load("weak", AutoModelForImageClassification, weak).to(self.device)
        self.strong_id = strong
        self.autocast = self.device.type == "cuda"
        if self.autocast:
            torch.backends.cudnn.benchmark = True
        self._consts = [
            (
                torch.tensor(p.mean, device=self.device).view(1, 3, 1, 1),
                torch.tensor(p.std, device=self.device).view(1, 3, 1, 1),
            )
            for p in plans
        ]

    @property
    def dim(self) -> int:
        return int(self.clip.config.projection_dim)

    def _normalise(self, x: Any, which: int) -> Any:
        """(n, 3, H, W) pixel values 0..255 -> the processor's `(x * scale - mean) / std`, float32."""
        import torch

        mean, std = self._consts[which]
        x = x.to(torch.float32)
        if self.plans[which].scale != 1.0:
            x = x * self.plans[which].scale
        return ((x - mean) / std).contiguous()

    def _pixel_values(self, pixels: Any, which: int) -> Any:
        """(n, H, W, 3) uint8 -> normalised (n, 3, H, W) float32 on the device, as the processor does."""
        x = pixels.to(self.device, non_blocking=True)
        if self.plans[which].mode != "uint8":
            return x
        return self._normalise(x.permute(0, 3, 1, 2), which)

    def _resized_on_device(self, raw: dict[str, Any]) -> dict[int, Any]:
        """Both device-resized plans' normalised pixels from the batch's decoded images."""
        import torch

        from cpl_cache.extract import resample

        flat = raw["flat"].to(self.device, non_blocking=True)
        sizes = [(int(h), int(w)) for h, w in raw["sizes"].tolist()]
        offsets = resample.packed_offsets(sizes)
        which = [i for i, p in enumerate(self.plans) if p.on_device]
        parts: dict[int, list[Any]] = {i: [] for i in which}
        for a, b in resample.chunks(sizes):
            canvas = resample.canvas_of(flat, offsets[a:b], sizes[a:b])
            for i in which:
                plan = self.plans[i]
                resized = [plan.resized_size(w, h)[::-1] for h, w in sizes[a:b]]  # (h', w')
                px = resample.resize_crop(canvas, sizes[a:b], resized, plan.crop, plan.resample)
                parts[i].append(self._normalise(px, i))
            del canvas
        return {i: torch.cat(p) for i, p in parts.items()}

    def __call__(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised image embeddings (n, D) float16 and weak logits (n, K) float32 of a reader batch."""
        import torch

        with torch.inference_mode():
            done = self._resized_on_device(batch["raw"]) if batch.get("raw") is not None else {}
            xs, xw = (
                done[i] if i in done else self._pixel_values(px, i) for i, px in enumerate(batch["pixels"])
            )
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
                emb = _pooled(self.clip.get_image_features(pixel_values=xs))
                logits = self.weak(pixel_values=xw).logits
            emb = emb.float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return emb.half().cpu().numpy(), logits.float().cpu().numpy()

    def text(self, prompts: list[str]) -> tuple[np.ndarray, float, np.ndarray, int | None]:
        """Normalised text embeddings (K, D) float32 of the prompts (float32 on every device),
        the logit scale exp(t), the token ids (K, L) of those same prompts, and how many tokens
        after the start token the context phrase "a photo of a" spans (None when some prompt does
        not begin with it): the layout the prompt head of stage two needs, so it needs no tokenizer."""
        import torch
        from transformers import AutoTokenizer

        from cpl_cache.train.prompt import phrase_prefix_len

        try:
            tok = AutoTokenizer.from_pretrained(self.strong_id)
        except (OSError, ValueError) as err:
            raise _load_failed("strong", self.strong_id, err, _HINTS["strong"]) from None
        length = int(self.clip.config.text_config.max_position_embeddings)
        enc = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        out = []
        with torch.inference_mode():
            for s in range(0, len(prompts), 256):
                ids = enc["input_ids"][s : s + 256].to(self.device)
                mask = enc["attention_mask"][s : s + 256].to(self.device)
                t = _pooled(self.clip.get_text_features(input_ids=ids, attention_mask=mask)).float()
                out.append((t / t.norm(dim=-1, keepdim=True)).cpu())
            scale = float(self.clip.logit_scale.exp().item())
        ids = enc["input_ids"].numpy().astype(np.int64)
        return torch.cat(out).numpy(), scale, ids, phrase_prefix_len(tok, ids)


def plans_for(
    strong_processor: Any,
    weak_processor: Any,
    resize: str = "pil",
    resize_on: str = "workers",
    device: str = "cpu",
) -> tuple[ImagePlan, ImagePlan]:
    """Both models' preprocessing plans; `resize_on` (auto, workers, device) places their resizes."""
    plans = place_resizes(
        (plan_for(strong_processor, resize), plan_for(weak_processor, resize)), resize_on, device
    )
    return plans[0], plans[1]
