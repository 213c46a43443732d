"""The CLIP paper's linear-probe protocol (Radford et al. 2021), as a reference for the AdamW-trained
ceiling (`ceiling-lp`): multinomial logistic regression fit to convergence by full-batch L-BFGS, its L2
strength chosen on a labelled hold split by accuracy, then scored once on test.

Objective, for features x (N, D) (L2-normalised, as cached) and labels y (N,):

    mean_i CE(W x_i + b, y_i) + (lam / 2) * ||W||_F^2        (the bias is not penalised)

Precision: the arithmetic runs in the features' dtype, at least float32; only the loss is summed in
float64. Caches hold float32, so float64 would add no information to the inputs, and it makes the two
matmuls that dominate an evaluation about twice as slow on the CPU. What float32 loses is the last digits
of the optimum (the gradient bottoms out near 1e-6 rather than 1e-12), which a hold accuracy hardly
sees. Pass float64 features where the optimum itself is wanted to high precision (the tests do).

Speed: the features are centred before fitting. With the bias free this is an exact change of variables
(W x + b = W (x - mu) + (b + W mu), the penalty unchanged) and it removes the large common component of
CLIP embeddings, which otherwise couples the weights with the bias in the curvature L-BFGS must learn.
A cold start is W = 0 with b = log class frequencies, the exact optimum of the bias there. The gradient
is written out (softmax minus one-hot), not taken by autograd, so an evaluation is two matmuls and one
softmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# 1e-1 .. 1e-6, two values a decade (11 in all)
DEFAULT_LAMS: tuple[float, ...] = tuple(10.0 ** (-1 - i / 2) for i in range(11))
HISTORY = 20  # L-BFGS curvature pairs kept
# An iteration that changes the objective by less than STALL * eps(dtype) ends the fit: that is about
# the precision of a float32 objective (N roundings of eps * |logit|, averaged), so such a step is
# noise; in float64 it practically never triggers.
STALL = 1e-2
# The probe's gradient tolerance. On a planted 120000 x 64 x 10 cache, float32 fits to 1e-5 gave the
# same hold accuracy as float64 fits to 1e-7 at each decade from 1e-1 to 1e-6, with less than half the
# evaluations; 1e-7 is below what float32 features reach.
PROBE_TOL = 1e-5


@dataclass(frozen=True)
class LogRegResult:
    """The chosen L2 strength, its hold and test accuracies, every hold accuracy, and its weights."""

    lam: float  # chosen L2 strength
    hold_acc: float
    test_acc: float
    scores: dict[float, float]  # hold accuracy per lam
    weight: Tensor  # (K, D)
    bias: Tensor  # (K,)


def _check(x: Tensor, y: Tensor, num_classes: int, what: str) -> None:
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(
            f"{what}: expected features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) == 0:
        raise ValueError(f"{what}: no rows")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be integers, got {y.dtype}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")


def fit_logreg(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    lam: float,
    *,
    init: tuple[Tensor, Tensor] | None = None,
    max_iter: int = 500,
    tol: float = 1e-7,
) -> tuple[Tensor, Tensor]:
    """Minimise mean cross-entropy + (lam/2)*||W||^2 by full-batch L-BFGS (strong Wolfe line search).

    x: (N, D) features; y: (N,) integer labels in [0, num_classes). init: a (weight (K, D), bias (K,))
    to start from (warm start), else W = 0 and b = log class frequencies. Stops when the largest
    gradient entry is <= tol, when the line search makes no more progress, or after max_iter iterations
    (at most 1.25 * max_iter objective evaluations), so it also ends on separable data with lam = 0.
    With float32 features the gradient bottoms out near 1e-6, so a smaller tol there ends on the line
    search instead.

    Returns (weight (K, D), bias (K,)) in the working dtype. The bias is shifted to sum to zero over the
    classes seen (the softmax ignores a common shift and the penalty does not fix one). A class with no
    training row has no minimiser (its bias keeps falling): its row is zero and its bias -inf, the
    limit the objective tends to.
    """
    _check(x, y, num_classes, "fit_logreg")
    if not lam >= 0.0 or lam == float("inf"):
        raise ValueError(f"fit_logreg: lam must be finite and >= 0, got {lam}")
    if max_iter < 1:
        raise ValueError(f"fit_logreg: max_iter must be >= 1, got {max_iter}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    n, d = x.shape
    y = y.to(device=x.device, dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes)
    seen = counts > 0
    classes = seen.nonzero().squeeze(1)
    k = len(classes)
    if k < num_classes:  # fit the classes seen; relabel y to 0..k-1
        y = torch.cumsum(seen, 0).sub_(1)[y]
    xc = x.to(dtype)
    mu = xc.mean(dim=0)
    xc = xc - mu

    theta = torch.zeros(k * d + k, dtype=dtype, device=x.device)
    weight, bias = theta[: k * d].view(k, d), theta[k * d :]
    if init is not None:
        w0, b0 = (t.detach().to(device=x.device, dtype=dtype) for t in init)
        if w0.shape != (num_classes, d) or b0.shape != (num_classes,):
            raise ValueError(f"fit_logreg: init must be shaped ({num_classes}, {d}) and ({num_classes},)")
        w0, b0 = w0[classes], b0[classes]
        weight.copy_(w0)
        bias.copy_(torch.where(b0.isfinite(), b0, 0.0) + w0 @ mu)  # the same logits on centred features
    else:
        bias.copy_(counts[classes].to(dtype).log())

    y_col = y[:, None]
    minus_one = torch.full((n, 1), -1.0 / n, dtype=dtype, device=x.device)
    logits = torch.empty(n, k, dtype=dtype, device=x.device)
    grad = torch.empty_like(theta)
    grad_w, grad_b = grad[: k * d].view(k, d), grad[k * d :]

    def closure() -> Tensor:
        # softmax - onehot, scaled by 1/N, is the gradient of the mean cross-entropy in the logits. The
        # loss is summed in float64: in float32 its rounding hides the last steps from the line search.
        with torch.no_grad():
            z = torch.addmm(bias, xc, weight.T, out=logits)
            z.sub_(z.amax(dim=1, keepdim=True))
            z_true = z.gather(1, y_col).sum(dtype=torch.float64)
            z.exp_()
            total = z.sum(dim=1, keepdim=True)
            log_total = total.log().sum(dtype=torch.float64)
            loss = (log_total - z_true) / n + 0.5 * lam * weight.pow(2).sum(dtype=torch.float64)
            z.div_(total.mul_(n)).scatter_add_(1, y_col, minus_one)
            torch.addmm(weight, z.T, xc, beta=lam, out=grad_w)
            torch.sum(z, dim=0, out=grad_b)
            theta.grad = grad
        return loss

    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=STALL * torch.finfo(dtype).eps,
        history_size=HISTORY,
        line_search_fn="strong_wolfe",
    )
    opt.step(closure)
    bias = bias - weight @ mu
    bias -= bias.mean()
    if k == num_classes:
        return weight.clone(), bias
    full_w = torch.zeros(num_classes, d, dtype=dtype, device=x.device)
    full_b = torch.full((num_classes,), float("-inf"), dtype=dtype, device=x.device)
    full_w[classes], full_b[classes] = weight, bias
    return full_w, full_b


def _correct(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor) -> int:
    logits = torch.addmm(bias, x.to(weight.dtype), weight.T)
    return int((logits.argmax(dim=1) == y.to(logits.device)).sum())


def _extrapolate(path: list[tuple[float, Tensor, Tensor]], lam: float) -> tuple[Tensor, Tensor] | None:
    """A warm start for `lam`: the last solution, moved on along the line through the last two in log(lam).

    The solution path is smooth in log(lam); on the planted benchmarks this took 15-30% fewer evaluations
    than starting from the last solution."""
    if not path:
        return None
    _, weight, bias = path[-1]
    if len(path) < 2 or lam <= 0.0 or path[0][0] <= 0.0:
        return weight, bias
    (lam0, w0, b0), (lam1, _, _) = path
    step = math.log(lam / lam1) / math.log(lam1 / lam0)
    bias = torch.where(bias.isfinite() & b0.isfinite(), bias + step * (bias - b0), bias)
    return weight + step * (weight - w0), bias


def logreg_probe(
    x_train: Tensor,
    y_train: Tensor,
    x_hold: Tensor,
    y_hold: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    lams: Sequence[float] = DEFAULT_LAMS,
    *,
    max_iter: int = 500,
    tol: float = PROBE_TOL,
) -> LogRegResult:
    """Fit `fit_logreg` on train for each lam, from the strongest to the weakest, each warm-started from
    the previous solutions (`_extrapolate`); keep the lam with the highest hold accuracy (ties go to the
    stronger regularisation) and score that model once on test. Only the hold labels steer the choice.
    `tol` defaults to PROBE_TOL rather than fit_logreg's 1e-7 (see PROBE_TOL)."""
    _check(x_train, y_train, num_classes, "logreg_probe (train)")
    _check(x_hold, y_hold, num_classes, "logreg_probe (hold)")
    _check(x_test, y_test, num_classes, "logreg_probe (test)")
    grid = sorted({float(lam) for lam in lams}, reverse=True)
    if not grid:
        raise ValueError("logreg_probe: no lams to choose from")
    scores: dict[float, float] = {}
    best: tuple[int, float, Tensor, Tensor] | None = None
    path: list[tuple[float, Tensor, Tensor]] = []  # (lam, weight, bias) of the last two fits
    for lam in grid:
        init = _extrapolate(path, lam)
        weight, bias = fit_logreg(x_train, y_train, num_classes, lam, init=init, max_iter=max_iter, tol=tol)
        path = [*path[-1:], (lam, weight, bias)]
        correct = _correct(weight, bias, x_hold, y_hold)
        scores[lam] = correct / len(y_hold)
        if best is None or correct > best[0]:  # strictly better: a tie keeps the stronger lam
            best = (correct, lam, weight, bias)
    assert best is not None
    correct, lam, weight, bias = best
    return LogRegResult(
        lam=lam,
        hold_acc=correct / len(y_hold),
        test_acc=_correct(weight, bias, x_test, y_test) / len(y_test),
        scores=scores,
        weight=weight,
        bias=bias,
    )
