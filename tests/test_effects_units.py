"""The pieces of logit naming, classifier search and classifier unlearning, on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from mmsae.analysis.logit_naming import features_named, label_agreement, logit_names
from mmsae.analysis.naming import NameCandidate
from mmsae.index.classifier import match_class, named_features
from mmsae.intervene.classifier import Block, block_edits, select_from_means
from mmsae.intervene.edits import EditContext
from mmsae.sae import TopKConfig, TopKSAE

CLASSES = ["tabby", "Egyptian cat", "espresso", "coffee mug"]


def names_of(*rows: tuple[str, ...]) -> list[list[NameCandidate]]:
    return [[NameCandidate(n, 10.0 - r) for r, n in enumerate(row)] for row in rows]


def test_logit_names_rank_classes_by_logit_increase_and_leave_dead_features_unnamed() -> None:
    effects = torch.tensor([[0.0, 1.0, 3.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    names = logit_names(effects, CLASSES, top=2, live=torch.tensor([True, False]))
    assert [c.name for c in names[0]] == ["espresso", "coffee mug"] and names[1] == []
    with pytest.raises(ValueError, match="4 classes but 3 class names"):
        logit_names(effects, CLASSES[:3])


def test_features_named_finds_first_names_strongest_first() -> None:
    names = names_of(("espresso", "cup"), ("cup", "espresso"), ("Espresso",))
    names[2][0].score = 20.0
    assert features_named(names, "espresso") == [2, 0]
    assert features_named(names, "espresso", rank=2) == [2, 0, 1]
    assert named_features(names, "espresso", rank=1) == [(0, 10.0)]  # the index matches exact names


def test_label_agreement_counts_features_whose_name_is_the_majority_label_of_their_top_images() -> None:
    names = names_of(("espresso",), ("tabby",), ("espresso",))
    pooled = torch.tensor([[3.0, 0.0, 1.0], [2.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    labels = [("espresso",), ("espresso", "cup"), ()]  # image 2 is unlabelled
    agree, counted = label_agreement(names, pooled, labels, top_images=2)
    # feature 0: top images 0, 1 → espresso (agrees); feature 1: images 2 (unlabelled), 1 → espresso/cup
    # (named tabby: disagrees); feature 2: image 0 only (activation > 0) → espresso (agrees)
    assert (agree, counted) == (pytest.approx(2 / 3), 3)


def test_match_class_is_case_insensitive_and_refuses_ambiguous_or_unknown_text() -> None:
    assert match_class("egyptian CAT", CLASSES) == "Egyptian cat"
    assert match_class("mug", CLASSES) == "coffee mug"
    with pytest.raises(KeyError, match="matches tabby, Egyptian cat"):
        match_class("a", CLASSES)
    with pytest.raises(KeyError, match="not a class"):
        match_class("zebra", CLASSES)


def test_block_sets_features_above_their_mean_to_a_negative_multiple_of_the_concept_mean() -> None:
    edit = Block(3, mean_concept=2.0, mean_all=0.5, multiplier=-5.0)
    out = edit.apply(torch.tensor([0.0, 0.25, 0.75, 4.0]), EditContext())
    assert out.tolist() == [0.0, 0.25, -10.0, -10.0]


def test_selection_from_means_keeps_features_that_fire_more_on_the_concept() -> None:
    sae = TopKSAE(TopKConfig(d_in=4, n_features=8, k=2, hook="global_pool"))
    concept = torch.tensor([0.0, 5.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    other = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    selection = select_from_means(sae, "global_pool", {"cat": (concept, 4), "": (other, 12)}, 90.0)
    assert selection.concepts["cat"].features[0] == [1]
    (edit,) = block_edits(selection, ["cat"], multiplier=-2.0)
    assert (edit.feature, edit.mean_concept, edit.multiplier) == (1, 5.0, -2.0)
    assert edit.mean_all == pytest.approx(5.0 * 4 / 16)
    with pytest.raises(ValueError, match="must be negative"):
        block_edits(selection, ["cat"], multiplier=1.0)
    with pytest.raises(KeyError, match="Unknown concept"):
        block_edits(selection, ["dog"])
