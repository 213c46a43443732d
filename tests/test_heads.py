"""Heads: the proto head is kappa * cosine to its prototypes and starts as the zero-shot classifier;
the linear head is W x + b; both are reproducible from a seeded generator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpl_cache.errors import UserError
from cpl_cache.train.heads import HEADS, HeadSpec, get_head


def spec(k: int = 6, d: int = 16, seed: int = 0) -> HeadSpec:
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return HeadSpec(dim=d, num_classes=k, text_embeds=text, logit_scale=100.0)


def test_proto_head_is_scaled_cosine_and_starts_at_zero_shot():
    s = spec()
    head = get_head("proto")(s, None)
    x = F.normalize(torch.randn(9, s.dim), dim=1)
    expected = 100.0 * x @ s.text_embeds.T
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-4)
    assert [n for n, _ in head.named_parameters()] == ["prototypes"]
    # Scaling a prototype changes nothing: the logits see directions only.
    with torch.no_grad():
        head.prototypes[0] *= 7.0
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-4)


def test_proto_head_gradient_reaches_the_prototypes():
    head = get_head("proto")(spec(), None)
    x = F.normalize(torch.randn(4, 16), dim=1)
    head(x)[:, 2].sum().backward()
    assert head.prototypes.grad is not None
    assert head.prototypes.grad[2].abs().sum() > 0 and head.prototypes.grad[0].abs().sum() == 0


def test_proto_head_without_text_embeddings_says_what_to_do():
    with pytest.raises(UserError, match="--head linear"):
        get_head("proto")(HeadSpec(dim=4, num_classes=3), None)


def test_linear_head_is_affine_and_seeded():
    s = spec()
    a = get_head("linear")(s, torch.Generator().manual_seed(3))
    b = get_head("linear")(s, torch.Generator().manual_seed(3))
    c = get_head("linear")(s, torch.Generator().manual_seed(4))
    x = torch.randn(5, s.dim)
    torch.testing.assert_close(a(x), x @ a.weight.T + a.bias)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    bound = 1 / s.dim**0.5
    assert a.weight.abs().max() <= bound and a.weight.shape == (s.num_classes, s.dim)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_maps_embeddings_to_class_logits(name: str):
    s = spec(k=7, d=12)
    head = get_head(name)(s, torch.Generator().manual_seed(0))
    assert head(torch.randn(3, 12)).shape == (3, 7)


def test_unknown_head_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        get_head("mlp")
    assert all(name in str(err.value) for name in HEADS)
