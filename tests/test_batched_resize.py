"""`mmsae.datasets.batched_resize`: the padded row gather, the weights at the support's taps, the fp16 row
pass, and launches that do not grow with the batch."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import mmsae.datasets.batched_resize as br

SHAPES = [(75, 100), (100, 75), (67, 100), (96, 128), (45, 45), (60, 91), (18, 13), (200, 160)]


def _batch(shapes: list[tuple[int, int]], short: int = 48, crop: int = 40) -> tuple[list[Tensor], ...]:
    """Random uint8 images, their sizes after a shorter-side resize to `short`, and centre-crop offsets."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    sizes = [(short, int(short * w / h)) if h <= w else (int(short * h / w), short) for h, w in shapes]
    tops = [(round((h - crop) / 2.0), round((w - crop) / 2.0)) for h, w in sizes]
    return images, sizes, tops


def _aten(images: list[Tensor], sizes: list[Any], tops: list[Any], crop: int, kind: str) -> Tensor:
    op = (
        torch.ops.aten._upsample_bicubic2d_aa if kind == "bicubic" else torch.ops.aten._upsample_bilinear2d_aa
    )
    out = []
    for x, size, (top, left) in zip(images, sizes, tops):
        out.append(op(x.unsqueeze(0).float(), list(size), False)[..., top : top + crop, left : left + crop])
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["bicubic", "bilinear"])
def test_fp16_row_pass_is_within_float_rounding_of_fp32(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row pass on fp16 operands (weights split hi + lo, as on CUDA; here the same products summed in
    fp32) stays within float rounding of the fp32 resize and of ATen's per-image op, in levels before the
    final rounding (measured: ≤ 8e-5 against fp32, ≤ 2e-4 against ATen). Without the low part it would
    not: the bound is one the hi part alone breaks (0.1 level)."""
    images, sizes, tops = _batch(SHAPES)
    fp32 = br.resize_crop(images, sizes, tops, (40, 40), kind, fp16=False)
    fp16 = br.resize_crop(images, sizes, tops, (40, 40), kind, fp16=True)
    aten = _aten(images, sizes, tops, 40, kind)
    assert (fp16 - fp32).abs().max() <= 1e-3 and (fp16 - fp32).abs().mean() <= 1e-4
    torch.testing.assert_close(fp16, aten, rtol=0, atol=2e-3)
    torch.testing.assert_close(fp32, aten, rtol=0, atol=2e-3)

    split = br.split_fp16

    def hi_only(*args: Any) -> Tensor:
        w = split(*args)
        return torch.cat([w[..., : w.shape[-1] // 2], torch.zeros_like(w[..., w.shape[-1] // 2 :])], -1)

    monkeypatch.setattr(br, "split_fp16", hi_only)
    assert (br.resize_crop(images, sizes, tops, (40, 40), kind, fp16=True) - fp32).abs().max() > 1e-2


def test_padding_content_does_not_change_the_resize(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row gather puts each image's pixels, bit for bit, at the top left of its padded rows; what lies
    past them (other pixels) meets zero weights only: zero padding gives the same result, bit for bit."""
    images, sizes, tops = _batch(SHAPES)
    gather = br._gather_rows
    seen: list[bool] = []

    def zero_padded(flat: Tensor, params: Tensor, n_ch: int, rows: int, window: int, copies: int) -> Tensor:
        x = gather(flat, params, n_ch, rows, window, copies).view(len(params), copies, rows, n_ch, window)
        for i, (b, _, h, w) in enumerate(params[:, :4].tolist()):
            for k in range(copies):
                assert torch.equal(x[i, k, :h, :, :w], images[b].permute(1, 0, 2))
        seen.append(True)
        y_R = torch.arange(rows).view(1, 1, rows, 1, 1)
        x_W = torch.arange(window).view(1, 1, 1, 1, window)
        inside = (y_R < params[:, 2].view(-1, 1, 1, 1, 1)) & (x_W < params[:, 3].view(-1, 1, 1, 1, 1))
        return (x * inside).view(len(params), copies * rows, n_ch * window)

    for fp16 in (False, True):
        got = br.resize_crop(images, sizes, tops, (40, 40), "bicubic", fp16=fp16)
        with monkeypatch.context() as m:
            m.setattr(br, "_gather_rows", zero_padded)
            assert torch.equal(br.resize_crop(images, sizes, tops, (40, 40), "bicubic", fp16=fp16), got)
    assert seen


def _dense_weights(
    in_size: Tensor, out_size: Tensor, first: Tensor, n_out: int, n_in: int, kind: str
) -> Tensor:
    """ATen's antialiased weights in closed form over all n_in input positions (the straightforward way)."""
    scale_B11 = (in_size.float() / out_size.float()).view(-1, 1, 1)
    support_B11 = br.SUPPORT[kind] * scale_B11.clamp_min(1.0)
    invscale_B11 = torch.where(scale_B11 >= 1.0, 1.0 / scale_B11, torch.ones_like(scale_B11))
    i_1O1 = (first.view(-1, 1, 1) + torch.arange(n_out).view(1, -1, 1)).float()
    center_BO1 = scale_B11 * (i_1O1 + 0.5)
    xmin_BO1 = (center_BO1 - support_B11 + 0.5).trunc().clamp_min(0)
    xmax_BO1 = torch.minimum((center_BO1 + support_B11 + 0.5).trunc(), in_size.view(-1, 1, 1).float())
    j_11I = torch.arange(n_in, dtype=torch.float32).view(1, 1, -1)
    w_BOI = br._filter((j_11I - center_BO1 + 0.5) * invscale_B11, kind)
    w_BOI = w_BOI * ((j_11I >= xmin_BO1) & (j_11I < xmax_BO1))
    total_BO1 = w_BOI.sum(-1, keepdim=True)
    return torch.where(total_BO1 != 0, w_BOI / total_BO1, w_BOI)


@pytest.mark.parametrize("kind", ["bicubic", "bilinear"])
def test_weights_at_the_taps_equal_the_dense_closed_form(kind: str) -> None:
    """`max_taps` bounds every support (downscales by integer and fractional factors, upscales, scale 1),
    and the weights computed only there equal those computed over every input position (up to the order
    of the normalising sum: 1 ulp)."""
    in_sizes = [500, 375, 224, 100, 37, 448, 19, 1411, 256]
    out_sizes = [224, 224, 224, 300, 24, 224, 40, 256, 256]
    first = torch.tensor([0, 13, 0, 5, 0, 100, 2, 16, 0])
    taps = br.max_taps(in_sizes, out_sizes, kind)
    n_in = max(in_sizes) + taps
    in_t, out_t = torch.tensor(in_sizes), torch.tensor(out_sizes)
    got = br.aa_weights(in_t, out_t, first, 24, n_in, kind, taps)
    want = _dense_weights(in_t, out_t, first, 24, n_in, kind)
    torch.testing.assert_close(got, want, rtol=2.5e-7, atol=1e-9)
    assert (want != 0).sum() == (got != 0).sum()


class _CountOps(TorchDispatchMode):
    """Counts the tensor ops that are not views, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:  # a view changes metadata only: no launch
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fp16", [False, True])
def test_launches_do_not_grow_with_the_batch(fp16: bool) -> None:
    """A chunk of 3 or of 24 landscape images of different sizes costs the same tensor ops (one `cat`, one
    gather, two matmuls, …): none runs once per image."""
    counts = []
    for n in (3, 24):
        images, sizes, tops = _batch([(40 + i, 60 + 2 * i) for i in range(n)], short=32, crop=28)
        with _CountOps() as mode:
            br.resize_crop(images, sizes, tops, (28, 28), "bicubic", fp16=fp16)
        counts.append(mode.ops)
    assert counts[0] == counts[1], counts[1] - counts[0]
    assert sum(counts[1].values()) < 100, counts[1]  # 82 here: the weights' arithmetic, mostly


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twin: test_fp16_row_pass_is_within_float_rounding_of_fp32",
)
def test_cuda_resize_matches_the_cpu_fp32_resize() -> None:
    """On CUDA the row pass runs on fp16 tensor cores (fp32 accumulation and output, `bmm(out_dtype=)`):
    within float rounding of the CPU's fp32 resize, in levels before the final rounding."""
    images, sizes, tops = _batch(SHAPES)
    cpu = br.resize_crop(images, sizes, tops, (40, 40), "bicubic", fp16=False)
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default: the column pass in fp32
    cuda = br.resize_crop([x.cuda() for x in images], sizes, tops, (40, 40), "bicubic").cpu()
    assert (cuda - cpu).abs().max() <= 1e-3, (cuda - cpu).abs().max()
