"""Tiny strong (CLIP) and weak (ResNet) checkpoints, written offline with `save_pretrained`.

They load by path exactly like hub checkpoints (`CLIPModel`, `AutoProcessor`,
`AutoModelForImageClassification`, `AutoImageProcessor`), so the whole pipeline runs on a laptop.
The CLIP tokenizer is byte-level BPE with no merges: every byte is a token, which covers any
class name without a trained vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

CLIP_DIR = "clip-tiny"
RESNET_DIR = "resnet-tiny"
IMAGE_SIZE = 32


def _byte_vocab() -> dict[str, int]:
    """CLIP's special tokens, then the 256 byte symbols, then each of them as a word end."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return vocab


@contextlib.contextmanager
def quiet_saving() -> Iterator[None]:
    """Hide transformers' per-shard progress bars while saving a checkpoint of a few kilobytes."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def write_clip(out: Path, *, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    """A 2-layer CLIP (width 32, patch 8, projection 32) with its processor, under `out`."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1, **common,
        ),
        vision_config=dict(image_size=image_size, patch_size=8, **common),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    with quiet_saving():
        model.save_pretrained(out)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
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
    with quiet_saving():
        model.save_pretrained(out)
    ConvNextImageProcessorPil(size={"shortest_edge": image_size}, crop_pct=0.875).save_pretrained(out)
    return out


def write_models(models_dir: Path, classes: list[str], *, seed: int = 0) -> dict[str, Path]:
    """Both tiny checkpoints under `models_dir`; returns their paths by role."""
    models_dir = Path(models_dir)
    return {
        "strong": write_clip(models_dir / CLIP_DIR, seed=seed),
        "weak": write_resnet(models_dir / RESNET_DIR, classes, seed=seed),
    }
