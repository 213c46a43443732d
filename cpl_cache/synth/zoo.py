"""The cache zoo: named schema-1 caches of varied geometry, for checking that defaults and selection
protocols hold on caches the project did not tune on.

Each story writes one domain (named as the story) through `write_synthetic_cache`. The stories split
into two halves: "tune" (defaults may be chosen on these) and "judge" (only reported). Across the zoo
they cover: weak mistakes independent of the image (the planted story) and dependent on it (the weak
model sees a noisy, lower-dimensional view of the latent CLIP sees); over- and under-confident weak
logits; poor and good zero-shot; class imbalance; a logit scale of 100 that suits the geometry and one
that does not (the others write the calibrated one); CLIP-like cones; 300 to 120,000 train rows, 10 to
345 classes, 64 to 768 dimensions.

The latent story (`LatentConfig`): classes come in groups of five with unit latents z_k in r
dimensions; an image has a content latent h = z_y + noise, and its embedding is
normalise(c s + A h + noise) (A places the r latent dimensions in D; s is a direction every image
shares, its weight c set so that images of different classes have cosine about `cone`, as real CLIP
image embeddings, which lie in a narrow cone, do); a prototype is
normalise(text_cone s + text_gap g + A (z_k + error)), with g a text-only direction (the modality
gap: with both weights large, every image-text cosine is about the same shared term, and the class
signal is a small part of it). The weak model sees P h + noise (P: a projection to weak_dim
dimensions) and scores the cosine to rough class latents, at the scale that minimises its
cross-entropy on a sample of the images (times `weak_confidence`), plus the log class prior when the
classes are imbalanced.
The measured numbers quoted below are at seed 0 and scale 1 (`write_zoo_cache` returns them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cpl_cache.errors import UserError
from cpl_cache.synth.planted import (
    GROUP_SIZE,
    LOGIT_SCALE,
    MixtureConfig,
    PlantedConfig,
    _sphere_noise,
    _unit,
    calibrated_scale,
    class_directions,
    weak_logits_for,
    write_mixture_cache,
    write_synthetic_cache,
)

HALVES = ("tune", "judge")
PRETRAIN_PAIRS = 10_000  # the sample the calibrated scales are computed on, drawn apart from the rows


@dataclass(frozen=True)
class ZooCache:
    name: str
    half: str  # "tune" or "judge"
    summary: str  # what the story is and what it tests
    write: Callable[[Path, int, float, bool], dict]  # (cache_dir, seed, scale, overwrite) -> stats
    n_train: int  # at scale 1
    dim: int
    classes: int


@dataclass(frozen=True)
class LatentConfig:
    n_train: int
    dim: int
    classes: int
    n_hold: int = 0  # 0: the zoo's default, max(200, n_train / 4) up to 10,000
    n_test: int = 0
    latent: int = 32  # r, the dimension of the class latents
    group_weight: float = 1.0  # weight of the group's direction in a class latent (1: cosine 0.5 in a group)
    latent_noise: float = 1.5  # norm of the image's own content, seen by CLIP and the weak model alike
    image_noise: float = 1.0  # norm of the isotropic noise in the D-dim embedding, CLIP's only
    cone: float = 0.0  # cosine between images of different classes that the shared direction brings
    text_cone: float = 0.0  # weight of that direction in the prototypes
    text_gap: float = 0.0  # weight of the text-only direction
    text_noise: float = 0.5  # norm of the prototypes' error in the latent space
    weak_dim: int = 20
    weak_noise: float = 0.2  # norm of the noise the weak model's view adds
    weak_mean_noise: float = 0.2  # norm of the error in the latents it classifies by
    weak_confidence: float = 1.0  # its logit scale against the one minimising its cross-entropy
    imbalance: float = 1.0  # largest / smallest class prior (geometric in between)
    logit_scale: float | None = None  # kappa written; None: calibrated on the pretraining sample


def split_counts(n_train: int, classes: int, scale: float = 1.0) -> dict[str, int]:
    """Rows per split at `scale`: hold = test = max(200, n_train / 4) up to 10,000 at scale 1; never
    below 12 train rows per class (so even tiny caches hold every class) or max(100, 2 per class)."""
    held = min(10_000, max(200, round(n_train / 4)))
    floor = max(100, 2 * classes)
    return {
        "train": max(12 * classes, round(n_train * scale)),
        "hold": max(floor, round(held * scale)),
        "test": max(floor, round(held * scale)),
    }


def class_prior(rng: np.random.Generator, classes: int, imbalance: float) -> np.ndarray:
    """Geometric class prior from 1 to `imbalance`, in a random class order."""
    p = imbalance ** -(np.arange(classes) / max(classes - 1, 1))
    return (p / p.sum())[rng.permutation(classes)]


def stratified_labels(rng: np.random.Generator, m: int, prior: np.ndarray) -> np.ndarray:
    """m labels whose class counts are m * prior rounded (largest remainders), in a random order."""
    exact = m * prior
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: m - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(prior)), counts))


def _latent_story(cfg: LatentConfig, seed: int) -> tuple[np.ndarray, Callable, float, float]:
    """The prototypes, a row generator, the kappa to write and the weak logit scale."""
    rng = np.random.default_rng(seed)
    K, D, r = cfg.classes, cfg.dim, cfg.latent
    if D < r + 2 or not 0 < cfg.weak_dim <= r or not 0 <= cfg.cone < 1:
        raise UserError(
            f"a latent story needs dim >= latent + 2, 0 < weak_dim <= latent, 0 <= cone < 1: {cfg}"
        )
    groups = np.arange(K) // GROUP_SIZE
    centres = _unit(rng.standard_normal((int(groups.max()) + 1, r)).astype(np.float32))
    own = _unit(rng.standard_normal((K, r)).astype(np.float32))
    z = _unit(np.float32(cfg.group_weight) * centres[groups] + own)
    basis = np.linalg.qr(rng.standard_normal((D, r + 2)))[0].astype(np.float32)
    A, shared, gap = basis[:, :r], basis[:, r], basis[:, r + 1]
    err = _sphere_noise(rng, K, r, cfg.text_noise)
    text = _unit(np.float32(cfg.text_cone) * shared + np.float32(cfg.text_gap) * gap + (z + err) @ A.T)
    view = np.linalg.qr(rng.standard_normal((r, cfg.weak_dim)))[0].astype(np.float32)  # (r, d)
    rough = _unit((z + _sphere_noise(rng, K, r, cfg.weak_mean_noise)) @ view)
    prior = class_prior(rng, K, cfg.imbalance)
    bias = np.log(prior).astype(np.float32) if cfg.imbalance != 1.0 else np.zeros(K, np.float32)

    c = np.float32(np.sqrt(cfg.cone / (1 - cfg.cone) * (1 + cfg.latent_noise**2 + cfg.image_noise**2)))

    def draw(gen: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = stratified_labels(gen, m, prior)
        h = z[labels] + _sphere_noise(gen, m, r, cfg.latent_noise)
        x = _unit(c * shared + h @ A.T + _sphere_noise(gen, m, D, cfg.image_noise))
        seen = _unit(h @ view + _sphere_noise(gen, m, cfg.weak_dim, cfg.weak_noise))
        return x, seen @ rough.T, labels

    # The pretraining sample comes from its own stream: the cache's rows do not depend on it.
    x, weak_cos, labels = draw(np.random.default_rng((seed, 1)), PRETRAIN_PAIRS)
    kappa = cfg.logit_scale if cfg.logit_scale is not None else calibrated_scale(x @ text.T, labels)
    weak_scale = np.float32(cfg.weak_confidence * calibrated_scale(weak_cos, labels))

    def rows(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, weak_cos, labels = draw(rng, m)
        return x, weak_scale * weak_cos + bias, labels

    return text, rows, float(kappa), float(weak_scale)


def write_latent_cache(
    cache_dir: Path | str, domain: str, cfg: LatentConfig, *, seed: int = 0, overwrite: bool = False,
    **manifest_extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """Write one latent-story domain in schema 1; returns write_synthetic_cache's statistics."""
    text, rows, kappa, weak_scale = _latent_story(cfg, seed)
    held = split_counts(cfg.n_train, cfg.classes)["test"]
    counts = {"train": cfg.n_train, "hold": cfg.n_hold or held, "test": cfg.n_test or held}
    latent = {**cfg.__dict__, "logit_scale": kappa, "weak_scale": weak_scale}
    return write_synthetic_cache(
        cache_dir, domain, text, counts, rows, weak_id="latent-weak", seed=seed, overwrite=overwrite,
        logit_scale=kappa, latent=latent, **manifest_extra,
    )  # fmt: skip


