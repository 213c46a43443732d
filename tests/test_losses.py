"""Every registered loss against a plain float64 implementation of its formula (PAPER.md), values and
gradients, on random logits and at several points of training progress."""

from __future__ import annotations

import pytest
import torch

from cpl_cache.errors import UserError
from cpl_cache.train.losses import LOSSES, get_loss, kd


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def onehot(y: torch.Tensor, k: int) -> torch.Tensor:
    return (torch.arange(k)[None, :] == y[:, None]).double()


def ce_rows(s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of s against a distribution target."""
    return -(target * torch.log(softmax(s))).sum(dim=1)


def kd_rows(s: torch.Tensor, w: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    pw, ps = softmax(w / T), softmax(s / T)
    return T * T * (pw * (torch.log(pw) - torch.log(ps))).sum(dim=1)


def ref_soft(s, w, t):
    return ce_rows(s, softmax(w)).mean()


def ref_hard(s, w, t):
    return ce_rows(s, onehot(w.argmax(1), w.shape[1])).mean()


def ref_kd(s, w, t):
    return kd_rows(s, w).mean()


def ref_auxconf(s, w, t):
    coef = 0.5 * min(1.0, t / 0.1)
    target = (1 - coef) * softmax(w) + coef * onehot(s.detach().argmax(1), s.shape[1])
    return ce_rows(s, target).mean()


def ref_augconf(s, w, t):
    a = 0.5 * min(1.0, t / 0.3)
    return (1 - a) * kd_rows(s, w).mean() + a * ce_rows(s, onehot(s.detach().argmax(1), s.shape[1])).mean()


def ref_adaptconf(s, w, t):
    k = s.shape[1]
    ce_s = ce_rows(s, onehot(s.detach().argmax(1), k))
    ce_w = ce_rows(s, onehot(w.argmax(1), k))
    u, v = torch.exp(ce_s / 0.5), torch.exp(ce_w / 0.5)
    a = (u / (u + v)).detach()
    return ((1 - a) * kd_rows(s, w) + a * ce_s).mean()


REFERENCE = {
    "soft": ref_soft,
    "hard": ref_hard,
    "kd": ref_kd,
    "auxconf-argmax": ref_auxconf,
    "augconf-argmax": ref_augconf,
    "adaptconf-argmax": ref_adaptconf,
}


def value_and_grad(fn, s, w, t):
    s = s.clone().requires_grad_(True)
    value = fn(s, w, t)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


@pytest.mark.parametrize("progress", [0.0, 0.04, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_loss_matches_plain_formula(name: str, progress: float):
    g = torch.Generator().manual_seed(1000 * sorted(REFERENCE).index(name) + round(100 * progress))
    s = 3 * torch.randn(12, 9, generator=g, dtype=torch.float64)
    w = 3 * torch.randn(12, 9, generator=g, dtype=torch.float64)
    v, gr = value_and_grad(LOSSES[name], s, w, progress)
    rv, rgr = value_and_grad(REFERENCE[name], s, w, progress)
    assert v.ndim == 0
    torch.testing.assert_close(v, rv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gr, rgr, rtol=1e-9, atol=1e-12)
    # The trainer runs in float32: same answer to float32 precision.
    v32, gr32 = value_and_grad(LOSSES[name], s.float(), w.float(), progress)
    torch.testing.assert_close(v32.double(), rv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gr32.double(), rgr, rtol=1e-4, atol=1e-6)


def test_kd_temperature_and_soft_kd_share_gradients():
    g = torch.Generator().manual_seed(1)
    s, w = (
        torch.randn(8, 5, generator=g, dtype=torch.float64),
        torch.randn(8, 5, generator=g, dtype=torch.float64),
    )
    v, gr = value_and_grad(lambda a, b, t: kd(a, b, t, T=2.0), s, w, 0.0)
    rv, rgr = value_and_grad(lambda a, b, t: kd_rows(a, b, T=2.0).mean(), s, w, 0.0)
    torch.testing.assert_close(v, rv)
    torch.testing.assert_close(gr, rgr)
    # At T = 1, KL and cross-entropy to softmax(w) differ by the entropy of softmax(w): same gradients.
    _, g_soft = value_and_grad(LOSSES["soft"], s, w, 0.0)
    _, g_kd = value_and_grad(LOSSES["kd"], s, w, 0.0)
    torch.testing.assert_close(g_soft, g_kd)


def test_adaptconf_is_finite_where_the_plain_exponentials_overflow():
    s = torch.tensor([[400.0, 0.0, -400.0]])
    w = torch.tensor([[-400.0, 0.0, 400.0]])
    for name in ("adaptconf", "adaptconf-argmax"):
        v, gr = value_and_grad(LOSSES[name], s, w, 0.5)
        assert torch.isfinite(v) and torch.isfinite(gr).all()


def test_unknown_loss_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        get_loss("focal")
    assert "focal" in str(err.value)
    for name in LOSSES:
        assert name in str(err.value)
