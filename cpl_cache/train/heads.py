"""Heads trained on cached image embeddings: `HEADS[name](domain, generator) -> nn.Module`.

`domain` is a `CachedDomain` (or a `HeadSpec`: anything with `dim`, `num_classes`, `text_embeds` and
`logit_scale`; the prompt head also reads the CLIP checkpoint, `token_ids` and `prefix_len`). Every
head maps L2-normalised float32 embeddings (B, D) to logits (B, K); the trainer normalises the cached
embeddings once, so a head never re-normalises its input.

A head is one `nn.Module` and one builder in `HEADS`; autograd and `torch.optim` train it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class HeadSpec:
    """What a head is built from (the fields of a `CachedDomain` it reads), for use without a cache."""

    dim: int
    num_classes: int
    text_embeds: Tensor | None = None  # (K, D) float32
    logit_scale: float | None = None  # the multiplier kappa applied to cosine similarities
    # What the prompt head reads: the CLIP checkpoint (id or path) whose text tower it runs, the class
    # prompts' token ids (K, L) and the context phrase's length in tokens (see `cpl_cache.train.prompt`).
    strong_id: str | None = None
    token_ids: Tensor | None = None
    prefix_len: int | None = None


class ProtoHead(nn.Module):
    """Cosine prototypes (CPL): logits = kappa * cos(x, C_k), C initialised from the text embeddings.

    Only C is trained; it is normalised on every forward (K x D, cheap), the input never is.
    """

    def __init__(self, prototypes: Tensor, scale: float) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(F.normalize(prototypes.detach().float().clone(), dim=1))
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.scale * F.normalize(self.prototypes, dim=1))


class LinearHead(nn.Module):
    """A linear probe, logits = W x + b, initialised as `nn.Linear` does but from a given generator."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound, generator=generator))
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def proto_head(spec: Any, generator: torch.Generator | None = None) -> ProtoHead:
    from cpl_cache.errors import UserError

    if spec.text_embeds is None or spec.logit_scale is None:
        raise UserError(
            "the proto head starts from the class text embeddings, but this cache has no text.h5; "
            "re-extract the domain, or pass --head linear"
        )
    return ProtoHead(spec.text_embeds, spec.logit_scale)


def linear_head(spec: Any, generator: torch.Generator | None = None) -> LinearHead:
    return LinearHead(spec.dim, spec.num_classes, generator)


PROMPT_INIT = "phrase"  # context vectors start as "a photo of a": the untrained head is the zero-shot one


def prompt_head(
    spec: Any, generator: torch.Generator | None = None, *, init: str = PROMPT_INIT, n_ctx: int = 16
) -> nn.Module:
    """CoOp (TP): context vectors before each class name, through the frozen text tower of the cache's CLIP.

    Built on the CPU; the trainer's `.to(device)` moves the text tower with the head. `init` and `n_ctx`
    (the context length of `init="random"`; the phrase init has one vector per phrase token) are for
    experiments: the registered methods use the defaults.
    """
    from cpl_cache.errors import UserError
    from cpl_cache.train.prompt import make_prompt_head

    manifest = getattr(spec, "manifest", None)
    strong_id = manifest.get("strong", {}).get("id") if manifest is not None else spec.strong_id
    if strong_id is None or strong_id == "planted":
        raise UserError(
            "the prompt head runs the text encoder of the CLIP the cache was extracted with, and this "
            "cache names none (a planted cache has none); extract the domain from images, or pick a "
            "method of another head (e.g. auxconf-lp, cpl) or pass --head proto or linear"
        )
    return make_prompt_head(
        str(strong_id),
        getattr(spec, "token_ids", None),
        spec.logit_scale,
        prefix_len=getattr(spec, "prefix_len", None),
        n_ctx=n_ctx,
        init=init,
        generator=generator,
    )


# The heads that start from the class text embeddings (text.h5): a cache without them cannot build these.
TEXT_HEADS = ("proto", "prompt")

HEADS: dict[str, Callable[[Any, torch.Generator | None], nn.Module]] = {
    "proto": proto_head,
    "linear": linear_head,
    "prompt": prompt_head,
}


def get_head(name: str) -> Callable[[Any, torch.Generator | None], nn.Module]:
    """The head builder registered as `name`, or a UserError listing the valid names."""
    from cpl_cache.errors import UserError

    if name not in HEADS:
        raise UserError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[name]
