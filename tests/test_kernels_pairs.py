"""`kernels.pair_keys` and `kernels.gather_pairs` (the top-k merge's ordering of a chunk's pairs): the Triton
path against the torch reference, and the keys' order against two stable float sorts. Without CUDA the
kernels run in Triton's interpreter."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmsae import kernels
from mmsae.kernels import reference, triton_pairs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def special_values(M: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups < 2¹⁶ with the largest one repeated, bf16 values with ±inf, ±0 and NaNs of both signs)."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(M, generator=g) * 100).bfloat16()
    v[::7] = -math.inf
    v[1::11] = -0.0
    v[2::13] = 0.0
    v[3::17] = math.inf
    v[4::19] = torch.tensor(0x7FC0, dtype=torch.int16).view(torch.bfloat16)
    v[5::23] = torch.tensor(-0x40, dtype=torch.int16).view(torch.bfloat16)
    v[6::29] = v[8::29][: v[6::29].numel()]  # equal values in one group: a stable sort keeps their order
    grp = torch.randint(0, 2**16, (M,), generator=g)
    grp[:50] = 2**16 - 1
    grp[6::29] = grp[8::29][: grp[6::29].numel()]
    return grp.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("M", [0, 1, 3000])
def test_pair_keys_kernel_equals_the_reference(M: int) -> None:
    """Bit for bit, a ragged last block and empty input included."""
    grp, v = special_values(M, 0)
    assert torch.equal(triton_pairs.pair_keys(grp, v), reference.pair_keys(grp, v))


@pytest.mark.usefixtures("triton_backend")
def test_pair_keys_order_like_two_stable_sorts() -> None:
    """On the Triton path, a stable sort of the keys orders by group, then value descending, NaNs of either
    sign first, as two stable float sorts on the CPU do (values equal as floats; ±0 and NaNs compare equal).
    The CPU's sorts are the reference: CUDA's descending float sort places NaNs elsewhere."""
    from mmsae.analysis.stats_ops import group_then_descending

    grp, v = special_values(3000, 1)
    fast = group_then_descending(grp, v.float(), 2**16, v).cpu()
    grp, v = grp.cpu(), v.cpu()
    slow = group_then_descending(grp, v.float(), 2**31)  # two stable sorts
    assert torch.equal(grp[fast], grp[slow]) and (grp[fast][1:] >= grp[fast][:-1]).all()
    torch.testing.assert_close(v[fast], v[slow], rtol=0, atol=0, equal_nan=True)


def test_pair_keys_refuse_other_dtypes() -> None:
    with pytest.raises(ValueError, match="bf16 values"):
        kernels.pair_keys(torch.zeros(3, dtype=torch.long), torch.zeros(3))


@pytest.mark.parametrize("per_row", [1, 32, 5])
def test_gather_pairs_kernel_equals_the_reference(per_row: int) -> None:
    """Groups, float32 values (NaNs keep their bits) and token rows in the given order."""
    grp, v = special_values(3000, 2)
    order = torch.randperm(3000, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = triton_pairs.gather_pairs(order, grp, v, per_row)
    want = reference.gather_pairs(order, grp, v, per_row)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert torch.equal(got[1].view(torch.int32), want[1].view(torch.int32))
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.int64
