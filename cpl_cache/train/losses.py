"""Weak-to-strong losses: `LOSSES[name](student_logits, weak_logits, progress) -> scalar`.

`student_logits` and `weak_logits` are (B, K); `progress` in [0, 1] is the fraction of training done
(the confidence losses ramp with it). Definitions and defaults are those of PAPER.md "Baselines";
keyword arguments expose the constants for ablations (e.g. `functools.partial(kd, T=2.0)`).

`auxconf` and `augconf` harden the student's prediction class-balanced (`balanced_hard`, the multi-class
form of openai/weak-to-strong's quantile threshold); their plain-argmax forms are registered as
`auxconf-argmax` and `augconf-argmax`, and the references' own schedules as `auxconf-openai`,
`augconf-staircase` and `adaptconf-ramp` (docs/losses.md). Every constant is a keyword-only argument
with a default, which the method registry reads from the signature.

With their default constants, the losses of `LOGIT_GRADS` (the argmax ones and soft, hard, kd) have one
gradient shape in the student logits: d loss / d s = (softmax(s) - target) / B, where the target mixes
softmax(w), onehot(argmax w) and onehot(argmax s), with weights that never carry gradient. `LOGIT_GRADS`
holds that closed form for each such function, without the 1 / B (the trainer folds it into the head's
backward matrix product instead of spending a pass over (B, K) on it); the trainer steps with it instead
of differentiating the loss's ~10 elementwise passes through autograd, and tests hold each form to
autograd's gradient of the loss itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cpl_cache.train.cpu_kernel import ADAPT, HARD, SELF_MIX, SOFT

Loss = Callable[[Tensor, Tensor, float], Tensor]


def _kd_per_sample(s: Tensor, w: Tensor, T: float) -> Tensor:
    """T^2 * KL(softmax(w/T) || softmax(s/T)) for each row."""
    if T != 1.0:  # at the default T = 1 skip three elementwise passes (they dominate a step on the GPU)
        s, w = s / T, w / T
    log_pw = F.log_softmax(w, dim=1)
    kl = (log_pw.exp() * (log_pw - F.log_softmax(s, dim=1))).sum(dim=1)
    return kl if T == 1.0 else (T * T) * kl


def _ramp(progress: float, peak: float, span: float) -> float:
    """A weight rising linearly from 0 to `peak` over the first `span` of training."""
    return peak * min(1.0, progress / span) if span > 0 else peak


def soft(s: Tensor, w: Tensor, progress: float = 0.0) -> Tensor:
    """Cross-entropy to softmax(w): the naive weak-to-strong baseline (Burns et al. 2023)."""
    return -(F.softmax(w, dim=1) * F.log_softmax(s, dim=1)).sum(dim=1).mean()


def hard(s: Tensor, w: Tensor, progress: float = 0.0) -> Tensor:
    """Cross-entropy to argmax(w)."""
    return F.cross_entropy(s, w.argmax(dim=1))


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
    return _assign(F.softmax(s.detach(), dim=1), balanced_counts(F.softmax(w.detach(), dim=1)))


def _self_mix(s: Tensor, w: Tensor, coef: float) -> Tensor:
    """CE(s, (1 - coef) softmax(w) + coef onehot(balanced_hard(s, w)))."""
    pw = F.softmax(w, dim=1)
    target = pw
    if coef != 0.0:  # at zero weight the target is softmax(w) exactly: skip the hardening
        hard_s = _assign(F.softmax(s.detach(), dim=1), balanced_counts(pw.detach()))
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
    epochs: int = 10,
    T: float = 1.0,
) -> Tensor:
    """`augconf` with ggjy/vision_weak_to_strong's per-epoch staircase: at epoch e = floor(progress E),
    a = e / (E ramp) * beta while e < int(E ramp), then beta."""
    epoch, steps = math.floor(progress * epochs), int(epochs * ramp)
    return _conf_mix(s, w, epoch / (epochs * ramp) * beta if epoch < steps else beta, T)


def auxconf_argmax(
    s: Tensor, w: Tensor, progress: float = 0.0, *, alpha: float = 0.5, warmup: float = 0.1
) -> Tensor:
    """`auxconf` hardened by plain argmax: CE to (1 - coef) softmax(w) + coef onehot(argmax s). Without
    a ground-truth anchor it reinforces whichever class is winning (collapse; docs/losses.md)."""
    coef = _ramp(progress, alpha, warmup)
    log_ps = F.log_softmax(s, dim=1)
    own = F.one_hot(s.detach().argmax(dim=1), s.shape[1]).to(s.dtype)
    target = (1.0 - coef) * F.softmax(w, dim=1) + coef * own
    return -(target * log_ps).sum(dim=1).mean()


def augconf_argmax(
    s: Tensor, w: Tensor, progress: float = 0.0, *, beta: float = 0.5, ramp: float = 0.3, T: float = 1.0
) -> Tensor:
    """`augconf` hardened by plain argmax: (1 - a) kd + a CE(s, argmax s)."""
    a = _ramp(progress, beta, ramp)
    self_ce = F.cross_entropy(s, s.detach().argmax(dim=1))
    return (1.0 - a) * _kd_per_sample(s, w, T).mean() + a * self_ce


def adaptconf(s: Tensor, w: Tensor, progress: float = 0.0, *, tau: float = 0.5, T: float = 1.0) -> Tensor:
    """Adaptive confidence loss (Guo et al. 2024): per row, a = u / (u + v) with
    u = exp(CE(s, argmax s) / tau) and v = exp(CE(s, argmax w) / tau), detached;
    the loss is mean((1 - a) kd + a CE(s, argmax s)).

    u / (u + v) is computed as sigmoid((CE_s - CE_w) / tau), equal and free of overflow.
    """
    return _adaptive(s, w, tau, T, 1.0)


def adaptconf_ramp(
    s: Tensor, w: Tensor, progress: float = 0.0, *, tau: float = 0.5, T: float = 1.0, ramp: float = 0.25
) -> Tensor:
    """`adaptconf` as ggjy/vision_weak_to_strong's few-shot trainer runs it: the per-row weight a is also
    ramped by min(1, progress / ramp)."""
    return _adaptive(s, w, tau, T, _ramp(progress, 1.0, ramp))


def _adaptive(s: Tensor, w: Tensor, tau: float, T: float, scale: float) -> Tensor:
    """mean((1 - a) kd + a CE(s, argmax s)) with a = scale * sigmoid((CE_s - CE_w) / tau), detached."""
    log_ps = F.log_softmax(s, dim=1)
    ce_self = -log_ps.gather(1, s.detach().argmax(dim=1, keepdim=True)).squeeze(1)
    ce_weak = -log_ps.gather(1, w.argmax(dim=1, keepdim=True)).squeeze(1)
    a = scale * torch.sigmoid((ce_self - ce_weak).detach() / tau)
    return ((1.0 - a) * _kd_per_sample(s, w, T) + a * ce_self).mean()


@dataclass(frozen=True)
class LogitGrad:
    """A closed-form gradient, `grad(s, weak_probs, weak_argmax, progress) -> B * d loss / d s` (the gradient
    of the loss summed over the batch's rows rather than averaged), with s the (detached) student logits
    (B, K), weak_probs = softmax(w) (B, K) and weak_argmax = argmax(w) (B,), both computed once per domain;
    it returns a fresh tensor and may overwrite s (the trainer is done with it). `probs` and `top` say
    which of the two it reads: the trainer gathers only those per batch (and passes None for the other).
    On the CPU in float32 the trainer runs `kernel` instead: the same gradient in one pass per row of
    `cpu_kernel.c`, which reads the targets' rows where they lie."""

    fn: Callable[[Tensor, Tensor | None, Tensor | None, float], Tensor]
    probs: bool
    top: bool
    # The same gradient as cpu_kernel.c computes it: progress -> (mode, coef, tau) of `logit_grad_`.
    kernel: Callable[[float], tuple[int, float, float]]

    def __call__(self, s: Tensor, pw: Tensor | None, yw: Tensor | None, progress: float) -> Tensor:
        return self.fn(s, pw, yw, progress)


def _minus_onehot_(g: Tensor, cls: Tensor, weight: float) -> Tensor:
    """g[i, cls[i]] -= weight, in place: one scatter (advanced indexing takes ~4 ops)."""
    return g.scatter_add_(1, cls[:, None], g.new_full((len(g), 1), -weight))


# Device types where the student's one-hot is a comparison mask rather than argmax (see below).
MASK_ARGMAX_DEVICES = ("cpu",)


def _lerp_to_argmax(pw: Tensor, s: Tensor, top: Tensor, weight: Tensor | float) -> Tensor:
    """The target (1 - weight) pw + weight onehot(argmax s), with weight a float or a (B, 1) column of
    per-row weights, given top = s.amax(dim=1, keepdim=True). On the CPU it is written over s.

    On the CPU torch's argmax is a scalar loop, about four times the vectorised `amax` (0.54 against
    0.14 ms at B = 1024, K = 345 on 2 cores), so there the one-hot is the mask s == top, written over s
    (a fresh (B, K) tensor costs ~340 page faults a step), and one `lerp` mixes it with pw. The mask is
    argmax's one-hot exactly when no row's maximum is tied, which one sum checks. Where a row's maximum
    is tied (two equal prototypes, say) it takes the first, as argmax does, and as other devices do,
    where the check would cost a synchronisation.
    """
    if s.device.type in MASK_ARGMAX_DEVICES:
        hit = torch.eq(s, top, out=s)
        if hit.sum().item() == len(s):
            return torch.lerp(pw, hit, weight, out=hit)
        first = hit.argmax(dim=1, keepdim=True)  # the first of each row's maxima
    else:
        first = s.argmax(dim=1, keepdim=True)
    w = weight if isinstance(weight, Tensor) else pw.new_full((len(pw), 1), weight)
    return pw.mul(1.0 - w).scatter_add_(1, first, w)


def _soft_grad(s: Tensor, pw: Tensor, yw: Tensor, progress: float) -> Tensor:
    return torch.softmax(s, dim=1).sub_(pw)


def _hard_grad(s: Tensor, pw: Tensor, yw: Tensor, progress: float) -> Tensor:
    return _minus_onehot_(torch.softmax(s, dim=1), yw, 1.0)


def _self_mix_grad(s: Tensor, pw: Tensor, coef: float) -> Tensor:
    """Target (1 - coef) softmax(w) + coef onehot(argmax s): auxconf's and, at T = 1, augconf's."""
    top = s.amax(dim=1, keepdim=True)
    g = torch.softmax(s, dim=1)  # before the target, which may overwrite s
    return g.sub_(_lerp_to_argmax(pw, s, top, coef))


# The constants are read from the losses' own defaults, so the forms cannot drift apart.
_AUX, _AUG, _ADAPT = auxconf_argmax.__kwdefaults__, augconf_argmax.__kwdefaults__, adaptconf.__kwdefaults__


def _auxconf_grad(s: Tensor, pw: Tensor, yw: Tensor, progress: float) -> Tensor:
    return _self_mix_grad(s, pw, _ramp(progress, _AUX["alpha"], _AUX["warmup"]))


def _augconf_grad(s: Tensor, pw: Tensor, yw: Tensor, progress: float) -> Tensor:
    return _self_mix_grad(s, pw, _ramp(progress, _AUG["beta"], _AUG["ramp"]))


def _adaptconf_grad(s: Tensor, pw: Tensor, yw: Tensor, progress: float) -> Tensor:
    # CE(s, argmax s) - CE(s, argmax w) = s[argmax w] - max s: the log-partition cancels.
    top = s.amax(dim=1, keepdim=True)
    a = (s.gather(1, yw[:, None]) - top).div_(_ADAPT["tau"]).sigmoid_()
    g = torch.softmax(s, dim=1)  # before the target, which may overwrite s
    return g.sub_(_lerp_to_argmax(pw, s, top, a))


def _soft_kernel(progress: float) -> tuple[int, float, float]:
    return SOFT, 0.0, 1.0


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
}


