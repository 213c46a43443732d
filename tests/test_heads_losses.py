"""Every registered head with every registered loss (as DomainBed tests every algorithm): one step of the
trainer's `fit` moves the head's parameters by AdamW's first step on the gradient of the loss, computed
here through the plain float64 forward, and a head trained beside others in a stack steps the same."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_heads import prompt_spec, spec

from cpl_cache.train.heads import HEADS, get_head
from cpl_cache.train.losses import LOSSES
from cpl_cache.train.trainer import fit

LR, WD, EPS = 0.01, 0.1, 1e-8
PROGRESS_AT = 0.0  # fit's first step is at progress 0


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory):
    """A tiny saved CLIP text tower for the prompt head, made once."""
    return prompt_spec(tmp_path_factory.mktemp("tower"), k=6, d=16)


def build(name: str, tower) -> torch.nn.Module:
    s = tower if name == "prompt" else spec(k=6, d=16)
    return get_head(name)(s, torch.Generator().manual_seed(0)).double()


def data(n: int = 20, d: int = 16, k: int = 6):
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    w = 3 * torch.randn(n, k, generator=g, dtype=torch.float64)
    return x, w


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_one_step_is_adamws_first_step_on_the_losss_gradient(head_name: str, loss: str, tower):
    head = build(head_name, tower)
    x, w = data()
    params = [p for p in head.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    value = LOSSES[loss](head(x), w, PROGRESS_AT)
    grads = torch.autograd.grad(value, params)
    # AdamW's first step: m = (1 - b1) g, v = (1 - b2) g^2, bias-corrected to g and g^2.
    want = [p0 * (1 - LR * WD) - LR * g / (g.abs() + EPS) for p0, g in zip(start, grads, strict=True)]
    fit([head], [LOSSES[loss]], [w], x, [{"lr": LR, "weight_decay": WD}], 1, len(x), torch.Generator())
    for p, expect, p0 in zip(params, want, start, strict=True):
        assert not torch.equal(p.detach(), p0)
        torch.testing.assert_close(p.detach(), expect, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_a_head_in_a_stack_steps_as_it_does_alone(head_name: str, loss: str, tower):
    x, w = data()
    alone = build(head_name, tower)
    fit(
        [alone],
        [LOSSES[loss]],
        [w],
        x,
        [{"lr": LR, "weight_decay": WD}],
        5,
        8,
        torch.Generator().manual_seed(1),
    )
    stacked = build(head_name, tower)
    other = build("linear", tower)
    truth = torch.full_like(w, -1e4).scatter_(1, w.argmin(dim=1, keepdim=True), 0.0)
    fit(
        [other, stacked], [LOSSES["hard"], LOSSES[loss]], [truth, w], x,
        [{"lr": 0.5, "weight_decay": 0.0}, {"lr": LR, "weight_decay": WD}], 5, 8,
        torch.Generator().manual_seed(1),
    )  # fmt: skip
    for a, b in zip(alone.parameters(), stacked.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_schedule_is_a_cosine_to_zero():
    from cpl_cache.train.trainer import cosine

    f = cosine(10)
    assert [f(0), f(5), f(10)] == [1.0, pytest.approx(0.5), pytest.approx(0.0, abs=1e-12)]
    assert f(3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
