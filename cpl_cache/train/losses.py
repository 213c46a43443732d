"""Weak-to-strong losses: `LOSSES[name](student_logits, weak_logits, progress) -> scalar`.

`student_logits` and `weak_logits` are (B, K); `progress` in [0, 1] is the fraction of training done
(the confidence losses ramp with it). Definitions and defaults are those of PAPER.md "Baselines".
A loss's keyword-only arguments are its constants, which the method registry declares and a run may
override (`cpl-cache train --set tau=4`). Autograd differentiates them; adding a loss is one function
and one line in `LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

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


LOSSES: dict[str, Loss] = {
    "soft": soft,
    "hard": hard,
    "kd": kd,
    "auxconf": auxconf,
    "augconf": augconf,
    "adaptconf": adaptconf,
}


def get_loss(name: str) -> Loss:
    """The loss registered as `name`, or a UserError listing the valid names."""
    from cpl_cache.errors import UserError

    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]
