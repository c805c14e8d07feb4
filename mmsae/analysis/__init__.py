"""Feature analysis: statistics pass, monosemanticity, concept naming, heatmaps and dashboards."""

from mmsae.analysis.heatmap import latent_heatmaps
from mmsae.analysis.monosemanticity import (
    MonosemanticityAccumulator,
    monosemanticity,
    monosemanticity_pairwise,
)
from mmsae.analysis.naming import NameCandidate, load_vocabulary, name_features
from mmsae.analysis.stats import FeatureStats, StatsConfig, TopExamples, feature_stats

__all__ = [
    "FeatureStats",
    "MonosemanticityAccumulator",
    "NameCandidate",
    "StatsConfig",
    "TopExamples",
    "feature_stats",
    "latent_heatmaps",
    "load_vocabulary",
    "monosemanticity",
    "monosemanticity_pairwise",
    "name_features",
]
