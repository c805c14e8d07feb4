"""Training: `SAEModule` (Lightning), `SAEDataModule` (activations → fixed-budget batches), `train()`."""

from mmsae.trainer.api import default_precision, train
from mmsae.trainer.data import SAEDataModule, as_source
from mmsae.trainer.module import SAEModule, SAESpec

__all__ = ["SAEDataModule", "SAEModule", "SAESpec", "as_source", "default_precision", "train"]
