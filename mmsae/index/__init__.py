"""Concept index: FAISS over CLIP image embeddings + sparse SAE codes per image + named features.

`ConceptIndex.build(encoder, sae, images)` then `.search_text`, `.search_image`, `.features_of`,
`.images_of`, `.search_features`; `mmsae index build|query` on the command line (`cli_main`).
"""

from mmsae.index.ann import AnnConfig
from mmsae.index.cli import cli_main
from mmsae.index.concept_index import ConceptIndex, FeatureContribution, FeatureHit, ImageHit, IndexConfig

__all__ = [
    "AnnConfig",
    "ConceptIndex",
    "FeatureContribution",
    "FeatureHit",
    "ImageHit",
    "IndexConfig",
    "cli_main",
]
