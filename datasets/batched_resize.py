"""Antialiased resize + centre crop of a batch of images of different sizes in a few batched kernels.

Why: ATen's antialiased resize (`_upsample_bicubic2d_aa`, what torchvision's tensor `Resize` calls) takes
one image size per call, so a batch of decoded JPEGs of different sizes cost a cast, two resize passes and a
crop per image: ~80 µs of host time per image on an H200 host, against ~36 µs for nvJPEG to decode it
(`benchmarks/bench_decode_limits.py`). The resize is linear and separable: resized = A_h · x · A_wᵀ with
A_h [out_h, H] and A_w [out_w, W] the filter weights of each output row and column, and the centre crop only
keeps some rows of A_h and A_w. Here the weights of every image are computed at once, in the closed form of
ATen's antialiased kernels (the same support, filter, truncation and normalisation) and only at the few taps
of each output's support, then two batched matmuls resize and crop the lot.

The images are padded to a common size without one launch per image: one `cat` of the flattened images and
one gather of padded rows (`_gather_rows`). The padding holds other pixels, not zeros: A_h and A_w are zero
exactly there (past each image's height and width), and zero times a finite pixel is zero, so the result is
that of zero padding, bit for bit (`test_padding_content_does_not_change_the_resize`).

Precision. On CUDA the row pass, the larger of the two, runs on fp16 tensor cores with fp32 accumulation
and output: uint8 levels are exact in fp16, and each weight is split into its fp16 rounding and the fp16
rounding of the rest (w = hi + lo, |w − hi − lo| ≤ 2⁻²² |w|), both multiplied by the same pixels in one
matmul (rows duplicated in the gather). The column pass stays fp32 (its input, the row pass's output, is
not exact in fp16). Measured on CPU in fp32 arithmetic with the same fp16 operands (the products are
exact in fp32), on random uint8 images of 13–200 and of 224–1000 pixels resized to 40 and to 224: the split
row pass moves pixels by ≤ 8e-5 levels (mean 6e-6) against the all-fp32 resize, and both are within 2e-4
levels of ATen's per-image op before the final rounding to uint8 levels; fp16 weights without the low part
moved them by up to 0.11 level (mean 0.016), changing 1.6 % of the rounded pixels
(`test_fp16_row_pass_is_within_float_rounding_of_fp32`; CUDA: `test_cuda_resize_matches_the_cpu_fp32_resize`).
The column pass follows `torch.backends.cuda.matmul.allow_tf32`: where a user allows TF32, pixels move by
up to a few tenths of a level, within the device path's tolerance against PIL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
"""Half the filter's support at scale 1, as ATen's `interp_size / 2`."""
PAD_ELEMENTS = 1 << 27
"""At most this many padded input elements per matmul chunk (~1 GiB of buffers); a larger image goes alone."""
N_PARAMS = 8
"""Columns of the per-image parameters: batch index, flat offset, in h, w, out h, w, first row, column."""


def _filter(x: Tensor, kind: str) -> Tensor:
    """ATen's antialias filters: Keys' cubic with a = −0.5 (PIL's), or the triangle."""
    x = x.abs()
    if kind == "bilinear":
        return (1 - x).clamp_min(0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def max_taps(in_sizes: Sequence[int], out_sizes: Sequence[int], kind: str) -> int:
    """An upper bound on the number of input positions one output position reads (ATen's `xsize`), over
    resizes in_sizes[b] → out_sizes[b]: ⌊2·support⌋ + 1, here ⌈2·support⌉ + 1 against float rounding."""
    scale = max(max(i / o, 1.0) for i, o in zip(in_sizes, out_sizes))
    return math.ceil(2 * SUPPORT[kind] * scale) + 1


def aa_taps(
    in_size: Tensor, out_size: Tensor, first: Tensor, n_out: int, kind: str, taps: int
) -> tuple[Tensor, Tensor]:
    """Input positions (int64) and weights (fp32), both [B, n_out, taps], of output positions first_b …
    first_b + n_out − 1 of a resize of in_size_b → out_size_b input positions, as ATen's antialiased kernel
    makes them: positions xmin, xmin + 1, …; weights past the support are 0. `taps` ≥ `max_taps`."""
    device = in_size.device
    scale_B11 = (in_size.float() / out_size.float()).view(-1, 1, 1)  # ATen: float(in) / out
    support_B11 = SUPPORT[kind] * scale_B11.clamp_min(1.0)
    invscale_B11 = 1.0 / scale_B11.clamp_min(1.0)
    i_1O1 = (first.view(-1, 1, 1) + torch.arange(n_out, device=device).view(1, -1, 1)).float()
    center_BO1 = scale_B11 * (i_1O1 + 0.5)
    xmin_BO1 = (center_BO1 - support_B11 + 0.5).trunc().clamp_min(0)
    xmax_BO1 = torch.minimum((center_BO1 + support_B11 + 0.5).trunc(), in_size.view(-1, 1, 1).float())
    j_BOK = xmin_BO1 + torch.arange(taps, device=device, dtype=torch.float32)
    w_BOK = _filter((j_BOK - center_BO1 + 0.5) * invscale_B11, kind) * (j_BOK < xmax_BO1)
    total_BO1 = w_BOK.sum(-1, keepdim=True)
    return j_BOK.long(), torch.where(total_BO1 != 0, w_BOK / total_BO1, w_BOK)


def aa_weights(
    in_size: Tensor, out_size: Tensor, first: Tensor, n_out: int, n_in: int, kind: str, taps: int
) -> Tensor:
    """Dense weights [B, n_out, n_in] (fp32) of `aa_taps`; n_in ≥ max(in_size) + taps, so that every tap
    falls inside (those past in_size_b weigh 0)."""
    return dense(*aa_taps(in_size, out_size, first, n_out, kind, taps), n_in)


def dense(j_BOK: Tensor, w_BOK: Tensor, n_in: int) -> Tensor:
    """[B, O, n_in] fp32: weights w at positions j (`aa_taps`), zero elsewhere."""
    return w_BOK.new_zeros(*w_BOK.shape[:2], n_in).scatter_(2, j_BOK, w_BOK)


def split_fp16(j_BOK: Tensor, w_BOK: Tensor, n_in: int) -> Tensor:
    """[B, O, 2·n_in] fp16: `dense` rounded to fp16 (hi), then the fp16 rounding of what that leaves (lo);
    against pixel rows stacked twice, hi + lo reproduce the fp32 weights to 2⁻²² of each."""
    hi_BOK = w_BOK.half()
    parts_BOK2 = torch.cat([hi_BOK, (w_BOK - hi_BOK.float()).half()], dim=2)
    out = hi_BOK.new_zeros(*w_BOK.shape[:2], 2 * n_in)
    return out.scatter_(2, torch.cat([j_BOK, j_BOK + n_in], dim=2), parts_BOK2)


@dataclass(frozen=True)
class _Chunk:
    """Images start … stop − 1 of the sorted batch, resized together."""

    start: int
    stop: int
    taps: int  # `max_taps` of their rows and columns
    padded: tuple[int, int]  # their largest height and width, plus `taps`: every tap falls inside


def resize_crop(
    images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], tops: Sequence[tuple[int, int]],
    crop: tuple[int, int], kind: str, fp16: bool | None = None,
) -> Tensor:  # fmt: skip
    """Float [B, C, crop_h, crop_w]: image b (uint8 or float [C, H_b, W_b]) resized to sizes[b] = (h, w) by
    ATen's antialiased `kind` filter, then rows tops[b][0]… and columns tops[b][1]… of the result kept.

    Images go by orientation, then size, in chunks of at most `PAD_ELEMENTS` padded elements; the number of
    launches does not grow with the number of images (but for `cat`, which takes many per launch). `fp16`:
    the row pass on fp16 operands (module docstring); by default on CUDA, and only for uint8 images."""
    device, n_ch = images[0].device, images[0].shape[0]
    shapes = [tuple(x.shape[-2:]) for x in images]
    order = sorted(
        range(len(images)), key=lambda b: (shapes[b][0] > shapes[b][1], shapes[b][0] * shapes[b][1])
    )
    shapes = [shapes[b] for b in order]
    chunks = _plan(shapes, [tuple(sizes[b]) for b in order], n_ch, kind)
    offsets = accumulate((images[b].numel() for b in order), initial=0)
    params = torch.tensor(
        [(b, off, *shape, *sizes[b], *tops[b]) for b, off, shape in zip(order, offsets, shapes)],
        dtype=torch.int64,
    ).to(device, non_blocking=True)  # the only host-to-device copy
    tail = images[0].new_zeros(max(c.padded[1] for c in chunks))  # the last rows' windows end inside
    flat = torch.cat([images[b].reshape(-1) for b in order] + [tail])
    fp16 = (device.type == "cuda" if fp16 is None else fp16) and flat.dtype == torch.uint8
    out = torch.empty(len(images), n_ch, *crop, device=device)
    for c in chunks:
        chunk_params = params[c.start : c.stop]
        out.index_copy_(0, chunk_params[:, 0], _resize_chunk(flat, chunk_params, n_ch, crop, kind, c, fp16))
    return out


def _plan(shapes: list[tuple[int, int]], sizes: list[tuple[int, int]], n_ch: int, kind: str) -> list[_Chunk]:
    """Chunks of the sorted images: a new one where the padded elements would pass `PAD_ELEMENTS` or the
    orientation changes (portrait and landscape images padded together would pad both ways)."""
    chunks, start = [], 0
    while start < len(shapes):
        stop, h_max, w_max = start, 0, 0
        while stop < len(shapes):
            h, w = shapes[stop]
            grown = (stop + 1 - start) * max(h_max, h) * max(w_max, w) * n_ch
            turns = (h > w) != (shapes[start][0] > shapes[start][1])
            if stop > start and (grown > PAD_ELEMENTS or turns):
                break
            h_max, w_max, stop = max(h_max, h), max(w_max, w), stop + 1
        sides = [side for shape in shapes[start:stop] for side in shape]
        taps = max_taps(sides, [side for size in sizes[start:stop] for side in size], kind)
        chunks.append(_Chunk(start, stop, taps, (h_max + taps, w_max + taps)))
        start = stop
    return chunks


def _gather_rows(flat: Tensor, params: Tensor, n_ch: int, rows: int, window: int, copies: int) -> Tensor:
    """[n, copies · rows, C · window]: row y < rows of channel c of image i (flattened at params[i, 1] in
    `flat`, of size params[i, 2:4]) as the `window` elements from its start, `copies` times over, in one
    gather. Past an image's last row its last row again; past its width the pixels that follow in `flat`
    (the weights are zero there). `flat` ends with `window` elements to spare."""
    off, in_h, in_w = (params[:, k].view(-1, 1, 1, 1) for k in (1, 2, 3))
    y_11R1 = torch.arange(rows, device=flat.device).view(1, 1, rows, 1)
    c_111C = torch.arange(n_ch, device=flat.device).view(1, 1, 1, n_ch)
    start_n1RC = off + c_111C * (in_h * in_w) + torch.minimum(y_11R1, in_h - 1) * in_w
    windows = flat.as_strided((flat.numel() - window + 1, window), (1, 1))
    n = params.shape[0]
    return windows[start_n1RC.expand(n, copies, rows, n_ch)].view(n, copies * rows, n_ch * window)


def _resize_chunk(
    flat: Tensor, params: Tensor, n_ch: int, crop: tuple[int, int], kind: str, chunk: _Chunk, fp16: bool
) -> Tensor:
    """[n, C, crop_h, crop_w] (a transposed view) of the chunk's images: the row pass as
    [n, crop_h, h] @ [n, h, C · w], then the column pass as [n, crop_h · C, w] @ [n, w, crop_w]."""
    (h_pad, w_pad), n = chunk.padded, params.shape[0]
    # rows' and columns' weights in one go: sizes, output sizes and first outputs [3, 2n]
    sides_32n = params[:, 2:8].view(n, 3, 2).permute(1, 2, 0).reshape(3, 2 * n)
    j_BOK, w_BOK = aa_taps(*sides_32n, max(crop), kind, chunk.taps)
    taps_h, taps_w = (
        (j_BOK[:n, : crop[0]], w_BOK[:n, : crop[0]]),
        (j_BOK[n:, : crop[1]], w_BOK[n:, : crop[1]]),
    )
    x_nHX = _gather_rows(flat, params, n_ch, h_pad, w_pad, 2 if fp16 else 1)
    with torch.autocast(flat.device.type, enabled=False):
        if fp16:
            rows_nOX = _bmm_fp32_out(split_fp16(*taps_h, h_pad), x_nHX)
        else:
            rows_nOX = torch.bmm(dense(*taps_h, h_pad), x_nHX.float())
        a_w_nOW = dense(*taps_w, w_pad)
        out_nQO = torch.bmm(rows_nOX.view(n, crop[0] * n_ch, w_pad), a_w_nOW.transpose(1, 2))
    return out_nQO.view(n, crop[0], n_ch, crop[1]).transpose(1, 2)


def _bmm_fp32_out(a_fp16: Tensor, x: Tensor) -> Tensor:
    """fp32 a @ x for fp16 `a` and integer levels `x`: on CUDA fp16 tensor cores with fp32 accumulation and
    output; elsewhere the same (exact) products summed in fp32."""
    if a_fp16.is_cuda:
        return torch.bmm(a_fp16, x.half(), out_dtype=torch.float32)
    return torch.bmm(a_fp16.float(), x.float())


__all__ = ["aa_taps", "aa_weights", "dense", "max_taps", "resize_crop", "split_fp16"]
