"""The cache zoo: every story writes a loadable, seeded cache; the halves split the registry; the axes
each story claims hold as measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cpl_cache.cache import load_domain, read_manifest
from cpl_cache.errors import UserError
from cpl_cache.synth.planted import PlantedConfig, write_planted_cache
from cpl_cache.synth.zoo import ZOO, split_counts, write_zoo_cache, zoo_names

SMALL = 0.05  # every story, for the structure checks
MODERATE = 0.25  # the stories whose axes are measured


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Every zoo cache at a small scale, seed 0, in one cache folder, with the stats each write returned."""
    root = tmp_path_factory.mktemp("zoo-small")
    return root, {name: write_zoo_cache(root, name, scale=SMALL) for name in ZOO}


@pytest.fixture(scope="module")
def moderate(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The stories whose axes are measured, at a scale where the measures are steady (the two that the
    imitation measure compares at scale 1: its ridge regressions need a few thousand train rows)."""
    root = tmp_path_factory.mktemp("zoo-moderate")
    names = [
        "overconf-128x40", "imbalanced-256x30", "planted-512x345", "cone-goodzs-768x100", "underconf-256x50",
        "kappa100-cone-128x20", "imbalanced-cone-512x60",
    ]  # fmt: skip
    scales = {"planted-64x20": 1.0, "cone-256x50": 1.0} | dict.fromkeys(names, MODERATE)
    return root, {name: write_zoo_cache(root, name, scale=s) for name, s in scales.items()}


def _arrays(root: Path, name: str) -> dict[str, np.ndarray]:
    d = load_domain(root, name)
    return {
        "x": d.image_embeds.float().numpy(),
        "w": d.weak_logits.numpy(),
        "y": d.labels.numpy().astype(np.int64),
        "split": d.split.numpy(),
        "text": d.text_embeds.numpy(),
        "kappa": np.array(d.logit_scale),
    }


@pytest.mark.parametrize("name", list(ZOO))
def test_every_story_writes_a_loadable_cache(small, name):
    root, stats = small
    entry, d = ZOO[name], load_domain(root, name)
    n = split_counts(entry.n_train, entry.classes, SMALL)
    assert {s: d.rows(s).numel() for s in n} == n
    assert stats[name]["rows"] == sum(n.values())
    assert (d.dim, d.num_classes) == (entry.dim, entry.classes)
    assert d.manifest["domain"] == name and d.text_embeds.shape == (entry.classes, entry.dim)
    x, w, y = d.image_embeds.float().numpy(), d.weak_logits.numpy(), d.labels.numpy()
    assert np.isfinite(x).all() and np.isfinite(w).all() and np.isfinite(d.text_embeds.numpy()).all()
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    assert y.min() >= 0 and y.max() < entry.classes
    assert np.bincount(y[d.rows("train").numpy()], minlength=entry.classes).min() >= 2
    assert d.logit_scale > 0 and stats[name]["logit_scale"] == pytest.approx(d.logit_scale)
    # A weak model a student can beat, and a zero-shot classifier that works, imperfectly.
    assert 0.3 < stats[name]["weak_acc"] < 0.85 and 0.05 < stats[name]["zeroshot_acc"] < 0.9


@pytest.mark.parametrize("name", ["tiny-128x10", "planted-64x20", "mixture-64x20"])
def test_same_seed_same_cache_and_another_seed_differs(small, tmp_path, name):
    root, _ = small
    write_zoo_cache(tmp_path / "again", name, scale=SMALL)
    write_zoo_cache(tmp_path / "other", name, scale=SMALL, seed=1)
    a, b, c = (_arrays(r, name) for r in (root, tmp_path / "again", tmp_path / "other"))
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert a["x"].tobytes() != c["x"].tobytes() and a["w"].tobytes() != c["w"].tobytes()
    with pytest.raises(UserError, match="--overwrite"):
        write_zoo_cache(tmp_path / "again", name, scale=SMALL)
    write_zoo_cache(tmp_path / "again", name, scale=SMALL, overwrite=True)


def test_the_planted_story_at_kappa_100_is_write_planted_cache(small, tmp_path):
    """planted-512x345 writes kappa 100: then its rows and prototypes are write_planted_cache's."""
    root, _ = small
    n = split_counts(20_000, 345, SMALL)
    cfg = PlantedConfig(domain="planted-512x345", n_train=n["train"], n_hold=n["hold"], n_test=n["test"])
    write_planted_cache(tmp_path, cfg)
    a, b = _arrays(root, "planted-512x345"), _arrays(tmp_path, "planted-512x345")
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key


def test_the_halves_split_the_zoo():
    tune, judge = set(zoo_names("tune")), set(zoo_names("judge"))
    assert len(tune) >= 4 and len(judge) >= 4 and not tune & judge
    assert tune | judge == set(ZOO) == set(zoo_names()) and len(ZOO) >= 10
    assert all(ZOO[n].half == "tune" for n in tune) and all(c.name == n for n, c in ZOO.items())
    with pytest.raises(UserError, match="tune, judge"):
        zoo_names("train")


def test_the_zoo_spans_its_sizes():
    assert min(c.n_train for c in ZOO.values()) <= 300 and max(c.n_train for c in ZOO.values()) >= 100_000
    assert min(c.classes for c in ZOO.values()) <= 10 and max(c.classes for c in ZOO.values()) >= 345
    assert min(c.dim for c in ZOO.values()) <= 64 and max(c.dim for c in ZOO.values()) >= 768
    largest = max(ZOO.values(), key=lambda c: c.n_train)
    assert largest.dim * largest.classes <= 64 * 10


def test_unknown_names_are_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="unknown zoo cache 'nope'.*planted-64x20.*large-64x10"):
        write_zoo_cache(tmp_path, "nope")
    with pytest.raises(UserError, match="positive"):
        write_zoo_cache(tmp_path, "tiny-128x10", scale=0)


