"""Heads trained on cached image embeddings: `HEADS[name](domain, generator) -> nn.Module`.

`domain` is a `CachedDomain` (or a `HeadSpec`: anything with `dim`, `num_classes`, `text_embeds` and
`logit_scale`; the prompt head also reads the CLIP checkpoint, `token_ids` and `prefix_len`). Every
head maps L2-normalised float32 embeddings (B, D) to logits (B, K); the trainer normalises the cached
embeddings once, so a head never re-normalises its input.

The proto and linear heads also have `closed_form(x) -> (logits, backward)`: the logits without
autograd, and `backward(g, alpha=1)`, the gradients of the head's parameters (in `parameters()` order)
given alpha * g = d loss / d logits (alpha rides on a matrix product: free, where scaling g costs a pass
over (B, K)). With a loss's closed-form gradient (`losses.LOGIT_GRADS`) the trainer steps through it and
never builds an autograd graph; tests hold both to autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpl_cache.train import cpu_kernel


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


# What `closed_form` returns beside the logits: (g, alpha) -> the parameters' gradients for d loss / d
# logits = alpha * g.
Backward = Callable[..., tuple[Tensor, ...]]


def _scaled_rows(p: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """w = scale * p / ||p|| per row, and the per-row factor f = scale / ||p|| (K, 1)."""
    if cpu_kernel.takes(p):  # one pass instead of four (0.38 ms a step at K = 345, D = 512 on 2 cores)
        return cpu_kernel.scaled_rows(p, scale)
    f = scale / torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp_min(1e-12)
    return p * f, f


def _scaled_rows_backward(
    w: Tensor, f: Tensor, scale: float, g: Tensor, alpha: float = 1.0, *, overwrite: bool = False
) -> Tensor:
    """d(s u)/dp applied to alpha * g, with u = p / ||p|| = w / s:  alpha (s / ||p||) (g - u (u . g)).
    With `overwrite` it may be written over g."""
    if overwrite and cpu_kernel.takes(w, f, g):  # one pass instead of three (0.69 ms a step, as above)
        return cpu_kernel.scaled_rows_backward_(w, f, scale, g, alpha)
    along = torch.linalg.vecdot(w, g, dim=1)[:, None] / (scale * scale)
    return torch.addcmul(g, w, along, value=-1.0).mul_(f if alpha == 1.0 else f * alpha)


class _ScaledRowNormalize(torch.autograd.Function):
    """scale * p / ||p|| per row, with its backward in closed form: five ops over (K, D) where autograd
    through `F.normalize` and a multiply runs about a dozen (at K = 345, D = 512 on a 2-core CPU,
    0.7 ms instead of 1.5-2 ms per step, next to 5.4 ms of matrix products)."""

    @staticmethod
    def forward(ctx: Any, p: Tensor, scale: float) -> Tensor:
        w, f = _scaled_rows(p, scale)
        ctx.save_for_backward(w, f)
        ctx.scale = scale
        return w

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        w, f = ctx.saved_tensors
        return _scaled_rows_backward(w, f, ctx.scale, g), None


class ProtoHead(nn.Module):
    """Cosine prototypes (CPL): logits = kappa * cos(x, C_k), C initialised from the text embeddings.

    Only C is trained; it is normalised on every forward (K x D, cheap), the input never is.
    """

    def __init__(self, prototypes: Tensor, scale: float) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(F.normalize(prototypes.detach().float().clone(), dim=1))
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _ScaledRowNormalize.apply(self.prototypes, self.scale))

    @torch.no_grad()
    def closed_form(self, x: Tensor) -> tuple[Tensor, Backward]:
        """The logits, without autograd, and the map from d loss / d logits to the prototypes' gradient."""
        w, f = _scaled_rows(self.prototypes, self.scale)
        return x @ w.T, lambda g, alpha=1.0: (
            _scaled_rows_backward(w, f, self.scale, g.T @ x, alpha, overwrite=True),
        )


class LinearHead(nn.Module):
    """A linear probe, logits = W x + b, initialised as `nn.Linear` does but from a given generator."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound, generator=generator))
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def closed_form(self, x: Tensor) -> tuple[Tensor, Backward]:
        """The logits, without autograd, and the map from d loss / d logits to (d weight, d bias)."""

        def backward(g: Tensor, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
            # The bias's sum first, while g is still in cache: after the product it costs twice as much
            # (0.33 against 0.17 ms at B = 1024, K = 345 on 2 cores). beta = 0: addmm reads the weight only
            # for its shape, and applies alpha inside the product.
            d_bias = g.sum(dim=0).mul_(alpha)
            return torch.addmm(self.weight, g.T, x, beta=0, alpha=alpha), d_bias

        return torch.addmm(self.bias, x, self.weight.T), backward


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
