"""The text-prompt head (CoOp): zero-shot reproduced exactly, gradients reach the context alone,
one text-encoder pass per step for all classes, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpl_cache.cache import CachedDomain
from cpl_cache.errors import UserError
from cpl_cache.train.heads import prompt_head
from cpl_cache.train.prompt import PromptHead, load_text_tower, phrase_prefix_len, prompt_token_ids

CLASSES = ["cat", "hot_dog", "the_great_wall_of_china", "t", "zigzag"]


def _write_clip(out: Path, legacy: bool) -> Path:
    """A tiny CLIP with a byte-level tokenizer. `legacy` mimics the OpenAI checkpoints: the special
    tokens are the highest ids and the config says eos_token_id=2, so pooling takes the argmax id."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = [bytes_to_unicode()[b] for b in range(256)]
    words = symbols + [s + "</w>" for s in symbols]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(words + specials if legacy else specials + words)}
    bos, eos = vocab[specials[0]], vocab[specials[1]]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=bos,
                         eos_token_id=2 if legacy else eos, pad_token_id=eos, **common),
        vision_config=dict(image_size=16, patch_size=8, **common),
        projection_dim=24,  # unlike the text config's default: the loader must read the checkpoint's
    )  # fmt: skip
    torch.manual_seed(1)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # a zero-init projection would hide a mistake in pooling; make it matter
        model.text_projection.weight.normal_(0, 0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["eos-id", "legacy-argmax"])
def clip(request, tmp_path_factory) -> dict:
    from transformers import AutoTokenizer, CLIPModel

    path = _write_clip(tmp_path_factory.mktemp("clip"), legacy=request.param)
    tok = AutoTokenizer.from_pretrained(path)
    ids, prefix_len = prompt_token_ids(tok, CLASSES)
    return dict(
        path=path, tok=tok, ids=ids, prefix_len=prefix_len, model=CLIPModel.from_pretrained(path).eval()
    )


