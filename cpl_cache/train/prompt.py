"""The text-prompt head (TP, CoOp): learnable context vectors fed through the frozen CLIP text encoder.

The baseline CPL avoids. Each class prompt "[SOS] ctx_1 ... ctx_M {class name} . [EOS]" is encoded by
the frozen text tower, all K classes together in one batch per step, and the logits are the logit
scale times the cosine between image and text features. Only the M context vectors are trained.

    head = prompt_head(load_domain(cache_dir, "quickdraw"))   # cpl_cache.train.heads; ctx = "a photo of a"
    logits = head(image_embeds)                                # (B, K)

With `init="phrase"` the context vectors are the token embeddings of "a photo of a", so the untrained
head reproduces the cache's zero-shot prompts exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpl_cache.errors import UserError

TEMPLATE = "a photo of a {}."
INITS = ("phrase", "random")
RANDOM_STD = 0.02  # CoOp's generic-context initialisation, N(0, 0.02^2)
LEGACY_EOS_ID = 2  # configs from before transformers PR #24773 say 2; pooling then takes the argmax id


def context_phrase(template: str = TEMPLATE) -> str:
    """The words before the class name, which the context vectors replace ("a photo of a")."""
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one {{}} for the class name, got {template!r}")
    return template.split("{}")[0].strip()


def phrase_prefix_len(tokenizer: Any, ids: np.ndarray | Tensor, template: str = TEMPLATE) -> int | None:
    """How many tokens the context phrase of `template` spans after the start token, when every row of
    `ids` (K, L) continues with exactly those tokens; None when some row does not (a template or
    tokenizer the context vectors cannot stand in for). `ids` may be a CPU tensor.
    """
    phrase = tokenizer(context_phrase(template), add_special_tokens=False)["input_ids"]
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] < 1 + len(phrase):
        return None
    return len(phrase) if (ids[:, 1 : 1 + len(phrase)] == np.asarray(phrase, dtype=ids.dtype)).all() else None


def prompt_token_ids(tokenizer: Any, classes: list[str], template: str = TEMPLATE) -> tuple[np.ndarray, int]:
    """Token ids (K, L) int64 of every class prompt, padded with CLIP's pad to the longest, and how
    many tokens the context phrase spans after the start token (`prefix_len`).

    Underscores in class folder names read as spaces. Raises ValueError when a prompt does not begin
    with the phrase's own tokens (a template the context vectors cannot stand in for).
    """
    phrase = context_phrase(template)
    prompts = [template.format(c.replace("_", " ")) for c in classes]
    enc = tokenizer(prompts, padding=True, truncation=True, return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    prefix_len = phrase_prefix_len(tokenizer, ids, template)
    if prefix_len is None:
        raise ValueError(f"prompts of {template!r} do not start with the tokens of {phrase!r}")
    return ids, prefix_len


def load_text_tower(strong_id: str, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen text half of a CLIP checkpoint (id or local path): eval mode, no gradients.

    Only the text weights are read; the projection width is the checkpoint's own (`projection_dim`
    of the full config), not the text config's default.
    """
    from transformers import AutoConfig, CLIPConfig, CLIPTextConfig, CLIPTextModelWithProjection

    from cpl_cache.runtime import quiet_transformers

    # errors_only: the vision weights of a full CLIP checkpoint are skipped on purpose
    try:
        with quiet_transformers(errors_only=True):
            config = AutoConfig.from_pretrained(strong_id)
            if isinstance(config, CLIPConfig):
                text_config = config.text_config
                text_config.projection_dim = config.projection_dim
            elif isinstance(config, CLIPTextConfig):
                text_config = config
            else:
                raise ValueError(f"it is a {type(config).__name__}, not a CLIP model")
            tower = CLIPTextModelWithProjection.from_pretrained(strong_id, config=text_config)
    except Exception as err:
        from cpl_cache.checkpoint import weights_error

        unreadable = weights_error("the CLIP checkpoint", strong_id, err, "use a sound checkpoint")
        if unreadable is not None:
            raise unreadable from None
        if not isinstance(err, (OSError, ValueError)):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"the prompt head needs the CLIP checkpoint the cache was extracted with ({strong_id!r}), "
            f"which could not be loaded ({reason[:160]}); run where it is on disk (or downloadable), "
            "or pick a head that needs no text encoder (--head proto or linear)"
        ) from None
    tower.requires_grad_(False)
    return tower.eval().to(device)