# Keyed by the function, not the name: a loss registered with other constants (a `functools.partial`)
# has no entry and trains through autograd, as do the class-balanced losses.
LOGIT_GRADS: dict[Loss, LogitGrad] = {
    soft: LogitGrad(_soft_grad, probs=True, top=False, kernel=_soft_kernel),
    hard: LogitGrad(_hard_grad, probs=False, top=True, kernel=lambda p: (HARD, 0.0, 1.0)),
    # At T = 1, KL(pw || ps) and CE(s, pw) differ by the entropy of pw, a constant in s.
    kd: LogitGrad(_soft_grad, probs=True, top=False, kernel=_soft_kernel),
    auxconf_argmax: LogitGrad(
        _auxconf_grad,
        probs=True,
        top=False,
        kernel=lambda p: (SELF_MIX, _ramp(p, _AUX["alpha"], _AUX["warmup"]), 1.0),
    ),
    augconf_argmax: LogitGrad(
        _augconf_grad,
        probs=True,
        top=False,
        kernel=lambda p: (SELF_MIX, _ramp(p, _AUG["beta"], _AUG["ramp"]), 1.0),
    ),
    adaptconf: LogitGrad(_adaptconf_grad, probs=True, top=True, kernel=lambda p: (ADAPT, 0.0, _ADAPT["tau"])),
}


def get_loss(name: str) -> Loss:
    """The loss registered as `name`, or a UserError listing the valid names."""
    from cpl_cache.errors import UserError

    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]
