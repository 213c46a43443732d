"""Heads: the proto head is kappa * cosine to its prototypes and starts as the zero-shot classifier;
the linear head is W x + b; both are reproducible from a seeded generator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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


def test_proto_head_gradient_is_that_of_the_plain_cosine_formula():
    """The head's gradient against autograd through kappa * x @ normalize(C).T, in float64."""
    head = get_head("proto")(spec(k=7, d=12, seed=3), None).double()
    with torch.no_grad():
        head.prototypes.mul_(torch.rand(7, 1, dtype=torch.float64) * 3 + 0.1)  # rows of unequal norm
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(10, 12, generator=g, dtype=torch.float64), dim=1)
    upstream = torch.randn(10, 7, generator=g, dtype=torch.float64)
    c = head.prototypes.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(100.0 * x @ F.normalize(c, dim=1).T, c, upstream)
    (got,) = torch.autograd.grad(head(x), head.prototypes, upstream)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(head, (x.requires_grad_(True),))


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


def prompt_spec(root: Path, k: int = 6, d: int = 16) -> HeadSpec:
    """A spec with a tiny saved text tower and hand-made token ids: [SOS] 5 6 7 (the phrase) class "." EOS
    pad; its text embeddings are the tower's own features of those prompts (the zero-shot classifier)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sos, eos = 0, 1
    config = CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=d,
                            bos_token_id=sos, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    torch.manual_seed(0)
    tower = CLIPTextModelWithProjection(config).eval()
    tower.save_pretrained(root)
    ids = torch.tensor(
        [[sos, 5, 6, 7, *([10 + c] * (1 + c % 2)), 2, eos] + [eos] * (1 - c % 2) for c in range(k)]
    )
    with torch.no_grad():
        text = F.normalize(tower(input_ids=ids).text_embeds, dim=1)
    return HeadSpec(dim=d, num_classes=k, text_embeds=text, logit_scale=100.0, strong_id=str(root),
                    token_ids=ids, prefix_len=3)  # fmt: skip


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_maps_embeddings_to_class_logits(name: str, tmp_path: Path):
    s = prompt_spec(tmp_path, k=7, d=12) if name == "prompt" else spec(k=7, d=12)
    head = get_head(name)(s, torch.Generator().manual_seed(0))
    assert head(torch.randn(3, 12)).shape == (3, 7)


def test_prompt_head_starts_at_zero_shot_and_trains_its_context_alone(tmp_path: Path):
    s = prompt_spec(tmp_path)
    head = get_head("prompt")(s, None)
    x = F.normalize(torch.randn(9, s.dim), dim=1)
    torch.testing.assert_close(head(x), 100.0 * x @ s.text_embeds.T, rtol=0, atol=1e-4)
    assert [n for n, _ in head.named_parameters()] == ["ctx"] and head.ctx.shape == (3, 16)
    head(x)[:, 2].sum().backward()
    assert head.ctx.grad is not None and head.ctx.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in head.text_tower.parameters())


def test_prompt_head_without_a_text_tower_says_what_to_do(tmp_path: Path):
    with pytest.raises(UserError, match="planted cache.*--head proto or linear"):
        get_head("prompt")(spec(), None)
    with pytest.raises(UserError, match="token ids"):
        get_head("prompt")(dataclasses.replace(prompt_spec(tmp_path), token_ids=None), None)


def test_unknown_head_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        get_head("mlp")
    assert all(name in str(err.value) for name in HEADS)
