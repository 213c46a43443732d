"""Weak-to-strong losses: `LOSSES[name](student_logits, weak_logits, progress) -> scalar`.

`student_logits` and `weak_logits` are (B, K); `progress` in [0, 1] is the fraction of training done
(the confidence losses ramp with it). Definitions and defaults are those of PAPER.md "Baselines";
keyword arguments expose the constants for ablations (e.g. `functools.partial(kd, T=2.0)`).

With its default constants, every loss here has the same gradient shape with respect to the student
logits: d loss / d s = (softmax(s) - target) / B, where the target mixes softmax(w), onehot(argmax w)
and onehot(argmax s), with weights that never carry gradient. `LOGIT_GRADS` holds that closed form for
each registered function, without the 1 / B (the trainer folds it into the head's backward matrix
product instead of spending a pass over (B, K) on it); the trainer steps with it instead of
differentiating the loss's ~10 elementwise passes through autograd, and tests hold each form to
autograd's gradient of the loss itself.
"""

from __future__ import annotations

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


def auxconf(
    s: Tensor, w: Tensor, progress: float = 0.0, *, alpha: float = 0.5, warmup: float = 0.1
) -> Tensor:
    """Auxiliary confidence loss (Burns et al. 2023), multi-class: CE to a mix of softmax(w) and the
    student's own (detached) hard prediction, whose weight ramps to `alpha` over the first `warmup`."""
    coef = _ramp(progress, alpha, warmup)
    log_ps = F.log_softmax(s, dim=1)
    own = F.one_hot(s.detach().argmax(dim=1), s.shape[1]).to(s.dtype)
    target = (1.0 - coef) * F.softmax(w, dim=1) + coef * own
    return -(target * log_ps).sum(dim=1).mean()


def augconf(
    s: Tensor, w: Tensor, progress: float = 0.0, *, beta: float = 0.5, ramp: float = 0.3, T: float = 1.0
) -> Tensor:
    """Augmented confidence loss (Guo et al. 2024): (1 - a) kd + a CE(s, argmax s), a ramping to `beta`."""
    a = _ramp(progress, beta, ramp)
    self_ce = F.cross_entropy(s, s.detach().argmax(dim=1))
    return (1.0 - a) * _kd_per_sample(s, w, T).mean() + a * self_ce


def adaptconf(s: Tensor, w: Tensor, progress: float = 0.0, *, tau: float = 0.5, T: float = 1.0) -> Tensor:
    """Adaptive confidence loss (Guo et al. 2024): per row, a = u / (u + v) with
    u = exp(CE(s, argmax s) / tau) and v = exp(CE(s, argmax w) / tau), detached;
    the loss is mean((1 - a) kd + a CE(s, argmax s)).

    u / (u + v) is computed as sigmoid((CE_s - CE_w) / tau), equal and free of overflow.
    """
    log_ps = F.log_softmax(s, dim=1)
    ce_self = -log_ps.gather(1, s.detach().argmax(dim=1, keepdim=True)).squeeze(1)
    ce_weak = -log_ps.gather(1, w.argmax(dim=1, keepdim=True)).squeeze(1)
    a = torch.sigmoid((ce_self - ce_weak).detach() / tau)
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
_AUX, _AUG, _ADAPT = auxconf.__kwdefaults__, augconf.__kwdefaults__, adaptconf.__kwdefaults__


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
}


# Keyed by the function, not the name: a loss registered with other constants (a `functools.partial`)
# has no entry and trains through autograd.
LOGIT_GRADS: dict[Loss, LogitGrad] = {
    soft: LogitGrad(_soft_grad, probs=True, top=False, kernel=_soft_kernel),
    hard: LogitGrad(_hard_grad, probs=False, top=True, kernel=lambda p: (HARD, 0.0, 1.0)),
    # At T = 1, KL(pw || ps) and CE(s, pw) differ by the entropy of pw, a constant in s.
    kd: LogitGrad(_soft_grad, probs=True, top=False, kernel=_soft_kernel),
    auxconf: LogitGrad(
        _auxconf_grad,
        probs=True,
        top=False,
        kernel=lambda p: (SELF_MIX, _ramp(p, _AUX["alpha"], _AUX["warmup"]), 1.0),
    ),
    augconf: LogitGrad(
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
