"""BatchTopK's θ under DDP: every rank keeps the same threshold, learnt from all ranks' batches."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_ddp_ranks_keep_the_same_threshold(arch: str, tmp_path: Path) -> None:
    """strategy='ddp' over gloo, each rank reading other rows: θ and every weight equal on both ranks (each
    rank's own batch minimum let θ drift apart, and the exported SAE held rank 0's)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(
        textwrap.dedent(f"""
        import lightning as L, torch
        from mmsae.trainer import SAEDataModule, SAEModule, SAESpec
        torch.set_num_threads(1)
        x = torch.randn(4096, 8)
        module = SAEModule([SAESpec("{arch}", n_features=64, k=4)], warmup_steps=2, init_batches=2)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=SAEDataModule(x, tokens=12 * 64, batch_size=32))
        torch.save(module.state_dict(), r"{tmp_path}/rank" + str(trainer.global_rank) + ".pt")
    """)
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=180, capture_output=True, cwd=tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0["saes.0.threshold"] > 0  # θ was learnt
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_one_process_keeps_its_own_value() -> None:
    from mmsae.sae.batchtopk import ranks_mean

    for value in (torch.tensor(0.5), torch.tensor(float("inf"))):
        assert torch.equal(ranks_mean(value), value)
