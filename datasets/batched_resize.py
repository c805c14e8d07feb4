"""Antialiased resize + centre crop of a batch of images of different sizes in a few batched kernels.

Why: ATen's antialiased resize (`_upsample_bicubic2d_aa`, what torchvision's tensor `Resize` calls) takes
one image size per call, so a batch of decoded JPEGs of different sizes cost a cast, two resize passes and a
crop per image: ~80 µs of host time per image on an H200 host, against ~36 µs for nvJPEG to decode it
(`benchmarks/bench_decode_limits.py`). The resize is linear and separable: resized = A_h · x · A_wᵀ with
A_h [out_h, H] and A_w [out_w, W] the filter weights of each output row and column, and the centre crop only
keeps some rows of A_h and A_w. Here the weights of every image are computed at once, in the closed form of
ATen's antialiased kernels (the same support, filter, truncation and normalisation), the images are padded
to a common size with zeros (whose weights are zero), and two batched matmuls resize and crop the lot.

The result equals the per-image ATen path up to float rounding order (≤ 1e-3 levels before the final
rounding to uint8 levels; the tests bound it), in fp32 matmuls: where a user allows TF32 matmuls
(`torch.backends.cuda.matmul.allow_tf32`), pixels move by up to a few tenths of a level, within the
device path's tolerance against PIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
"""Half the filter's support at scale 1, as ATen's `interp_size / 2`."""
PAD_ELEMENTS = 1 << 27
"""At most this many padded input elements per matmul chunk (512 MiB in fp32); a larger image goes alone."""


def _filter(x: Tensor, kind: str) -> Tensor:
    """ATen's antialias filters: Keys' cubic with a = −0.5 (PIL's), or the triangle."""
    x = x.abs()
    if kind == "bilinear":
        return (1 - x).clamp_min(0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def aa_weights(in_size: Tensor, out_size: Tensor, first: Tensor, n_out: int, n_in: int, kind: str) -> Tensor:
    """Weights [B, n_out, n_in] (fp32) of output positions first_b … first_b + n_out − 1 of a resize of
    in_size_b → out_size_b input positions (zero past in_size_b), as ATen's antialiased kernel makes them."""
    device = in_size.device
    scale_B11 = (in_size.float() / out_size.float()).view(-1, 1, 1)  # ATen: float(in) / out
    support_B11 = SUPPORT[kind] * scale_B11.clamp_min(1.0)
    invscale_B11 = torch.where(scale_B11 >= 1.0, 1.0 / scale_B11, torch.ones_like(scale_B11))
    i_1O1 = (first.view(-1, 1, 1) + torch.arange(n_out, device=device).view(1, -1, 1)).float()
    center_BO1 = scale_B11 * (i_1O1 + 0.5)
    xmin_BO1 = (center_BO1 - support_B11 + 0.5).trunc().clamp_min(0)
    xmax_BO1 = torch.minimum((center_BO1 + support_B11 + 0.5).trunc(), in_size.view(-1, 1, 1).float())
    j_11I = torch.arange(n_in, device=device, dtype=torch.float32).view(1, 1, -1)
    w_BOI = _filter((j_11I - center_BO1 + 0.5) * invscale_B11, kind)
    w_BOI = w_BOI * ((j_11I >= xmin_BO1) & (j_11I < xmax_BO1))
    total_BO1 = w_BOI.sum(-1, keepdim=True)
    return torch.where(total_BO1 != 0, w_BOI / total_BO1, w_BOI)


def resize_crop(
    images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], tops: Sequence[tuple[int, int]],
    crop: tuple[int, int], kind: str,
) -> Tensor:  # fmt: skip
    """Float [B, C, crop_h, crop_w]: image b (uint8 or float [C, H_b, W_b]) resized to sizes[b] = (h, w) by
    ATen's antialiased `kind` filter, then rows tops[b][0]… and columns tops[b][1]… of the result kept.
    Images are processed in order of size, in chunks of at most `PAD_ELEMENTS` padded elements."""
    order = sorted(range(len(images)), key=lambda b: images[b].shape[-2] * images[b].shape[-1])
    out = torch.empty(len(images), images[0].shape[0], *crop, device=images[0].device)
    start = 0
    while start < len(order):
        stop, h_max, w_max = start, 0, 0
        while stop < len(order):
            h, w = images[order[stop]].shape[-2:]
            grown = (stop + 1 - start) * max(h_max, h) * max(w_max, w) * images[0].shape[0]
            if stop > start and grown > PAD_ELEMENTS:
                break
            h_max, w_max, stop = max(h_max, h), max(w_max, w), stop + 1
        chunk = order[start:stop]
        out[chunk] = _resize_chunk([images[b] for b in chunk], [sizes[b] for b in chunk],
                                   [tops[b] for b in chunk], crop, kind, (h_max, w_max))  # fmt: skip
        start = stop
    return out


def _resize_chunk(
    images: list[Tensor], sizes: list[tuple[int, int]], tops: list[tuple[int, int]], crop: tuple[int, int],
    kind: str, padded: tuple[int, int],
) -> Tensor:  # fmt: skip
    device, (h_max, w_max) = images[0].device, padded
    x_BCHW = torch.zeros(len(images), images[0].shape[0], h_max, w_max, device=device)
    for x_CHW, dst_CHW in zip(images, x_BCHW):
        dst_CHW[:, : x_CHW.shape[-2], : x_CHW.shape[-1]].copy_(x_CHW)
    params = torch.tensor(
        [(*x.shape[-2:], *size, *top) for x, size, top in zip(images, sizes, tops)], dtype=torch.int64
    ).to(device, non_blocking=True)
    in_h, in_w, out_h, out_w, top, left = params.unbind(1)
    a_h_BOH = aa_weights(in_h, out_h, top, crop[0], h_max, kind)
    a_w_BOW = aa_weights(in_w, out_w, left, crop[1], w_max, kind)
    with torch.autocast(device.type, enabled=False):
        rows_BCOW = a_h_BOH.unsqueeze(1) @ x_BCHW
        return rows_BCOW @ a_w_BOW.transpose(1, 2).unsqueeze(1)


__all__ = ["aa_weights", "resize_crop"]
