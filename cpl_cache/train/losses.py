"""Weak-to-strong losses: `LOSSES[name](student_logits, weak_logits, progress) -> scalar`.

`student_logits` and `weak_logits` are (B, K); `progress` in [0, 1] is the fraction of training done
(the confidence losses ramp with it). Definitions and defaults are those of PAPER.md "Baselines";
keyword arguments are the constants, which a run may override (`cpl-cache train --set T=2`).

`auxconf`, `augconf` and `adaptconf` harden the student's prediction class-balanced (`balanced_hard`, the
multi-class form of openai/weak-to-strong's quantile threshold); their plain-argmax forms are registered
as `auxconf-argmax`, `augconf-argmax` and `adaptconf-argmax`, and the references' own schedules as
`auxconf-openai`, `augconf-staircase` and `adaptconf-ramp` (docs/losses.md). Every constant is a
keyword-only argument with a default, which the method registry reads from the signature.

Autograd differentiates every loss: adding one is one function and one line in `LOSSES`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Loss = Callable[[Tensor, Tensor, float], Tensor]


# What a loss computes from the weak logits alone (their softmax, its log at a temperature, the argmax,
# the balanced counts) is the same for every head of a stack, which all see one batch of targets: it is
# computed once per batch and shared, keyed by the batch tensor's identity (checked through a weak
# reference, so a freed batch is never mistaken for a new one) and version (an in-place change
# recomputes). Targets never require gradients; a tensor that does is never shared.
_WEAK_MEMO: dict[int, tuple[weakref.ref, int, dict]] = {}
_WEAK_MEMO_SIZE = 8  # batches remembered: a step's distinct targets (weak logits, ground truth)


def _of_weak(w: Tensor, key: tuple, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """fn(w), computed once per weak-logit batch `w` and `key` (fn's name and constants)."""
    if w.requires_grad:
        return fn(w)
    entry = _WEAK_MEMO.get(id(w))
    if entry is None or entry[0]() is not w or entry[1] != w._version:
        if len(_WEAK_MEMO) >= _WEAK_MEMO_SIZE:
            _WEAK_MEMO.clear()
        entry = _WEAK_MEMO[id(w)] = (weakref.ref(w), w._version, {})
    memo = entry[2]
    if key not in memo:
        memo[key] = fn(w)
    return memo[key]


def _weak_softmax(w: Tensor) -> Tensor:
    return _of_weak(w, ("softmax",), lambda w: F.softmax(w, dim=1))


def _weak_argmax(w: Tensor) -> Tensor:
    return _of_weak(w, ("argmax",), lambda w: w.argmax(dim=1))


def _weak_counts(w: Tensor) -> Tensor:
    return _of_weak(w, ("counts",), lambda w: balanced_counts(_weak_softmax(w.detach())))


def _kd_per_sample(s: Tensor, w: Tensor, T: float) -> Tensor:
    """T^2 * KL(softmax(w/T) || softmax(s/T)) for each row."""
    if T != 1.0:  # at the default T = 1 skip three elementwise passes (they dominate a step on the GPU)
        s = s / T
    log_pw = _of_weak(w, ("log_softmax", T), lambda w: F.log_softmax(w / T if T != 1.0 else w, dim=1))
    pw = _of_weak(w, ("softmax_of_log", T), lambda w: log_pw.exp())
    kl = (pw * (log_pw - F.log_softmax(s, dim=1))).sum(dim=1)
    return kl if T == 1.0 else (T * T) * kl


def _ramp(progress: float, peak: float, span: float) -> float:
    """A weight rising linearly from 0 to `peak` over the first `span` of training."""
    return peak * min(1.0, progress / span) if span > 0 else peak


def soft(s: Tensor, w: Tensor, progress: float = 0.0) -> Tensor:
    """Cross-entropy to softmax(w): the naive weak-to-strong baseline (Burns et al. 2023)."""
    return -(_weak_softmax(w) * F.log_softmax(s, dim=1)).sum(dim=1).mean()


def hard(s: Tensor, w: Tensor, progress: float = 0.0) -> Tensor:
    """Cross-entropy to argmax(w)."""
    return F.cross_entropy(s, _weak_argmax(w))


def kd(s: Tensor, w: Tensor, progress: float = 0.0, *, T: float = 1.0) -> Tensor:
    """Knowledge distillation, T^2 * KL(softmax(w/T) || softmax(s/T)), averaged over rows."""
    return _kd_per_sample(s, w, T).mean()


def balanced_counts(weak_probs: Tensor) -> Tensor:
    """How many of a batch's B hardened labels each class receives: about B * mean_i softmax(w_i)_k.

    The B rows, ranked by the student, stand at quantile levels i / (B - 1); the classes share [0, 1] in
    the order K - 1, ..., 1, 0, each a slice as wide as its weak mean, and receive the levels in their
    slice (class 0 the closed end). So class k >= 1 receives ceil(U_k (B - 1)) - ceil(U_{k+1} (B - 1)),
    U_k = sum_{j >= k} mean_j, class 0 the rest: integers summing to B, each within 1 + mean_k of
    B * mean_k. At K = 2 class 1 receives ceil(mean_1 (B - 1)) rows, as many as lie below openai's
    torch.quantile(p_0, mean_1) threshold (computed in the same dtype, so the same integer).
    """
    n = len(weak_probs)
    upper = weak_probs.mean(dim=0).flip(0).cumsum(0).flip(0)
    edges = torch.ceil(upper * (n - 1)).long().clamp_(0, max(n - 1, 0))
    edges[0] = n
    return edges - torch.cat([edges[1:], edges.new_zeros(1)])


@torch.no_grad()
def _assign(probs: Tensor, counts: Tensor) -> Tensor:
    """Greedy over (row, class) pairs in descending student probability, class k taking at most counts[k]
    rows: computed as deferred acceptance (its unique outcome when scores are common to both sides), each
    round vectorised. Free rows propose to their most probable class whose cut-off they beat; a class over
    capacity keeps its best rows and raises its cut-off to the first one it turns away. A class never
    splits rows of equal probability at its cut (it turns the tie away) and rows that every class turns
    away (possible only through such ties) go to class 0: openai's `>=` at its threshold, exactly."""
    b, k = probs.shape
    cap = torch.cat([counts, counts.new_tensor([b])])  # class k: rows no class took, sent to class 0
    cutoff = probs.new_full((k + 1,), -1.0)  # a class takes a row only with probability above it
    assign = probs.argmax(dim=1)
    position = torch.arange(b, device=probs.device)
    while True:
        score = probs.gather(1, assign.clamp(max=k - 1)[:, None]).squeeze(1)
        order = torch.sort(score, descending=True, stable=True).indices
        order = order[torch.sort(assign[order], stable=True).indices]  # by class, best first
        cls = assign[order]
        size = torch.bincount(cls, minlength=k + 1)
        rank = position - (size.cumsum(0) - size)[cls]
        cut = rank == cap[cls]
        cutoff[cls[cut]] = score[order[cut]]
        turned = order[score[order] <= cutoff[cls]]
        if not len(turned):
            break
        rows = probs[turned]
        best, choice = torch.where(rows > cutoff[:k], rows, -1.0).max(dim=1)
        assign[turned] = torch.where(best >= 0, choice, k)
    return assign.masked_fill_(assign == k, 0)


def balanced_hard(s: Tensor, w: Tensor) -> Tensor:
    """The student's class-balanced hard prediction (B,), detached: class k labels `balanced_counts` rows,
    those the student finds most probable for it (`_assign`). At K = 2: the rows whose p_0 lies below
    torch.quantile(p_0, mean softmax(w)_1) are class 1, as in openai/weak-to-strong's `logconf_loss_fn`."""
    return _assign(F.softmax(s.detach(), dim=1), _weak_counts(w))


def _self_mix(s: Tensor, w: Tensor, coef: float) -> Tensor:
    """CE(s, (1 - coef) softmax(w) + coef onehot(balanced_hard(s, w)))."""
    pw = _weak_softmax(w)
    target = pw
    if coef != 0.0:  # at zero weight the target is softmax(w) exactly: skip the hardening
        hard_s = _assign(F.softmax(s.detach(), dim=1), _weak_counts(w))
        target = (1.0 - coef) * pw + coef * F.one_hot(hard_s, s.shape[1]).to(pw.dtype)
    return -(target * F.log_softmax(s, dim=1)).sum(dim=1).mean()


def auxconf(
    s: Tensor, w: Tensor, progress: float = 0.0, *, alpha: float = 0.5, warmup: float = 0.1
) -> Tensor:
    """Auxiliary confidence loss (Burns et al. 2023), multi-class: CE to a mix of softmax(w) and the
    student's class-balanced hard prediction, whose weight ramps linearly to `alpha` over `warmup`."""
    return _self_mix(s, w, _ramp(progress, alpha, warmup))


def auxconf_openai(
    s: Tensor, w: Tensor, progress: float = 0.0, *, alpha: float = 0.5, warmup: float = 0.1
) -> Tensor:
    """`auxconf` with openai/weak-to-strong's step warmup: weight alpha * progress up to `warmup`, then
    alpha (a jump at `warmup`). At K = 2 it is their `logconf_loss_fn`."""
    return _self_mix(s, w, alpha * (progress if progress <= warmup else 1.0))


def _conf_mix(s: Tensor, w: Tensor, a: float, T: float) -> Tensor:
    """(1 - a) kd + a CE(s, balanced_hard(s, w))."""
    loss = (1.0 - a) * _kd_per_sample(s, w, T).mean()
    if a != 0.0:
        loss = loss + a * F.cross_entropy(s, balanced_hard(s, w))
    return loss


def augconf(
    s: Tensor, w: Tensor, progress: float = 0.0, *, beta: float = 0.5, ramp: float = 0.3, T: float = 1.0
) -> Tensor:
    """Augmented confidence loss (Guo et al. 2024): (1 - a) kd + a CE(s, balanced_hard(s, w)), a ramping
    linearly to `beta` over `ramp`. The counts come from softmax(w) at T = 1 whatever `T`."""
    return _conf_mix(s, w, _ramp(progress, beta, ramp), T)


def augconf_staircase(
    s: Tensor,
    w: Tensor,
    progress: float = 0.0,
    *,
    beta: float = 0.5,
    ramp: float = 0.3,
    stairs: int = 10,
    T: float = 1.0,
) -> Tensor:
    """`augconf` with ggjy/vision_weak_to_strong's per-epoch staircase, over E = `stairs` equal parts of
    training (ggjy's epochs): at part e = floor(progress E), a = e / (E ramp) * beta while
    e < int(E ramp), then beta."""
    epoch, steps = math.floor(progress * stairs), int(stairs * ramp)
    return _conf_mix(s, w, epoch / (stairs * ramp) * beta if epoch < steps else beta, T)


def auxconf_argmax(
    s: Tensor, w: Tensor, progress: float = 0.0, *, alpha: float = 0.5, warmup: float = 0.1
) -> Tensor:
    """`auxconf` hardened by plain argmax: CE to (1 - coef) softmax(w) + coef onehot(argmax s). Without
    a ground-truth anchor it reinforces whichever class is winning (collapse; docs/losses.md)."""
    coef = _ramp(progress, alpha, warmup)
    log_ps = F.log_softmax(s, dim=1)
    own = F.one_hot(s.detach().argmax(dim=1), s.shape[1]).to(s.dtype)
    target = (1.0 - coef) * _weak_softmax(w) + coef * own
    return -(target * log_ps).sum(dim=1).mean()


def augconf_argmax(
    s: Tensor, w: Tensor, progress: float = 0.0, *, beta: float = 0.5, ramp: float = 0.3, T: float = 1.0
) -> Tensor:
    """`augconf` hardened by plain argmax: (1 - a) kd + a CE(s, argmax s)."""
    a = _ramp(progress, beta, ramp)
    self_ce = F.cross_entropy(s, s.detach().argmax(dim=1))
    return (1.0 - a) * _kd_per_sample(s, w, T).mean() + a * self_ce


def adaptconf(s: Tensor, w: Tensor, progress: float = 0.0, *, tau: float = 0.5, T: float = 1.0) -> Tensor:
    """Adaptive confidence loss (Guo et al. 2024), multi-class: per row, a = u / (u + v) with
    u = exp(CE(s, h) / tau) and v = exp(CE(s, argmax w) / tau), detached, h the student's class-balanced
    hard prediction (`balanced_hard`, as `auxconf` and `augconf` harden); the loss is
    mean((1 - a) kd + a CE(s, h)). The literal argmax form is `adaptconf-argmax`.

    u / (u + v) is computed as sigmoid((CE_s - CE_w) / tau), equal and free of overflow.
    """
    return _adaptive(s, w, tau, T, 1.0, balanced_hard(s, w))


def adaptconf_argmax(
    s: Tensor, w: Tensor, progress: float = 0.0, *, tau: float = 0.5, T: float = 1.0
) -> Tensor:
    """`adaptconf` hardened by plain argmax, h = argmax s, as Guo et al. write it. Without a ground-truth
    anchor it can collapse a linear probe onto a few classes, as argmax AuxConf and AugConf do
    (docs/losses.md)."""
    return _adaptive(s, w, tau, T, 1.0, s.detach().argmax(dim=1))


def adaptconf_ramp(
    s: Tensor, w: Tensor, progress: float = 0.0, *, tau: float = 0.5, T: float = 1.0, ramp: float = 0.25
) -> Tensor:
    """`adaptconf` as ggjy/vision_weak_to_strong's few-shot trainer runs it: the per-row weight a is also
    ramped by min(1, progress / ramp)."""
    return _adaptive(s, w, tau, T, _ramp(progress, 1.0, ramp), balanced_hard(s, w))


def _adaptive(s: Tensor, w: Tensor, tau: float, T: float, scale: float, own: Tensor) -> Tensor:
    """mean((1 - a) kd + a CE(s, own)) with a = scale * sigmoid((CE(s, own) - CE(s, argmax w)) / tau),
    detached; `own` is the student's hardened prediction (B,)."""
    log_ps = F.log_softmax(s, dim=1)
    ce_self = -log_ps.gather(1, own[:, None]).squeeze(1)
    ce_weak = -log_ps.gather(1, _weak_argmax(w)[:, None]).squeeze(1)
    a = scale * torch.sigmoid((ce_self - ce_weak).detach() / tau)
    return ((1.0 - a) * _kd_per_sample(s, w, T) + a * ce_self).mean()


LOSSES: dict[str, Loss] = {
    "soft": soft,
    "hard": hard,
    "kd": kd,
    "auxconf": auxconf,
    "augconf": augconf,
    "adaptconf": adaptconf,
    "auxconf-argmax": auxconf_argmax,
    "augconf-argmax": augconf_argmax,
    "auxconf-openai": auxconf_openai,
    "augconf-staircase": augconf_staircase,
    "adaptconf-ramp": adaptconf_ramp,
    "adaptconf-argmax": adaptconf_argmax,
}


def get_loss(name: str) -> Loss:
    """The loss registered as `name`, or a UserError listing the valid names."""
    from cpl_cache.errors import UserError

    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]
