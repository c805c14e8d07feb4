"""Feature analysis: statistics pass, monosemanticity, concept naming, heatmaps, object localization and
dashboards."""

from mmsae.analysis.heatmap import feature_heatmaps, patch_codes
from mmsae.analysis.localization import energy_in_box, localization_scores
from mmsae.analysis.monosemanticity import (
    MonosemanticityAccumulator,
    monosemanticity,
    monosemanticity_pairwise,
)
from mmsae.analysis.naming import NameCandidate, load_vocabulary, name_features
from mmsae.analysis.objects import OBJECT_BOXES, ObjectBox, PhotoList
from mmsae.analysis.stats import FeatureStats, StatsConfig, TopExamples, feature_stats
from mmsae.legacy_names import module_getattr

__all__ = [
    "OBJECT_BOXES",
    "FeatureStats",
    "MonosemanticityAccumulator",
    "NameCandidate",
    "ObjectBox",
    "PhotoList",
    "StatsConfig",
    "TopExamples",
    "energy_in_box",
    "feature_heatmaps",
    "feature_stats",
    "load_vocabulary",
    "localization_scores",
    "monosemanticity",
    "monosemanticity_pairwise",
    "name_features",
    "patch_codes",
]

__getattr__ = module_getattr(__name__)  # old public names (mmsae.legacy_names)