def eos_positions(token_ids: Tensor, eos_token_id: int) -> Tensor:
    """Where each row's EOS sits, by the rule CLIPTextModel pools with."""
    if eos_token_id == LEGACY_EOS_ID:
        return token_ids.argmax(dim=-1)
    is_eos = token_ids == eos_token_id
    if not bool(is_eos.any(dim=-1).all()):
        raise ValueError(f"some prompt has no EOS token (id {eos_token_id}); were the token ids truncated?")
    return is_eos.int().argmax(dim=-1)


class PromptHead(nn.Module):
    """CoOp: logits = scale * cos(x, text(ctx, class name)); the text tower is frozen, only `ctx` learns.

    The tower is held outside the module tree, so `parameters()` and `state_dict()` hold `ctx` alone
    (and the fixed token embeddings); `.to()` still moves it. Under `torch.no_grad` the class features
    are reused until `ctx` changes, so evaluation in chunks costs one text pass.

    `n_ctx` sets the number of context vectors of `init="random"`; `init="phrase"` takes one per token
    of the phrase (`prefix_len`) whatever `n_ctx` says. `self.n_ctx` is the number in use either way.
    """

    def __init__(
        self,
        text_tower: nn.Module,
        token_ids: Tensor | np.ndarray,
        prefix_len: int,
        logit_scale: float,
        n_ctx: int = 16,
        init: str = "phrase",
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise UserError(f"unknown prompt init {init!r}; choose one of: {', '.join(INITS)}")
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).cpu()
        if ids.ndim != 2 or ids.shape[1] < prefix_len + 2:
            raise ValueError(f"token ids of shape {tuple(ids.shape)} cannot hold a {prefix_len}-token phrase")
        object.__setattr__(self, "_tower", text_tower)  # frozen: not a submodule, so not a parameter
        text = text_tower.text_model
        config = text.config
        if eos_token_id is None:
            eos_token_id = config.eos_token_id
        n_ctx = prefix_len if init == "phrase" else int(n_ctx)
        if n_ctx < 1:
            raise UserError(f"the prompt head needs at least one context vector, got n_ctx={n_ctx}")

        # New layout per class: [SOS] [ctx x M] [class name . EOS] [pad], trimmed to the longest prompt.
        eos = eos_positions(ids, int(eos_token_id))
        suffix = ids[:, 1 + prefix_len : int(eos.max()) + 1]  # class-name tokens, ".", EOS, then pad
        length = 1 + n_ctx + suffix.shape[1]
        if length > config.max_position_embeddings:
            raise UserError(
                f"prompts of {length} tokens exceed the text encoder's {config.max_position_embeddings} "
                f"positions; use fewer context vectors than n_ctx={n_ctx}"
            )
        embed = text.embeddings.token_embedding
        with torch.no_grad():
            dev = embed.weight.device
            self.register_buffer("sos_embeds", embed(ids[:, :1].to(dev)).float().clone(), persistent=False)
            self.register_buffer("suffix_embeds", embed(suffix.to(dev)).float().clone(), persistent=False)
            if init == "phrase":
                ctx = embed(ids[0, 1 : 1 + prefix_len].to(dev)).float().clone()
            else:
                width = embed.weight.shape[1]
                ctx = torch.randn(n_ctx, width, generator=generator) * RANDOM_STD
        self.register_buffer(
            "eos_index", (eos - prefix_len + n_ctx).to(embed.weight.device), persistent=False
        )
        self.ctx = nn.Parameter(ctx.to(embed.weight.device))
        self.scale = float(logit_scale)
        self.n_ctx = n_ctx
        self._cache: tuple[tuple, Tensor] | None = None

    @property
    def text_tower(self) -> nn.Module:
        return self._tower

    @property
    def num_classes(self) -> int:
        return int(self.sos_embeds.shape[0])

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's own signature
        self._tower._apply(fn)
        self._cache = None
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> PromptHead:
        super().train(mode)
        self._tower.eval()  # frozen means no dropout either
        return self

    def _encode(self) -> Tensor:
        """One pass of the frozen encoder over all K prompts: L2-normalised (K, D) text features."""
        from transformers.masking_utils import create_causal_mask

        text = self._tower.text_model
        K = self.num_classes
        ctx = self.ctx.to(self.sos_embeds.dtype).unsqueeze(0).expand(K, -1, -1)
        tokens = torch.cat([self.sos_embeds, ctx, self.suffix_embeds], dim=1)
        hidden = text.embeddings(inputs_embeds=tokens)  # adds the position embeddings
        # The same causal mask CLIPTextModel builds, for whichever attention implementation is set.
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = text.final_layer_norm(hidden)
        pooled = hidden[torch.arange(K, device=hidden.device), self.eos_index]
        return F.normalize(self._tower.text_projection(pooled).float(), dim=-1)

    def text_features(self) -> Tensor:
        """L2-normalised class text features (K, D); cached across no-grad calls until `ctx` changes."""
        if torch.is_grad_enabled():
            self._cache = None
            return self._encode()
        key = (self.ctx._version, self.ctx.data_ptr(), torch.is_autocast_enabled(self.ctx.device.type))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._encode())
        return self._cache[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x.float(), dim=-1) @ self.text_features().T

    def extra_repr(self) -> str:
        return f"n_ctx={self.n_ctx}, classes={self.num_classes}, scale={self.scale:g}"