def _planted_story(cfg: PlantedConfig, logit_scale: float | None) -> tuple[np.ndarray, Callable, float]:
    """`write_planted_cache`'s prototypes and rows (the same draws, in the same order), and kappa:
    `logit_scale`, or None for the scale calibrated on a pretraining sample from its own stream."""
    rng = np.random.default_rng(cfg.seed)
    mu, groups = class_directions(cfg, rng)
    offset = _unit(rng.standard_normal(cfg.dim).astype(np.float32)) * np.float32(0.5)
    text = _unit(mu + offset + _sphere_noise(rng, cfg.classes, cfg.dim, cfg.text_noise))
    rank = min(cfg.nuisance_rank, cfg.dim)
    basis = np.linalg.qr(rng.standard_normal((cfg.dim, rank)))[0].astype(np.float32)

    def images(gen: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        labels = gen.integers(0, cfg.classes, m)
        nuisance = _sphere_noise(gen, m, rank, cfg.nuisance_noise) @ basis.T
        return _unit(mu[labels] + nuisance + _sphere_noise(gen, m, cfg.dim, cfg.image_noise)), labels

    def rows(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, labels = images(rng, m)
        return x, weak_logits_for(labels, groups, cfg, rng), labels

    kappa = logit_scale
    if kappa is None:
        x, labels = images(np.random.default_rng((cfg.seed, 1)), PRETRAIN_PAIRS)
        kappa = calibrated_scale(x @ text.T, labels)
    return text, rows, float(kappa)


def cache_stats(cache_dir: Path | str, domain: str) -> dict[str, float]:
    """Measured numbers of a written domain: zero-shot and weak accuracy and the weak model's mean top-1
    probability on the test rows, the written kappa and the one that minimises the zero-shot
    cross-entropy there, and the largest over the smallest train class count."""
    from cpl_cache.cache import load_domain

    d = load_domain(cache_dir, domain)
    test, train = d.rows("test").numpy(), d.rows("train").numpy()
    x = d.image_embeds.numpy()[test].astype(np.float32)
    y = d.labels.numpy()[test].astype(np.int64)
    cos = x @ d.text_embeds.numpy().T
    w = d.weak_logits.numpy()[test]
    p = np.exp(w - w.max(axis=1, keepdims=True))
    counts = np.bincount(d.labels.numpy()[train], minlength=d.num_classes)
    return {
        "zeroshot_acc": float((cos.argmax(1) == y).mean()),
        "weak_acc": float((w.argmax(1) == y).mean()),
        "weak_confidence": float((p.max(1) / p.sum(1)).mean()),
        "logit_scale": float(d.logit_scale),
        "calibrated_scale": calibrated_scale(cos, y),
        "class_ratio": float(counts.max() / max(counts.min(), 1)),
    }


def _with_stats(stats: dict[str, Any], cache_dir: Path, name: str) -> dict[str, Any]:
    """The writer's statistics (its weak accuracy over all rows as weak_acc_all) and the measured ones."""
    return {**stats, "weak_acc_all": stats["weak_acc"], **cache_stats(cache_dir, name)}


def _zoo_extra(name: str, seed: int, scale: float) -> dict[str, Any]:
    return {"zoo": {"story": name, "half": ZOO[name].half, "seed": seed, "scale": scale}}


def _write_latent(name: str, cfg: LatentConfig, cache_dir: Path, seed: int, scale: float, overwrite: bool):
    n = split_counts(cfg.n_train, cfg.classes, scale)
    sized = replace(cfg, n_train=n["train"], n_hold=n["hold"], n_test=n["test"])
    stats = write_latent_cache(
        cache_dir, name, sized, seed=seed, overwrite=overwrite, **_zoo_extra(name, seed, scale)
    )
    return _with_stats(stats, cache_dir, name)


def _write_planted(
    name: str, cfg: PlantedConfig, logit_scale: float | None, cache_dir: Path, seed: int, scale: float,
    overwrite: bool,
) -> dict[str, Any]:  # fmt: skip
    n = split_counts(cfg.n_train, cfg.classes, scale)
    sized = replace(cfg, domain=name, seed=seed, n_train=n["train"], n_hold=n["hold"], n_test=n["test"])
    text, rows, kappa = _planted_story(sized, logit_scale)
    stats = write_synthetic_cache(
        cache_dir, name, text, n, rows, weak_id=f"planted-weak-{sized.weak_acc:g}", seed=seed,
        shard_size=sized.shard_size, overwrite=overwrite, logit_scale=kappa,
        planted={**{k: v for k, v in sized.__dict__.items() if k != "domain"}, "logit_scale": kappa},
        **_zoo_extra(name, seed, scale),
    )  # fmt: skip
    return _with_stats(stats, cache_dir, name)


def _write_mixture(name: str, cfg: MixtureConfig, cache_dir: Path, seed: int, scale: float, overwrite: bool):
    n = split_counts(cfg.n_train, cfg.classes, scale)
    sized = replace(cfg, domain=name, seed=seed, n_train=n["train"], n_hold=n["hold"], n_test=n["test"])
    stats = write_mixture_cache(cache_dir, sized, overwrite=overwrite)
    return _with_stats(stats, cache_dir, name)


def _entry(name: str, half: str, summary: str, cfg: Any, logit_scale: float | None = None) -> ZooCache:
    if isinstance(cfg, PlantedConfig):
        write = functools.partial(_write_planted, name, cfg, logit_scale)
    elif isinstance(cfg, MixtureConfig):
        write = functools.partial(_write_mixture, name, cfg)
    else:
        write = functools.partial(_write_latent, name, cfg)
    return ZooCache(name, half, summary, write, cfg.n_train, cfg.dim, cfg.classes)


# Each summary ends with what `write_zoo_cache` measures at seed 0 and scale 1: zero-shot and weak
# accuracy on the test rows, the weak model's mean top-1 probability (p), kappa written and the one
# calibrated on the test rows. Weak accuracy is 50-65% everywhere, a weak model a student can beat:
# a linear discriminant fit with ground truth on up to 6,000 train rows reaches 70-83% on the latent
# stories, 77% on planted-64x20, 99% on mixture-64x20, 57% on planted-512x345 (92% on 33,525 rows).
_STORIES = [
    _entry(
        "planted-64x20", "tune",
        "planted story in 64 dims: weak mistakes independent of the image, calibrated kappa; "
        "zs 42%, weak 58% (p 0.60), kappa 15.3 (cal 14.9)",
        PlantedConfig(n_train=3000, dim=64, classes=20, image_noise=1.5, nuisance_noise=2.0, text_noise=1.2,
                      weak_sharpness=1.1),
    ),
    _entry(
        "mixture-64x20", "tune",
        "mixture story: isotropic noise, weak a nearest mean in a noisy 16-d view, calibrated kappa; "
        "zs 30%, weak 54% (p 0.49), kappa 10.6 (cal 10.5)",
        MixtureConfig(n_train=3000),
    ),
    _entry(
        "cone-256x50", "tune",
        "CLIP-like cone (image cosine 0.4) with a modality gap, zero-shot poor, image-dependent weak; "
        "zs 15%, weak 61% (p 0.59), kappa 15.5 (cal 15.5)",
        LatentConfig(n_train=10_000, dim=256, classes=50, cone=0.4, text_cone=3.0, text_gap=2.0,
                     text_noise=2.5),
    ),
    _entry(
        "tiny-128x10", "tune",
        "300 train rows: selection and early stopping on little data; image-dependent weak; "
        "zs 49%, weak 50% (p 0.52), kappa 18.1 (cal 17.5)",
        LatentConfig(n_train=300, dim=128, classes=10, weak_dim=8, cone=0.7, text_cone=0.3, text_noise=1.2),
    ),
    _entry(
        "overconf-128x40", "tune",
        "weak logits over-confident (4x the calibrated scale), in a wide cone (image cosine 0.8); "
        "zs 41%, weak 59% (p 0.90), kappa 29.8 (cal 29.5)",
        LatentConfig(n_train=8000, dim=128, classes=40, cone=0.8, text_cone=0.4, text_noise=1.0,
                     weak_confidence=4.0),
    ),
    _entry(
        "imbalanced-256x30", "tune",
        "train classes 10x apart (geometric prior, hold and test alike), weak adds the log prior; "
        "zs 39%, weak 62% (p 0.61), kappa 12.2 (cal 12.4)",
        LatentConfig(n_train=6000, dim=256, classes=30, weak_dim=16, text_noise=1.2, imbalance=10.0),
    ),
    _entry(
        "planted-512x345", "judge",
        "planted story at DomainNet's size: weak mistakes independent of the image, kappa 100 suits; "
        "zs 39%, weak 60% (p 0.63), kappa 100 (cal 66.9)",
        PlantedConfig(n_train=20_000, dim=512, classes=345), LOGIT_SCALE,
    ),
    _entry(
        "cone-goodzs-768x100", "judge",
        "CLIP-like cone with a modality gap, zero-shot good, image-dependent weak; "
        "zs 58%, weak 62% (p 0.62), kappa 90.9 (cal 89.9)",
        LatentConfig(n_train=8000, dim=768, classes=100, latent=48, weak_dim=26, cone=0.4, text_cone=3.0,
                     text_gap=2.0, text_noise=0.9),
    ),
    _entry(
        "underconf-256x50", "judge",
        "weak logits under-confident (0.3x the calibrated scale), in a wide cone; "
        "zs 40%, weak 61% (p 0.14), kappa 31.2 (cal 31.1)",
        LatentConfig(n_train=6000, dim=256, classes=50, cone=0.8, text_cone=0.4, text_noise=1.0,
                     weak_confidence=0.3),
    ),
    _entry(
        "kappa100-cone-128x20", "judge",
        "kappa 100 written where the calibrated one is six times lower: a scale that does not suit; "
        "zs 44%, weak 65% (p 0.63), kappa 100 (cal 16.8)",
        LatentConfig(n_train=4000, dim=128, classes=20, weak_dim=16, cone=0.5, text_noise=1.2,
                     logit_scale=LOGIT_SCALE),
    ),
    _entry(
        "large-64x10", "judge",
        "120,000 train rows in 64 dims and 10 classes: the large-data regime, image-dependent weak; "
        "zs 58%, weak 63% (p 0.62), kappa 10.4 (cal 10.4)",
        LatentConfig(n_train=120_000, dim=64, classes=10, latent=16, latent_noise=1.0, weak_dim=8,
                     text_noise=1.0),
    ),
    _entry(
        "imbalanced-cone-512x60", "judge",
        "CLIP-like cone with a modality gap and classes 10x apart, weak adds the log prior; "
        "zs 51%, weak 60% (p 0.59), kappa 66.3 (cal 66.8)",
        LatentConfig(n_train=12_000, dim=512, classes=60, cone=0.4, text_cone=3.0, text_gap=2.0,
                     text_noise=0.8, imbalance=10.0),
    ),
]  # fmt: skip
ZOO: dict[str, ZooCache] = {c.name: c for c in _STORIES}


def zoo_names(half: str | None = None) -> list[str]:
    """The zoo's cache names, in registry order; only one half's with `half`."""
    if half is not None and half not in HALVES:
        raise UserError(f"unknown zoo half {half!r}; choose one of {', '.join(HALVES)}")
    return [n for n, c in ZOO.items() if half is None or c.half == half]


def write_zoo_cache(
    cache_dir: Path | str, name: str, *, seed: int = 0, scale: float = 1.0, overwrite: bool = False
) -> dict[str, Any]:
    """Write zoo cache `name` as domain `name` of `cache_dir`; returns the writer's statistics and the
    measured ones (`cache_stats`)."""
    if name not in ZOO:
        raise UserError(f"unknown zoo cache {name!r}; choose one of {', '.join(ZOO)}")
    if scale <= 0:
        raise UserError(f"the zoo's scale must be positive, got {scale}")
    return ZOO[name].write(Path(cache_dir), seed, scale, overwrite)
