"""The concept index's sparse code store: per-image selection happens before the codes leave the device."""

from __future__ import annotations

import numpy as np
import torch

from mmsae.index.codes import SparseCodeStore


def test_append_keeps_each_rows_largest_nonzero_codes() -> None:
    g = torch.Generator().manual_seed(0)
    codes_Bn = torch.rand(6, 40, generator=g) * (torch.rand(6, 40, generator=g) < 0.2)
    codes_Bn[3] = 0  # an image where nothing fired
    store = SparseCodeStore.empty(40)
    store.append(codes_Bn.to(torch.bfloat16), max_per_row=3)
    store.append(codes_Bn, max_per_row=50)
    assert len(store) == 12
    for r in range(6):
        row = codes_Bn[r].to(torch.bfloat16).float()
        expected = sorted(row[row != 0].tolist(), reverse=True)[:3]
        features, values = store.row(r)
        assert sorted(values.tolist(), reverse=True) == expected
        assert np.array_equal(row[features].numpy(), values)
        features, values = store.row(6 + r)  # wide enough to keep every nonzero code
        assert np.array_equal(np.sort(features), codes_Bn[r].nonzero().flatten().numpy())
