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
    """Pooled SAE codes of N images over n features.

    Appends are cheap: a batch's selected codes stay on their device (no wait for it) until
    `PENDING_ROWS` rows wait or `csr` is read; they then cross to the host as one CSR block, and the
    blocks are stacked into one matrix when `csr` is read (stacking on every append made building
    quadratic in the number of images).
    """

    PENDING_ROWS = 16384
    """Rows kept on their device before they move to the host (max_per_row × 12 bytes each)."""

    def __init__(self, csr: sp.csr_matrix):
        self._blocks = [csr.astype(np.float32).tocsr()]  # stacked into one when `csr` is read
        self._n_rows = csr.shape[0]  # in the blocks
        self._csc: sp.csc_matrix | None = None
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # flat values, feature ids, rows
        self._n_pending = 0

    @classmethod
    def empty(cls, n_features: int) -> SparseCodeStore:
        return cls(sp.csr_matrix((0, n_features), dtype=np.float32))

    @property
    def n_features(self) -> int:
        return self._blocks[0].shape[1]

    def __len__(self) -> int:
        return self._n_rows + self._n_pending

    @property
    def csr(self) -> sp.csr_matrix:
        """[N, n] float32 CSR: each image's kept codes."""
        self._flush()
        if len(self._blocks) > 1:
            self._blocks = [sp.vstack(self._blocks, format="csr")]
        return self._blocks[0]

    def append(self, codes_Bn: Tensor, max_per_row: int) -> None:
        """Add rows, keeping each image's `max_per_row` largest codes (bounded storage per image)."""
        if codes_Bn.ndim != 2 or codes_Bn.shape[1] != self.n_features:
            raise ValueError(
                f"Codes of shape {tuple(codes_Bn.shape)} do not fit a store of {self.n_features} features."
            )
        # Select on the codes' device: only [B, max_per_row] values and ids will cross to the host.
        kk = min(max_per_row, codes_Bn.shape[1])
        vals_Bk, idx_Bk = codes_Bn.detach().float().topk(kk, dim=1)
        rows_B = torch.arange(self._n_pending, self._n_pending + len(codes_Bn), device=idx_Bk.device)
        self._pending.append((vals_Bk.flatten(), idx_Bk.int().flatten(), rows_B.int().repeat_interleave(kk)))
        self._n_pending += codes_Bn.shape[0]
        self._csc = None
        if self._n_pending >= self.PENDING_ROWS:
            self._flush()

    def _flush(self) -> None:
        """Pending rows → host (one device wait) → one CSR block."""
        if not self._pending:
            return
        vals, cols, rows = (torch.cat(t).cpu() for t in zip(*self._pending))
        keep = vals != 0
        block = sp.csr_matrix(
            (vals[keep].numpy(), (rows[keep].numpy(), cols[keep].numpy())),
            shape=(self._n_pending, self.n_features),
            dtype=np.float32,
        )
        self._blocks.append(block)
        self._n_rows += self._n_pending
        self._pending, self._n_pending = [], 0

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
