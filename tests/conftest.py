"""Shared fixtures. Tests run on CPU with tiny random-init models of the real classes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: tests must never try the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: tiny test tensors lose more to thread hand-off than they gain, above all on 2 cores.
torch.set_num_threads(1)
# Triton kernels run in its interpreter without a GPU; the switch is read once, at triton's first import,
# so it is set here, before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
