"""An offline CLIP BPE tokenizer for the tiny presets, built from open_clip's bundled vocabulary.

The hub tokenizers of SD / LLaVA cannot be downloaded here; the first merges of CLIP's own BPE give a real
`CLIPTokenizer` whose ids fit a tiny text model's vocabulary.
"""

from __future__ import annotations

import gzip

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def tiny_clip_tokenizer(vocab_size: int = 1000, model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP's byte-level BPE truncated to `vocab_size` ids (256 bytes × 2 + merges + 2 specials)."""
    n_merges = vocab_size - 2 * 256 - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {2 * 256 + len(SPECIAL_TOKENS)}, got {vocab_size}.")
    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 1 + n_merges]  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in merges), *SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=model_max_length)
