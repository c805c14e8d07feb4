"""Where pretrained weights come from, and the one error message for when they are missing offline."""

from __future__ import annotations

import os


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally and could not be downloaded."""


def hf_cache_dir() -> str:
    """The Hugging Face cache the hub clients read (HF_HUB_CACHE, else HF_HOME/hub)."""
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def weights_error(spec: str, source: str, err: BaseException) -> WeightsUnavailableError:
    """A clear error saying how to supply weights for `spec` (loaded from `source`)."""
    return WeightsUnavailableError(
        f"Could not load pretrained weights for {spec!r} from {source!r}: {type(err).__name__}: {err}\n"
        "Without network access, supply the weights in one of these ways:\n"
        f"  1. a local path: get_encoder('{spec.split(':', 1)[0]}:/path/to/weights-or-model-dir');\n"
        f"  2. the Hugging Face cache: run `huggingface-cli download {source}` on a machine with internet "
        f"and copy the cache to {hf_cache_dir()} (set HF_HOME to point elsewhere);\n"
        "  3. for tests and demos, pretrained=False builds the same architecture with random weights."
    )