def _reference_text(clip: dict) -> torch.Tensor:
    """Zero-shot text prototypes the way extract computes them: the tokenizer, then get_text_features."""
    prompts = [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]
    enc = clip["tok"](prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(clip["model"].get_text_features(**enc).pooler_output, dim=-1)


def _head(clip: dict, **kw) -> PromptHead:
    return PromptHead(load_text_tower(str(clip["path"])), clip["ids"], clip["prefix_len"], 100.0, **kw)


def test_token_ids_hold_the_phrase_then_each_class_name(clip):
    tok, ids, prefix_len = clip["tok"], clip["ids"], clip["prefix_len"]
    phrase = tok("a photo of a", add_special_tokens=False)["input_ids"]
    assert prefix_len == len(phrase) > 0
    assert ids.dtype == np.int64 and ids.shape[0] == len(CLASSES)
    for row, name in zip(ids, ["cat", "hot dog", "the great wall of china", "t", "zigzag"], strict=True):
        want = tok(f"a photo of a {name}.")["input_ids"]
        assert row[: len(want)].tolist() == want
        assert (row[len(want) :] == tok.pad_token_id).all()
    assert ids[:, 1 : 1 + prefix_len].tolist() == [phrase] * len(CLASSES)


def test_phrase_prefix_len_is_the_phrase_length_only_where_every_prompt_starts_with_it(clip):
    tok, ids, prefix_len = clip["tok"], clip["ids"], clip["prefix_len"]
    assert phrase_prefix_len(tok, ids) == prefix_len
    assert phrase_prefix_len(tok, torch.from_numpy(ids)) == prefix_len  # as the prompt head holds them
    other = ids.copy()
    other[3, prefix_len] = tok.pad_token_id  # one prompt's last phrase token differs
    assert phrase_prefix_len(tok, other) is None
    assert phrase_prefix_len(tok, ids[:, :prefix_len]) is None  # too short to hold the phrase
    an_image = tok(["an image of a cat."], return_tensors="np")["input_ids"]
    assert phrase_prefix_len(tok, an_image) is None
    assert phrase_prefix_len(tok, an_image, template="an image of a {}.") == len(
        tok("an image of a", add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(ValueError, match="do not start with the tokens of"):
        prompt_token_ids(tok, CLASSES, template="a photo of a{}.")  # "a" glued to the name


@pytest.mark.parametrize("stored", ["longest", "max_length"])
def test_untrained_phrase_head_gives_the_zero_shot_logits(clip, stored):
    ids = clip["ids"]
    if stored == "max_length":  # what extract writes: every prompt padded to the 77 positions
        ids = clip["tok"]([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES], padding="max_length",
                          max_length=77, return_tensors="np")["input_ids"]  # fmt: skip
    head = PromptHead(load_text_tower(str(clip["path"])), ids, clip["prefix_len"], 100.0)
    assert head.n_ctx == clip["prefix_len"]
    x = torch.randn(9, 24, generator=torch.Generator().manual_seed(0))
    want = 100.0 * F.normalize(x, dim=-1) @ _reference_text(clip).T
    got = head(x)
    assert got.shape == (9, len(CLASSES))
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert want.std() > 1.0  # the logits are not all alike, so the comparison means something


def test_gradients_reach_the_context_vectors_and_nothing_else(clip):
    head = _head(clip, init="random", n_ctx=4, generator=torch.Generator().manual_seed(0))
    assert [name for name, _ in head.named_parameters()] == ["ctx"]
    x = torch.randn(6, 24)
    F.cross_entropy(head(x), torch.tensor([0, 1, 2, 3, 4, 0])).backward()
    assert head.ctx.grad is not None and head.ctx.grad.abs().sum() > 0
    tower = head.text_tower
    assert all(not p.requires_grad and p.grad is None for p in tower.parameters())
    assert all(not b.requires_grad for b in head.buffers())


def test_the_text_encoder_runs_once_per_step_for_all_classes(clip):
    head = _head(clip, n_ctx=3, init="random")
    calls: list[int] = []
    head.text_tower.text_model.encoder.register_forward_hook(
        lambda m, args, kw, out: calls.append(1), with_kwargs=True
    )
    batches: list[int] = []
    head.text_tower.text_model.encoder.register_forward_pre_hook(
        lambda m, args, kw: batches.append(kw["inputs_embeds"].shape[0]), with_kwargs=True
    )
    for b in (1, 7, 64):
        head(torch.randn(b, 24)).sum().backward()
    assert len(calls) == 3 and batches == [len(CLASSES)] * 3

    # Evaluation (no grad) in chunks reuses the class features until an optimiser step changes ctx.
    opt = torch.optim.AdamW(head.parameters(), lr=0.1)
    with torch.no_grad():
        first = head(torch.randn(5, 24))
        before = head.text_features()
    assert len(calls) == 4 and first.shape == (5, len(CLASSES))
    opt.step()  # ctx changes in place
    with torch.no_grad():
        after = head.text_features()
        assert len(calls) == 5
        assert not torch.allclose(after, before) and torch.equal(after, head._encode())


def test_random_init_is_sixteen_small_vectors_and_seeded(clip):
    a = _head(clip, init="random", generator=torch.Generator().manual_seed(3))
    b = _head(clip, init="random", generator=torch.Generator().manual_seed(3))
    assert a.ctx.shape == (16, 32) and a.n_ctx == 16
    assert abs(a.ctx.std().item() - 0.02) < 0.003 and abs(a.ctx.mean().item()) < 0.003
    assert torch.equal(a.ctx, b.ctx)
    logits = a(torch.randn(4, 24))
    assert torch.isfinite(logits).all() and logits.shape == (4, len(CLASSES))


def test_a_few_steps_of_kd_move_the_head_towards_its_targets(clip):
    """Training the context alone can fit soft targets: the loss falls by a clear margin."""
    head = _head(clip, init="random", n_ctx=4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 24, generator=g)
    teacher = 100.0 * F.normalize(x, dim=-1) @ _reference_text(clip).T  # a reachable target
    opt = torch.optim.AdamW(head.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = F.kl_div(
            F.log_softmax(head(x), 1), F.log_softmax(teacher, 1), log_target=True, reduction="batchmean"
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


def _domain(clip: dict, token_ids, strong: str | None = None) -> CachedDomain:
    text = _reference_text(clip)
    manifest = {"strong": {"id": strong or str(clip["path"])}, "num_classes": len(CLASSES), "dim": 24}
    return CachedDomain(manifest, None, None, None, None, None, text, 100.0, token_ids=token_ids)


def test_build_from_a_cache_on_disk_reproduces_its_text_embeddings(clip, tmp_path):
    """Token ids stored by `write_text` (padded to 77, as extract does) and read back by `load_domain`."""
    from cpl_cache.cache import domain_dir, load_domain, read_manifest, write_manifest, write_text
    from cpl_cache.synth.planted import PlantedConfig, write_planted_cache

    cfg = PlantedConfig(n_train=8, n_hold=2, n_test=2, dim=24, classes=len(CLASSES))
    write_planted_cache(tmp_path, cfg)
    ddir = domain_dir(tmp_path, cfg.domain)
    manifest = read_manifest(tmp_path, cfg.domain)
    manifest["strong"] = {"id": str(clip["path"]), "revision": None}
    write_manifest(ddir, manifest)
    prompts = [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]
    ids = clip["tok"](prompts, padding="max_length", max_length=77, return_tensors="np")["input_ids"]
    write_text(ddir, _reference_text(clip).numpy(), prompts, 100.0, token_ids=ids)

    data = load_domain(tmp_path, cfg.domain)
    head = prompt_head(data)  # prefix length read from the checkpoint's tokenizer
    assert head.n_ctx == clip["prefix_len"]
    with torch.no_grad():
        assert torch.allclose(head.text_features(), data.text_embeds, atol=1e-5)
    head16 = prompt_head(data, init="random", n_ctx=16)
    assert head16.ctx.shape == (16, 32) and [n for n, _ in head16.named_parameters()] == ["ctx"]
    assert head16.n_ctx == 16 and prompt_head(data, n_ctx=16).n_ctx == clip["prefix_len"]


def test_refusals_name_the_fix(clip, tmp_path):
    with pytest.raises(UserError, match="re-run extract with this version to store token ids"):
        prompt_head(_domain(clip, None))
    missing = tmp_path / "no-such-clip"
    with pytest.raises(UserError, match="needs the CLIP checkpoint the cache was extracted with"):
        prompt_head(_domain(clip, torch.from_numpy(clip["ids"]), strong=str(missing)))
    other_template, _ = prompt_token_ids(clip["tok"], CLASSES, template="a photo of {}.")
    with pytest.raises(UserError, match="do not start with 'a photo of a'; .* re-extract"):
        prompt_head(_domain(clip, torch.from_numpy(other_template)))  # no prefix_len: the tokenizer checks
    with pytest.raises(UserError, match="use fewer context vectors"):
        _head(clip, init="random", n_ctx=70)
    with pytest.raises(UserError, match="unknown prompt init"):
        _head(clip, init="zeros")
