"""The sparse half of the concept index: pooled SAE codes per image, as CSR rows plus inverted lists.

FAISS has no sparse vectors, so codes live beside it: rows (image → its features) in CSR, and the
transpose in CSC (feature → its images), built lazily and dropped on every append.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from mmsae.fileio import atomic_write_bytes


class SparseCodeStore:
    """Pooled SAE codes of N images over n features."""

    def __init__(self, csr: sp.csr_matrix):
        self.csr = csr.astype(np.float32).tocsr()
        self._csc: sp.csc_matrix | None = None

    @classmethod
    def empty(cls, n_features: int) -> SparseCodeStore:
        return cls(sp.csr_matrix((0, n_features), dtype=np.float32))

    @property
    def n_features(self) -> int:
        return self.csr.shape[1]

    def __len__(self) -> int:
        return self.csr.shape[0]

    def append(self, codes_Bn: Tensor, max_per_row: int) -> None:
        """Add rows, keeping each image's `max_per_row` largest codes (bounded storage per image)."""
        # Select on the codes' device: only [B, max_per_row] values and ids cross to the host, not [B, n].
        kk = min(max_per_row, codes_Bn.shape[1])
        vals, idx = (t.cpu() for t in codes_Bn.detach().float().topk(kk, dim=1))
        keep = vals != 0
        rows = torch.arange(codes_Bn.shape[0])[:, None].expand_as(idx)[keep]
        block = sp.csr_matrix(
            (vals[keep].numpy(), (rows.numpy(), idx[keep].numpy())),
            shape=tuple(codes_Bn.shape),
            dtype=np.float32,
        )
        self.csr = sp.vstack([self.csr, block], format="csr")
        self._csc = None

    @property
    def csc(self) -> sp.csc_matrix:
        if self._csc is None:
            self._csc = self.csr.tocsc()
        return self._csc

    def row(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """(feature ids, values) of one image."""
        r = self.csr.getrow(image)
        return r.indices, r.data

    def column(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, values) where `feature` is on, best first."""
        c = self.csc
        lo, hi = c.indptr[feature], c.indptr[feature + 1]
        ids, vals = c.indices[lo:hi], c.data[lo:hi]
        order = np.argsort(-vals, kind="stable")
        return ids[order], vals[order]

    def images_with(self, feature: int) -> np.ndarray:
        c = self.csc
        return c.indices[c.indptr[feature] : c.indptr[feature + 1]]

    def top_per_feature(self, m: int) -> tuple[Tensor, Tensor]:
        """Each feature's top-m images as ([m, n] values, [m, n] ids with −1 for empty slots)."""
        values = torch.zeros(m, self.n_features)
        ids = torch.full((m, self.n_features), -1, dtype=torch.long)
        for j in range(self.n_features):
            img, val = self.column(j)
            values[: len(img[:m]), j] = torch.from_numpy(val[:m])
            ids[: len(img[:m]), j] = torch.from_numpy(img[:m].astype(np.int64))
        return values, ids

    def save(self, path: Path) -> None:
        import io

        buf = io.BytesIO()
        sp.save_npz(buf, self.csr, compressed=False)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> SparseCodeStore:
        return cls(sp.load_npz(path))
