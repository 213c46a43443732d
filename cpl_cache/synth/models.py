"""Tiny strong (CLIP) and weak (ResNet) checkpoints, written offline with `save_pretrained`.

They load by path exactly like hub checkpoints (`CLIPModel`, `AutoProcessor`,
`AutoModelForImageClassification`, `AutoImageProcessor`), so the whole pipeline runs on a laptop.
The CLIP tokenizer is byte-level BPE with no merges: every byte is a token, which covers any
class name without a trained vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpl_cache.runtime import quiet_transformers

CLIP_DIR = "clip-tiny"
RESNET_DIR = "resnet-tiny"
IMAGE_SIZE = 32
CLIP_WIDTH = 32  # hidden size of both towers; the projection has the same size
CLIP_LAYERS = 2
PATCH_SIZE = 4  # 8x8 patches: fine enough for the tower to learn outlines, not only colours


@dataclass(frozen=True)
class PretrainConfig:
    """Contrastive (CLIP) pretraining of the tiny CLIP on image-caption pairs of its own.

    The images come from a seed stream apart from the image set's, in all six domain styles, photos
    a little more often than the rest. Most captions name the style ("a sketch of a bee."), so the
    zero-shot prompt "a photo of a bee." fits drawings less well than photos: zero-shot works, better
    on some domains than on others, and mostly below what a head trained on the embeddings reaches.
    Defaults: ~40 s on one CPU thread for the demo's 10 classes.
    """

    images: int = 3000
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    # Share of each domain among the pretraining images, in DOMAINS order:
    # clipart, infograph, painting, quickdraw, real, sketch.
    domain_mix: tuple[float, ...] = (0.18, 0.14, 0.18, 0.14, 0.22, 0.14)
    style_captions: float = 0.75  # share of captions naming the domain's style ("a sketch of a bee.")
    max_logit_scale: float = 100.0


def _byte_vocab() -> dict[str, int]:
    """CLIP's special tokens, then the 256 byte symbols, then each of them as a word end."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return vocab


def pretrain_clip(
    model: Any, processor: Any, classes: list[str], cfg: PretrainConfig, seed: int, *, progress: bool = False
) -> dict:
    """Train `model` in place with the symmetric CLIP loss on synthetic pairs; returns the last loss.

    Several images of a batch can share a caption, so each side's target spreads evenly over its
    positives. Runs on one CPU thread: the same seed then gives the same weights bit for bit.
    `progress` shows a bar over the steps (the slow part of `cpl-cache synth`).
    """
    import math

    import torch
    import torch.nn.functional as F

    from cpl_cache.datasets import DOMAINS, prompt_for
    from cpl_cache.runtime import progress as progress_bar
    from cpl_cache.synth.images import DOMAIN_WORDS, draw_pretraining

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        drawn = draw_pretraining(len(classes), cfg.images, seed, cfg.domain_mix)
        pixels = torch.from_numpy(
            processor.image_processor(images=[im for im, _, _ in drawn], return_tensors="np")["pixel_values"]
        )
        labels = torch.tensor([label for _, label, _ in drawn])
        # Captions of class c: c * W is "a photo of a c.", c * W + 1 + j names the style of domain j.
        styles = [w for w in dict.fromkeys(DOMAIN_WORDS.values()) if w != "photo"]
        width = 1 + len(styles)
        texts = []
        for name in classes:
            spoken = name.replace("_", " ")
            texts += [prompt_for(name)] + [f"a {w} of a {spoken}." for w in styles]
        style_of = torch.tensor(
            [0 if DOMAIN_WORDS[d] == "photo" else 1 + styles.index(DOMAIN_WORDS[d]) for _, _, d in drawn]
        )
        assert len(DOMAIN_WORDS) == len(DOMAINS)
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")

        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, round(cfg.warmup_frac * cfg.steps))
        model.train()
        loss = torch.zeros(())
        bar = progress_bar(range(cfg.steps), desc="pretrain tiny CLIP", unit="step", disable=not progress)
        for step in bar:
            if step < warmup:  # linear warmup, then cosine to zero
                scale = (step + 1) / warmup
            else:
                scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * scale
            idx = torch.randint(0, len(drawn), (cfg.batch_size,), generator=gen)
            styled = torch.rand(cfg.batch_size, generator=gen) < cfg.style_captions
            caption = labels[idx] * width + torch.where(styled, style_of[idx], 0)
            uniq, inv = torch.unique(caption, return_inverse=True)
            img = F.normalize(model.get_image_features(pixel_values=pixels[idx]).pooler_output, dim=-1)
            txt = model.get_text_features(
                input_ids=tokens["input_ids"][uniq], attention_mask=tokens["attention_mask"][uniq]
            ).pooler_output
            logits = model.logit_scale.exp() * img @ F.normalize(txt, dim=-1).T  # (batch, captions)
            pos = (inv[None, :] == torch.arange(len(uniq))[:, None]).float()  # (captions, batch)
            to_text = F.cross_entropy(logits, inv)
            to_image = -(F.log_softmax(logits.T, dim=1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
            loss = (to_text + to_image) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(cfg.max_logit_scale))
            if step % 20 == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return {"loss": float(loss.detach())}


def write_clip(
    out: Path,
    *,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    classes: list[str] | None = None,
    pretrain: PretrainConfig | None = None,
    progress: bool = False,
) -> Path:
    """A 2-layer CLIP (width 32, patch 8, projection 32) with its processor, under `out`; pretrained
    on `classes` when `pretrain` is given, else at its random initialisation."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    common = dict(
        hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=CLIP_LAYERS,
        num_attention_heads=2,
    )  # fmt: skip
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1, **common,
        ),
        vision_config=dict(image_size=image_size, patch_size=PATCH_SIZE, **common),
        projection_dim=CLIP_WIDTH,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)  # before pretraining, whose padded calls leave state in the tokenizer
    if pretrain is not None:
        if not classes:
            raise ValueError("pretraining needs the class names")
        pretrain_clip(model, processor, classes, pretrain, seed, progress=progress)
    with quiet_transformers():
        model.save_pretrained(out)
    return out


def write_resnet(out: Path, classes: list[str], *, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    """A 2-stage ResNet (widths 8 and 16) for `classes`, with a ConvNeXt-style processor like resnet-18's."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        num_labels=len(classes), id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = ResNetForImageClassification(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out)
    ConvNextImageProcessorPil(size={"shortest_edge": image_size}, crop_pct=0.875).save_pretrained(out)
    return out


def write_models(
    models_dir: Path,
    classes: list[str],
    *,
    seed: int = 0,
    pretrain: PretrainConfig | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """Both tiny checkpoints under `models_dir` (the CLIP pretrained when `pretrain` is given), by role;
    `progress` shows a bar over the pretraining steps."""
    models_dir = Path(models_dir)
    return {
        "strong": write_clip(
            models_dir / CLIP_DIR, seed=seed, classes=classes, pretrain=pretrain, progress=progress
        ),
        "weak": write_resnet(models_dir / RESNET_DIR, classes, seed=seed),
    }