def test_the_zoo_records_itself_in_the_manifest(small):
    root, _ = small
    zoo = read_manifest(root, "cone-256x50")["zoo"]
    assert zoo == {"story": "cone-256x50", "half": "tune", "seed": 0, "scale": SMALL}


def test_weak_confidence_axis(moderate):
    _, stats = moderate
    over, under = stats["overconf-128x40"], stats["underconf-256x50"]
    assert over["weak_confidence"] > over["weak_acc"] + 0.1
    assert under["weak_confidence"] < under["weak_acc"] - 0.1
    for name in ("cone-256x50", "cone-goodzs-768x100", "imbalanced-cone-512x60"):  # about calibrated
        assert abs(stats[name]["weak_confidence"] - stats[name]["weak_acc"]) < 0.1, name


def test_zero_shot_axis(moderate):
    _, stats = moderate
    assert stats["cone-256x50"]["zeroshot_acc"] < 0.25
    assert stats["cone-goodzs-768x100"]["zeroshot_acc"] > 0.45


def test_imbalance_axis(moderate):
    root, stats = moderate
    for name in ("imbalanced-256x30", "imbalanced-cone-512x60"):
        assert stats[name]["class_ratio"] >= 5, name
        a = _arrays(root, name)
        counts = {s: np.bincount(a["y"][a["split"] == s], minlength=a["text"].shape[0]) for s in (0, 1, 2)}
        # hold and test follow the train prior: the same classes are frequent
        assert np.corrcoef(counts[0], counts[2])[0, 1] > 0.9 and np.corrcoef(counts[0], counts[1])[0, 1] > 0.9
    assert stats["cone-256x50"]["class_ratio"] < 1.1


def test_logit_scale_axis(moderate):
    _, stats = moderate
    suits, not_suits = stats["planted-512x345"], stats["kappa100-cone-128x20"]
    assert suits["logit_scale"] == not_suits["logit_scale"] == 100.0
    assert 50 < suits["calibrated_scale"] < 150
    assert not_suits["calibrated_scale"] < 25
    for name in ("cone-256x50", "overconf-128x40", "cone-goodzs-768x100", "planted-64x20"):
        s = stats[name]  # the pretraining sample's kappa is the one the test rows call for
        assert s["logit_scale"] == pytest.approx(s["calibrated_scale"], rel=0.25), name


def test_cone_axis(moderate):
    """Images of different classes have cosine 0.3-0.5 in the cone stories, about 0 elsewhere."""
    root, _ = moderate
    for name, lo, hi in (
        ("cone-256x50", 0.3, 0.5),
        ("overconf-128x40", 0.6, 0.95),
        ("planted-64x20", -0.1, 0.1),
    ):
        a = _arrays(root, name)
        i, j = np.random.default_rng(0).integers(0, len(a["y"]), (2, 2000))
        other = a["y"][i] != a["y"][j]
        cos = (a["x"][i] * a["x"][j]).sum(1)[other].mean()
        assert lo < cos < hi, (name, cos)


def _imitated_mistakes(a: dict[str, np.ndarray]) -> float:
    """A ridge regression from the embeddings to the weak model's argmax, fit on the train rows: on the
    test rows the weak model gets wrong, how often it predicts the weak model's wrong class. High when
    the weak model's mistakes follow the image, near chance when they do not."""
    x = np.hstack([a["x"], np.ones((len(a["x"]), 1), np.float32)]).astype(np.float64)
    weak = a["w"].argmax(1)
    tr, te = a["split"] == 0, a["split"] == 2
    target = np.eye(a["w"].shape[1])[weak[tr]]
    coef = np.linalg.solve(x[tr].T @ x[tr] + 1e-2 * tr.sum() * np.eye(x.shape[1]), x[tr].T @ target)
    wrong = te & (weak != a["y"])
    return float(((x[wrong] @ coef).argmax(1) == weak[wrong]).mean())


def test_weak_mistakes_follow_the_image_only_where_the_story_says(moderate):
    root, _ = moderate
    dependent, independent = (_imitated_mistakes(_arrays(root, n)) for n in ("cone-256x50", "planted-64x20"))
    assert dependent > 0.2 and independent < 0.1 and dependent > 3 * independent
