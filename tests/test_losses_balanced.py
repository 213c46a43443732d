"""Class-balanced hardening and the losses built on it: at K = 2 openai/weak-to-strong's `logconf_loss_fn`
exactly (ties and odd batch sizes included); at K > 2 its counts and its greedy assignment against plain
Python; each new loss against a float64 formula of its own; the references' schedules at chosen points."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from test_losses import REFERENCE as ARGMAX_REFERENCE
from test_losses import ce_rows, kd_rows, onehot, softmax, value_and_grad

from cpl_cache.train.losses import LOSSES, balanced_counts, balanced_hard

torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU


def openai_logconf(logits, labels, step_frac, aux_coef=0.5, warmup_frac=0.1, coef=None):
    """openai/weak-to-strong's binary `logconf_loss_fn`, written from its formula; `coef` replaces its step
    warmup (for the linear ramp of `auxconf`)."""
    if coef is None:
        coef = (step_frac if step_frac <= warmup_frac else 1.0) * aux_coef
    preds = torch.softmax(logits, dim=-1)
    mean_weak = labels.mean(dim=0)
    threshold = torch.quantile(preds[:, 0], mean_weak[1])
    strong_preds = torch.cat([(preds[:, 0] >= threshold)[:, None], (preds[:, 0] < threshold)[:, None]], 1)
    target = labels * (1 - coef) + strong_preds.detach() * coef
    return F.cross_entropy(logits, target, reduction="none").mean()


def binary_batches(n: int, seed: int):
    """Random two-class batches of odd and even sizes in both dtypes, a third of them with tied rows (and
    some rows tied within), a fifth with logits rounded to integers (more ties)."""
    g = torch.Generator().manual_seed(seed)
    for trial in range(n):
        b = int(torch.randint(1, 41, (1,), generator=g))
        dtype = torch.float64 if trial % 2 else torch.float32
        s = torch.randn(b, 2, generator=g, dtype=torch.float64) * 4 * float(torch.rand(1, generator=g))
        w = 3 * torch.randn(b, 2, generator=g, dtype=torch.float64) + 3 * torch.randn(1, 2, generator=g)
        if trial % 3 == 0 and b > 2:
            idx = torch.randint(0, b, (b,), generator=g)
            idx[: b // 2] = idx[0]
            s = s[idx]
            if trial % 6 == 0:
                s[: b // 3, 1] = s[: b // 3, 0]
        if trial % 5 == 0:
            s = s.round()
        yield s.to(dtype), w.to(dtype)


@pytest.mark.parametrize("progress", [0.0, 0.03, 0.1, 0.1001, 0.5, 1.0])
def test_at_two_classes_auxconf_openai_is_openais_logconf_loss(progress: float):
    ties = 0
    for s, w in binary_batches(150, seed=round(1e4 * progress)):
        labels = torch.softmax(w, dim=1)
        got = LOSSES["auxconf-openai"](s, w, progress)
        torch.testing.assert_close(got, openai_logconf(s, labels, progress), rtol=1e-6, atol=1e-6)
        ramp = 0.5 * min(1.0, progress / 0.1)
        torch.testing.assert_close(
            LOSSES["auxconf"](s, w, progress),
            openai_logconf(s, labels, progress, coef=ramp),
            rtol=1e-6,
            atol=1e-6,
        )
        ties += len(s) > len(torch.unique(s, dim=0))
    assert ties > 20


def test_at_two_classes_the_hardened_labels_are_openais_threshold():
    """The labels themselves, exactly: class 1 where p_0 lies below torch.quantile(p_0, mean_weak_1)."""
    for s, w in binary_batches(600, seed=5):
        p0 = torch.softmax(s, dim=1)[:, 0]
        threshold = torch.quantile(p0, torch.softmax(w, dim=1).mean(dim=0)[1])
        assert torch.equal(balanced_hard(s, w), (p0 < threshold).long())


def expected_counts(q: list[float], b: int) -> list[int]:
    """The batch's ranks i = 0..B-1 dealt to slices of [0, B - 1] as wide as q (B - 1), in class order
    K - 1, ..., 0, each rank to the slice that holds it (the closed end, and a batch of one, to class 0)."""
    upper = [math.fsum(q[j:]) * (b - 1) for j in range(len(q))]
    counts = [0] * len(q)
    for i in range(b):
        counts[next((c for c in range(len(q) - 1, 0, -1) if i < upper[c]), 0)] += 1
    return counts


@pytest.mark.parametrize(("b", "k"), [(1, 3), (2, 5), (7, 3), (64, 10), (101, 17), (1024, 345)])
def test_each_class_receives_its_share_of_the_batch(b: int, k: int):
    g = torch.Generator().manual_seed(b * k)
    for _ in range(4):
        w = 3 * torch.randn(b, k, generator=g, dtype=torch.float64) + 2 * torch.randn(k, generator=g)
        s = 3 * torch.randn(b, k, generator=g, dtype=torch.float64)
        q = softmax(w).mean(dim=0)
        want = expected_counts(q.tolist(), b)
        assert balanced_counts(softmax(w)).tolist() == want
        assert torch.bincount(balanced_hard(s, w), minlength=k).tolist() == want
        assert sum(want) == b
        assert ((torch.tensor(want) - b * q).abs() <= 1 + q).all()


def python_greedy(p: torch.Tensor, counts: list[int]) -> list[int]:
    """Greedy over (row, class) pairs in descending probability, each class up to its count."""
    b, k = p.shape
    pairs = sorted(((p[i, c].item(), i, c) for i in range(b) for c in range(k)), reverse=True)
    out, room = [-1] * b, list(counts)
    for _, i, c in pairs:
        if out[i] < 0 and room[c] > 0:
            out[i], room[c] = c, room[c] - 1
    return out


def test_the_assignment_follows_the_students_probabilities():
    """Two rows per class: argmax would give class 0 four rows; the greedy keeps its two most probable."""
    probs = torch.tensor(
        [[0.90, 0.05, 0.05], [0.80, 0.15, 0.05], [0.70, 0.10, 0.20],
         [0.60, 0.30, 0.10], [0.10, 0.85, 0.05], [0.20, 0.20, 0.60]], dtype=torch.float64
    )  # fmt: skip
    w = torch.zeros(6, 3, dtype=torch.float64)
    assert balanced_counts(softmax(w)).tolist() == [2, 2, 2]
    assert probs.log().argmax(dim=1).tolist() == [0, 0, 0, 0, 1, 2]
    assert balanced_hard(probs.log(), w).tolist() == [0, 0, 2, 1, 1, 2]
    # Rows are matched by their probabilities, not their places in the batch.
    perm = torch.tensor([3, 5, 0, 2, 4, 1])
    assert balanced_hard(probs.log()[perm], w).tolist() == [1, 2, 0, 2, 1, 0]


@pytest.mark.parametrize(("b", "k", "scale"), [(40, 7, 3.0), (33, 5, 0.3), (60, 12, 8.0)])
def test_the_assignment_is_the_greedy_over_pairs(b: int, k: int, scale: float):
    g = torch.Generator().manual_seed(b + k)
    for _ in range(5):
        s = scale * torch.randn(b, k, generator=g, dtype=torch.float64) + scale * torch.randn(k, generator=g)
        w = 3 * torch.randn(b, k, generator=g, dtype=torch.float64)
        want = python_greedy(softmax(s), expected_counts(softmax(w).mean(dim=0).tolist(), b))
        assert balanced_hard(s, w).tolist() == want


def hardened(s, w):
    p, q = softmax(s.detach()), softmax(w).mean(dim=0)
    return onehot(torch.tensor(python_greedy(p, expected_counts(q.tolist(), len(s)))), s.shape[1])


def ref_auxconf(s, w, t):
    coef = 0.5 * min(1.0, t / 0.1)
    return ce_rows(s, (1 - coef) * softmax(w) + coef * hardened(s, w)).mean()


def ref_auxconf_openai(s, w, t):
    coef = 0.5 * (t if t <= 0.1 else 1.0)
    return ce_rows(s, (1 - coef) * softmax(w) + coef * hardened(s, w)).mean()


def ref_augconf(s, w, t):
    a = 0.5 * min(1.0, t / 0.3)
    return (1 - a) * kd_rows(s, w).mean() + a * ce_rows(s, hardened(s, w)).mean()


def ref_augconf_staircase(s, w, t):
    epoch = math.floor(10 * t)
    a = epoch / 3 * 0.5 if epoch < 3 else 0.5
    return (1 - a) * kd_rows(s, w).mean() + a * ce_rows(s, hardened(s, w)).mean()


def ref_adaptconf(s, w, t, ramp: float | None = None):
    k = s.shape[1]
    ce_s = ce_rows(s, hardened(s, w))
    ce_w = ce_rows(s, onehot(w.argmax(1), k))
    u, v = torch.exp(ce_s / 0.5), torch.exp(ce_w / 0.5)
    a = (u / (u + v)).detach() * (1.0 if ramp is None else min(1.0, t / ramp))
    return ((1 - a) * kd_rows(s, w) + a * ce_s).mean()


def ref_adaptconf_ramp(s, w, t):
    return ref_adaptconf(s, w, t, ramp=0.25)


REFERENCE = {
    "auxconf": ref_auxconf,
    "augconf": ref_augconf,
    "auxconf-openai": ref_auxconf_openai,
    "augconf-staircase": ref_augconf_staircase,
    "adaptconf": ref_adaptconf,
    "adaptconf-ramp": ref_adaptconf_ramp,
}


def test_every_registered_loss_has_a_reference_here_or_in_test_losses():
    assert set(LOSSES) == set(REFERENCE) | set(ARGMAX_REFERENCE)
    assert not set(REFERENCE) & set(ARGMAX_REFERENCE)


@pytest.mark.parametrize("progress", [0.0, 0.05, 0.1, 0.15, 0.25, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_loss_matches_plain_formula(name: str, progress: float):
    g = torch.Generator().manual_seed(31 * sorted(REFERENCE).index(name) + round(100 * progress))
    s = 3 * torch.randn(24, 9, generator=g, dtype=torch.float64)
    w = 3 * torch.randn(24, 9, generator=g, dtype=torch.float64) + torch.randn(9, generator=g)
    v, gr = value_and_grad(LOSSES[name], s, w, progress)
    rv, rgr = value_and_grad(REFERENCE[name], s, w, progress)
    assert v.ndim == 0
    torch.testing.assert_close(v, rv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gr, rgr, rtol=1e-9, atol=1e-12)


def self_weight(name: str, progress: float) -> float:
    """The weight of the self-training term at `progress`, read back from the loss, which is linear in it."""
    g = torch.Generator().manual_seed(3)
    s = 2 * torch.randn(50, 6, generator=g, dtype=torch.float64)
    w = 2 * torch.randn(50, 6, generator=g, dtype=torch.float64)
    weak = ce_rows(s, softmax(w)).mean() if name.startswith("auxconf") else kd_rows(s, w).mean()
    own = ce_rows(s, onehot(balanced_hard(s, w), 6)).mean()
    return ((LOSSES[name](s, w, progress) - weak) / (own - weak)).item()


@pytest.mark.parametrize(
    ("progress", "weight"),
    [(0.0, 0), (0.05, 0), (0.1, 1 / 6), (0.199, 1 / 6), (0.25, 1 / 3), (0.3, 0.5), (0.7, 0.5), (1.0, 0.5)],
)
def test_augconf_staircase_steps_once_an_epoch(progress: float, weight: float):
    assert self_weight("augconf-staircase", progress) == pytest.approx(weight, abs=1e-12)


@pytest.mark.parametrize(
    ("progress", "weight"), [(0.0, 0.0), (0.04, 0.02), (0.1, 0.05), (0.1001, 0.5), (0.6, 0.5)]
)
def test_auxconf_openai_jumps_at_the_end_of_warmup(progress: float, weight: float):
    assert self_weight("auxconf-openai", progress) == pytest.approx(weight, abs=1e-12)
    # The default ramps linearly instead, to the same peak.
    assert self_weight("auxconf", progress) == pytest.approx(0.5 * min(1.0, progress / 0.1), abs=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_constant_is_a_keyword_with_a_default(name: str):
    """The method registry reads a loss's constants from its signature to declare and override them."""
    params = list(inspect.signature(LOSSES[name]).parameters.values())
    assert [p.name for p in params[:3]] == ["s", "w", "progress"]
    assert params[2].default == 0.0
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty for p in params[3:])
    assert set(LOSSES[name].__kwdefaults__ or {}) == {p.name for p in params[3:]}


def test_hardening_carries_no_gradient():
    s = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    assert not balanced_hard(s, w).requires_grad
