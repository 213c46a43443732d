"""Pillow's resize, batched on the device: the processors' exact pixels without the workers' CPU time.

Decoding is what the CPU must do; resizing is arithmetic the GPU does in microseconds. This module
reproduces `PIL.Image.resize` (bilinear and bicubic, as the transformers PIL backend calls it) and the
centre crop that follows, with Pillow's own integer arithmetic:

- Pillow resamples in two passes, horizontal then vertical, each a weighted sum over a window of
  input pixels, with weights normalised in double precision and then rounded to 22-bit fixed point,
  and each pass's output rounded (add half, shift) and clipped to 0..255 before the next one.
- Here each pass is a batched matrix product with those same integer weights, in float64, where every
  sum of 8-bit pixels times 22-bit weights is an exact integer; the rounding is Pillow's.
- The crop selects output rows and columns, so only the kept ones are computed; rows that fall
  outside the resized image (a crop larger than it) get no weights and come out 0, as the
  processor's zero padding does.

Each pass alone equals Pillow's bit for bit. Earlier Pillows always run the horizontal pass first, as
here; Pillow 13 runs some resizes vertical-first, and there an image can end a level apart in a few
pixels (on photographs; white noise, whose overshoots are clipped between the passes, a few levels).

The weights are evaluated densely, (output, input) per image: the cost is a few GFLOP per batch of
float64 matrix products, a small share of a GPU's time next to the two networks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images (Resample.c)
SUPPORT = {2: 1.0, 3: 2.0}  # PIL resample code -> filter support: bilinear, bicubic
DEVICE_RESAMPLES = tuple(SUPPORT)
# Images go through the passes in chunks whose float64 canvas stays under this many elements (1 GiB).
CHUNK_ELEMENTS = 1 << 27


def _filter(x: Tensor, resample: int) -> Tensor:
    """Pillow's bilinear or bicubic (a = -0.5) filter."""
    x = x.abs()
    if resample == 2:
        return (1.0 - x).clamp_min(0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def fixed_point_weights(
    in_size: Tensor, out_size: Tensor, first: Tensor, n_out: int, in_max: int, resample: int
) -> Tensor:
    """Pillow's integer resampling weights, (n, n_out, in_max) float64, for one axis of n images.

    Image i is resized from `in_size[i]` to `out_size[i]` pixels along the axis, and output pixels
    `first[i] .. first[i] + n_out - 1` of the result are kept (the crop). Follows Resample.c's
    `precompute_coeffs` and `normalize_coeffs_8bpc`: the filter is evaluated on each output's window of
    at most `ksize` taps, then the weights are scattered into the dense matrix.
    """
    dev, f64 = in_size.device, torch.float64
    insz = in_size.to(f64)[:, None, None]
    outsz = out_size.to(f64)[:, None, None]
    scale = insz / outsz
    filterscale = scale.clamp_min(1.0)
    support = SUPPORT[resample] * filterscale
    ksize = math.ceil(SUPPORT[resample] * float(filterscale.max())) * 2 + 1  # Pillow's widest window
    xx = (first.to(f64)[:, None] + torch.arange(n_out, device=dev, dtype=f64)[None, :])[:, :, None]
    center = (xx + 0.5) * scale
    xmin = torch.trunc(center - support + 0.5).clamp_min(0.0)
    xmax = torch.minimum(torch.trunc(center + support + 0.5), insz)
    c = xmin + torch.arange(ksize, device=dev, dtype=f64)  # (n, n_out, ksize): the window's columns
    inside = (c < xmax) & (xx >= 0) & (xx < outsz)
    # Pillow evaluates filter((x - center + 0.5) * ss) with ss = 1 / filterscale, in double precision.
    w = _filter((c - center + 0.5) * (1.0 / filterscale), resample).masked_fill_(~inside, 0.0)
    total = w.sum(dim=2, keepdim=True)
    w = w / torch.where(total != 0, total, 1.0)
    one = float(1 << PRECISION_BITS)
    k = torch.where(w < 0, torch.trunc(w * one - 0.5), torch.trunc(w * one + 0.5))
    dense = torch.zeros((len(in_size), n_out, in_max), dtype=f64, device=dev)
    return dense.scatter_add_(2, c.clamp(max=in_max - 1).long(), k)  # taps outside add 0


def _round_pass(v: Tensor) -> Tensor:
    """Pillow's clip8: (sum + 2^21) >> 22, clipped to 0..255 (sums are exact integers in float64)."""
    half, one = float(1 << (PRECISION_BITS - 1)), float(1 << PRECISION_BITS)
    return torch.floor((v + half) / one).clamp_(0.0, 255.0)


def resize_crop(
    canvas: Tensor,
    sizes: Sequence[tuple[int, int]],
    resized: Sequence[tuple[int, int]],
    crop: tuple[int, int],
    resample: int,
) -> Tensor:
    """Resize each image of `canvas` (n, 3, H, W) float64 pixel values, image i in its top-left
    `sizes[i]` = (h, w), to `resized[i]` = (h', w') as PIL does, then centre-crop to `crop` = (ch, cw).

    Returns (n, 3, ch, cw) float64 holding integers 0..255: the uint8 pixels of the processor.
    """
    n, _, hmax, wmax = canvas.shape
    dev = canvas.device
    ch, cw = crop
    h_in = torch.tensor([s[0] for s in sizes], device=dev)
    w_in = torch.tensor([s[1] for s in sizes], device=dev)
    h_out = torch.tensor([r[0] for r in resized], device=dev)
    w_out = torch.tensor([r[1] for r in resized], device=dev)
    # transformers' centre crop: top = (h' - ch) // 2, also when negative (the image is then padded).
    top, left = (
        torch.div(h_out - ch, 2, rounding_mode="floor"),
        torch.div(w_out - cw, 2, rounding_mode="floor"),
    )
    kw = fixed_point_weights(w_in, w_out, left, cw, wmax, resample)  # (n, cw, W)
    kh = fixed_point_weights(h_in, h_out, top, ch, hmax, resample)  # (n, ch, H)
    # Horizontal pass as one batched product over the 3 H rows of each image, then the vertical pass.
    across = _round_pass(torch.bmm(canvas.reshape(n, 3 * hmax, wmax), kw.transpose(1, 2)))
    return _round_pass(torch.matmul(kh[:, None], across.view(n, 3, hmax, cw)))  # (n, 3, ch, cw)


def chunks(sizes: Sequence[tuple[int, int]], budget: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges of images whose padded float64 canvas stays within `budget` elements."""
    out, a, hmax, wmax = [], 0, 0, 0
    for i, (h, w) in enumerate(sizes):
        nh, nw = max(hmax, h), max(wmax, w)
        if i > a and (i - a + 1) * 3 * nh * nw > budget:
            out.append((a, i))
            a, nh, nw = i, h, w
        hmax, wmax = nh, nw
    if len(sizes) > a:
        out.append((a, len(sizes)))
    return out


def canvas_of(flat: Tensor, offsets: Sequence[int], sizes: Sequence[tuple[int, int]]) -> Tensor:
    """Images packed back to back in `flat` (uint8, each (h, w, 3) row-major) as a zero-padded
    (n, 3, H, W) float64 canvas on flat's device."""
    hmax = max(h for h, _ in sizes)
    wmax = max(w for _, w in sizes)
    canvas = torch.zeros((len(sizes), hmax, wmax, 3), dtype=torch.uint8, device=flat.device)
    for i, (off, (h, w)) in enumerate(zip(offsets, sizes, strict=True)):
        canvas[i, :h, :w] = flat[off : off + h * w * 3].view(h, w, 3)
    return canvas.permute(0, 3, 1, 2).to(torch.float64).contiguous()


def packed_offsets(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Start of each image in a back-to-back uint8 buffer of (h, w, 3) images."""
    return [0, *itertools.accumulate(h * w * 3 for h, w in sizes)][: len(sizes)]