@functools.lru_cache(maxsize=2)
def _shared_tower(strong_id: str, device: str) -> nn.Module:
    """One frozen text tower per checkpoint and device for a process: a grid's many prompt-head cells
    share it instead of reading the checkpoint again for each (nothing trains or moves it)."""
    return load_text_tower(strong_id, device)


def make_prompt_head(
    strong_id: str,
    token_ids: Tensor | np.ndarray | None,
    logit_scale: float | None,
    *,
    prefix_len: int | None = None,
    n_ctx: int = 16,
    init: str = "phrase",
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> PromptHead:
    """The prompt head from the pieces a cache holds (what a heads-registry entry can call)."""
    if token_ids is None:
        raise UserError(
            "the prompt head needs the class prompts' token ids, which this cache does not hold; "
            "re-run extract with this version to store token ids (or use --head proto or linear)"
        )
    if logit_scale is None:
        raise UserError(
            "the prompt head needs the logit scale from text.h5, which this cache lacks; re-extract"
        )
    if init not in INITS:
        raise UserError(f"unknown prompt init {init!r}; choose one of: {', '.join(INITS)}")
    token_ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    tower = _shared_tower(strong_id, str(device))
    if prefix_len is None:
        prefix_len = _phrase_length(strong_id, token_ids)
    head = PromptHead(tower, token_ids, int(prefix_len), logit_scale, n_ctx, init, generator=generator)
    return head.to(device)


def _phrase_length(strong_id: str, token_ids: Tensor) -> int:
    """Tokens of the default context phrase, from the checkpoint's tokenizer, checked against the cache."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(strong_id)
    except (OSError, ValueError):
        raise UserError(
            f"cannot read the tokenizer of {strong_id!r} to place the context vectors; "
            "re-run extract with this version to store the prompt layout"
        ) from None
    prefix_len = phrase_prefix_len(tok, token_ids)
    if prefix_len is None:
        raise UserError(
            f"the cached prompts do not start with {context_phrase()!r}; the prompt head replaces that "
            "phrase, so re-extract with the default prompt template"
        )
    return prefix_len
