"""A small DomainNet-layout image set: class-dependent content, domain-dependent style.

Each class is a shape (and, outside quickdraw and sketch, a hue); each domain draws it in its own
style, so a small model can learn the classes and a domain shift exists. The set keeps DomainNet's
traps: label order that is not the sorted folder order, one grayscale JPEG (sketch), one CMYK JPEG
(painting), one palette PNG with transparency (quickdraw), images of several sizes, and a class
with no image in painting's train list. Same arguments give byte-identical files.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cpl_cache.datasets import DOMAINS

if TYPE_CHECKING:
    from cpl_cache.synth.models import PretrainConfig

# The first DomainNet classes (folder names as on disk); more classes get generated names.
CLASS_POOL = (
    "aircraft_carrier", "airplane", "alarm_clock", "ambulance", "angel", "animal_migration", "ant",
    "anvil", "apple", "arm", "asparagus", "axe", "backpack", "banana", "bandage", "barn", "baseball",
    "baseball_bat", "basket", "basketball", "bat", "bathtub", "beach", "bear", "beard", "bed", "bee",
    "belt", "bench", "bicycle", "binoculars", "bird", "birthday_cake", "blackberry", "blueberry",
    "book", "boomerang", "bottlecap", "bowtie", "bracelet",
)  # fmt: skip
# Words a caption uses for each domain's style when it names one ("a sketch of a bee.").
DOMAIN_WORDS = {
    "clipart": "clipart", "infograph": "infographic", "painting": "painting",
    "quickdraw": "quick drawing", "real": "photo", "sketch": "sketch",
}  # fmt: skip
PRETRAIN_STREAM = 1  # seeds of pretraining images carry this tag, so they never repeat a dataset image
HUE_JITTER = 0.05  # standard deviation of an image's hue around its class's, in turns of the colour wheel
SHAPES = ("circle", "triangle", "square", "star", "plus", "ring", "hbar", "vbar", "arrow", "cross")
EXT = {d: ("png" if d == "quickdraw" else "jpg") for d in DOMAINS}


@dataclass(frozen=True)
class ImageSetConfig:
    """What `cpl-cache synth` writes under DIR/domainnet."""

    classes: int = 10
    per_class: int = 12
    seed: int = 0
    test_frac: float = 0.4  # share of each class's images that goes to the test list
    min_size: int = 40
    max_size: int = 72
    domains: tuple[str, ...] = DOMAINS


def class_names(k: int) -> list[str]:
    """Folder names of k classes (DomainNet's first names, then generated ones)."""
    return [CLASS_POOL[i] if i < len(CLASS_POOL) else f"class_{i:03d}" for i in range(k)]


def label_order(names: list[str], seed: int) -> list[str]:
    """Class names in label order: a seeded permutation that is never the sorted order (k > 1)."""
    ordered = sorted(names)
    perm = np.random.default_rng([seed, 7]).permutation(len(ordered))
    out = [ordered[i] for i in perm]
    if len(out) > 1 and out == ordered:
        out = out[1:] + out[:1]
    return out


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, rad: list[float], phase: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for j in range(n):
            a = rot + phase + 2 * math.pi * j / n
            rr = rad[j % len(rad)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    def boxes(w: float, h: float) -> list[tuple[float, float]]:
        c, s = math.cos(rot), math.sin(rot)
        corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]

    def rotated(pts: list[tuple[float, float]], extra: float = 0.0) -> list[tuple[float, float]]:
        c, s = math.cos(rot + extra), math.sin(rot + extra)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]

    plus = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1)]
    plus += [(-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
    if shape in ("circle", "ring"):
        return ring(24, [r])
    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "star":
        return ring(10, [r, r * 0.42], -math.pi / 2)
    if shape == "plus":
        return rotated(plus)
    if shape == "cross":
        return rotated(plus, math.pi / 4)
    if shape == "hbar":
        return boxes(r, r * 0.35)
    if shape == "vbar":
        return boxes(r * 0.35, r)
    if shape == "arrow":
        return rotated([(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)])
    raise ValueError(shape)


def _hue(label: int, jitter: float = 0.0) -> tuple[int, int, int]:
    h = (label * 0.618034 + jitter) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _draw(domain: str, label: int, rng: np.random.Generator, size: tuple[int, int]):
    """One image of class `label` in the style of `domain` (a PIL image, RGB or L)."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    shape = SHAPES[label % len(SHAPES)]
    copies = 1 + (label // len(SHAPES)) % 2  # classes beyond the shape list differ by count too
    # The hue leans towards the class's but wanders far enough that colour alone is a weak cue: the
    # shape is what a model must learn.
    color = _hue(label, rng.normal(0.0, HUE_JITTER))
    r = min(w, h) * rng.uniform(0.22, 0.32) / copies**0.5
    rot = rng.uniform(-0.35, 0.35)
    centers = []
    for j in range(copies):
        off = (j - (copies - 1) / 2) * 2.2 * r
        centers.append((w / 2 + off + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h))

    if domain in ("quickdraw", "sketch"):
        bg = 255 if domain == "quickdraw" else int(rng.integers(225, 245))
        im = Image.new("L", size, bg)
        d = ImageDraw.Draw(im)
        strokes = 1 if domain == "quickdraw" else 2
        for cx, cy in centers:
            for _ in range(strokes):
                dx, dy = (0.0, 0.0) if domain == "quickdraw" else rng.uniform(-1.5, 1.5, 2)
                ink = 0 if domain == "quickdraw" else int(rng.integers(40, 110))
                outlines = [_polygon(shape, cx + dx, cy + dy, r, rot)]
                if shape == "ring":
                    outlines.append(_polygon("circle", cx + dx, cy + dy, r * 0.55, rot))
                for pts in outlines:
                    d.line(pts + pts[:1], fill=ink, width=2, joint="curve")
        if domain == "sketch":
            im = im.filter(ImageFilter.SMOOTH)
        return im if domain == "sketch" else im.convert("RGB")

    if domain == "real":
        top = rng.integers(60, 200, 3)
        bottom = rng.integers(40, 160, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        arr = (top * (1 - t) + bottom * t) * np.ones((1, w, 1)) + rng.normal(0, 12, (h, w, 3))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    elif domain == "painting":
        base = rng.integers(80, 220, 3)
        arr = base + rng.normal(0, 40, (h // 4 + 1, w // 4 + 1, 3))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").resize(size, Image.BILINEAR)
    else:  # clipart, infograph: flat pale background
        im = Image.new("RGB", size, (255, 255, 255) if domain == "clipart" else (245, 242, 235))
    d = ImageDraw.Draw(im)
    if domain == "infograph":  # text-like bars around the pictogram
        for _ in range(int(rng.integers(3, 7))):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 4))
            d.rectangle([x0, y0, x0 + int(rng.integers(6, w // 2)), y0 + 2], fill=(90, 90, 90))
    for cx, cy in centers:
        pts = _polygon(shape, cx, cy, r, rot)
        shade = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in color)
        outline = (0, 0, 0) if domain == "clipart" else None
        d.polygon(pts, fill=shade, outline=outline)
        if shape == "ring":
            inner = _polygon("circle", cx, cy, r * 0.55, rot)
            d.polygon(inner, fill=im.getpixel((1, 1)))
    if domain == "painting":
        im = im.filter(ImageFilter.GaussianBlur(0.8))
    return im


def draw_pretraining(
    k: int, count: int, seed: int, domain_mix: tuple[float, ...], *, min_size: int = 40, max_size: int = 72
) -> list[tuple[object, int, str]]:
    """`count` (RGB image, label, domain) triples of k classes for pretraining the tiny CLIP.

    Domains are drawn with weights `domain_mix` (in `DOMAINS` order) and classes uniformly. Seeds come
    from a stream of their own (`PRETRAIN_STREAM`), so none of these images is one of the image set's.
    """
    pick = np.random.default_rng([seed, PRETRAIN_STREAM])
    mix = np.asarray(domain_mix, np.float64)
    domains = pick.choice(len(DOMAINS), size=count, p=mix / mix.sum())
    labels = pick.integers(0, k, size=count)
    out = []
    for i, (d, label) in enumerate(zip(domains.tolist(), labels.tolist(), strict=True)):
        rng = np.random.default_rng([seed, PRETRAIN_STREAM, d, label, i])
        size = (int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1)))
        out.append((_draw(DOMAINS[d], label, rng, size).convert("RGB"), label, DOMAINS[d]))
    return out


def _encode(im, domain: str, trap: str | None) -> bytes:
    """Encode as DomainNet stores it; `trap` makes the one grayscale / CMYK / palette file."""
    buf = io.BytesIO()
    if domain == "quickdraw":
        if trap == "palette":
            # White becomes the transparent palette entry: decoding must composite onto white.
            p = im.convert("L").convert("P")
            white = p.getpixel((0, 0))
            p.save(buf, format="PNG", transparency=white)
        else:
            im.save(buf, format="PNG")
    else:
        if trap == "cmyk":
            im = im.convert("CMYK")
        elif trap != "gray" and im.mode != "RGB":
            im = im.convert("RGB")
        im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_images(root: Path, cfg: ImageSetConfig, *, progress: bool = False) -> dict[str, dict[str, int]]:
    """Write images and split lists under `root` (the DomainNet data root); return counts per domain.
    `progress` shows a bar over the images."""
    from cpl_cache.runtime import progress as progress_bar

    root = Path(root)
    names = label_order(class_names(cfg.classes), cfg.seed)
    k = len(names)
    n_test = max(1, min(cfg.per_class - 1, round(cfg.per_class * cfg.test_frac))) if cfg.per_class > 1 else 0
    traps = {"sketch": "gray", "painting": "cmyk", "quickdraw": "palette"}
    counts = {}
    bar = progress_bar(
        total=len(cfg.domains) * k * cfg.per_class, desc="synth images", unit="img", disable=not progress
    )
    for domain in cfg.domains:
        dom_idx = DOMAINS.index(domain)
        train_lines, test_lines = [], []
        for label, name in enumerate(names):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(cfg.per_class):
                rng = np.random.default_rng([cfg.seed, dom_idx, label, i])
                size = (int(rng.integers(cfg.min_size, cfg.max_size + 1)),
                        int(rng.integers(cfg.min_size, cfg.max_size + 1)))  # fmt: skip
                im = _draw(domain, label, rng, size)
                trap = traps.get(domain) if (label == 0 and i == 0) else None
                fname = f"{domain}_{label:03d}_{i:06d}.{EXT[domain]}"
                (folder / fname).write_bytes(_encode(im, domain, trap))
                line = f"{domain}/{name}/{fname} {label}\n"
                # painting's train list has no image of the last class, as in DomainNet (class 327).
                to_test = i < n_test or (domain == "painting" and label == k - 1 and k > 1)
                (test_lines if to_test else train_lines).append(line)
                bar.update(1)
        # DomainNet's lists are not grouped by label; interleave them deterministically.
        order = np.random.default_rng([cfg.seed, dom_idx, 99])
        train_lines = [train_lines[j] for j in order.permutation(len(train_lines))]
        test_lines = [test_lines[j] for j in order.permutation(len(test_lines))]
        (root / f"{domain}_train.txt").write_text("".join(train_lines), encoding="utf-8")
        (root / f"{domain}_test.txt").write_text("".join(test_lines), encoding="utf-8")
        counts[domain] = {"train": len(train_lines), "test": len(test_lines)}
    bar.close()
    return counts


def synthesize(
    out: Path, cfg: ImageSetConfig, pretrain: PretrainConfig | None = None, *, progress: bool = False
) -> dict:
    """`cpl-cache synth`: images and lists under out/domainnet, tiny checkpoints under out/models.

    With `pretrain` the CLIP is first trained contrastively on images of its own (so zero-shot and
    the strong ceiling mean something); without, it keeps its random weights (enough for tests that
    only need a loadable CLIP). `progress` shows bars over the images and the pretraining steps.
    """
    from cpl_cache.synth.models import write_models

    out = Path(out)
    counts = write_images(out / "domainnet", cfg, progress=progress)
    names = label_order(class_names(cfg.classes), cfg.seed)
    paths = write_models(out / "models", names, seed=cfg.seed, pretrain=pretrain, progress=progress)
    return {"root": out / "domainnet", "counts": counts, **paths}
