"""ConceptIndex: build, the six query kinds, filters, persistence, incremental add, bad input, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.checkpoint import save_sae
from mmsae.index import AnnConfig, ConceptIndex, IndexConfig, cli_main
from mmsae.index.ann import build_ann, describe
from mmsae.sae import build_sae

HOOK = "visual.transformer.resblocks.1"
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "grass", "brick")


@pytest.fixture(scope="module")
def folder(write_photos):
    return write_photos(PHOTOS)


@pytest.fixture(scope="module")
def clip():
    from mmsae.encoders import get_encoder

    torch.manual_seed(0)
    return get_encoder("clip:tiny")


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return build_sae("topk", 32, 64, k=4, hook=HOOK, encoder="clip:tiny")


@pytest.fixture(scope="module")
def index(folder, sae, clip):
    return ConceptIndex.build(clip, sae, folder, cfg=IndexConfig(batch_size=3))


def test_build_records_everything(index, folder) -> None:
    assert len(index) == len(PHOTOS) and index.paths[0] == str(folder / "astronaut.png")
    assert index.embeddings_NE.shape == (8, 32)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings_NE, axis=1), 1, rtol=1e-5)
    assert index.meta["encoder"] == index.meta["embedder"] == "clip:tiny" and index.meta["hook"] == HOOK
    assert index.meta["ann"] == "Flat (exact)" and len(index.names) == 64


def test_image_and_text_search(index, folder, clip) -> None:
    hits = index.search_image(str(folder / "chelsea.png"), k=3)
    assert hits[0].path.endswith("chelsea.png") and hits[0].score == pytest.approx(1, abs=1e-5)
    # a new (non-indexed) PIL image is embedded on the fly and finds its indexed twin
    twin = index.search_image(Image.open(folder / "coffee.png"), k=1)[0]
    assert twin.path.endswith("coffee.png")
    hits = index.search_text("a photo of a cat", k=4)
    text = clip.encode_text(["a photo of a cat"])[0].detach().numpy()
    expected = np.argsort(-(index.embeddings_NE @ text))[:4]
    assert [h.id for h in hits] == expected.tolist()
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_features_and_images_of(index, folder) -> None:
    feats = index.features_of(2, k=64)
    assert feats and sum(f.contribution for f in feats) == pytest.approx(1, rel=1e-5)
    assert [f.contribution for f in feats] == sorted((f.contribution for f in feats), reverse=True)
    # the same image given as a PIL image is re-encoded and must give the stored codes
    fresh = index.features_of(Image.open(folder / "camera.png"), k=64)
    assert [(f.feature, round(f.activation, 4)) for f in fresh] == [
        (f.feature, round(f.activation, 4)) for f in feats
    ]
    top = feats[0].feature
    hits = index.images_of(top, k=10)
    assert 2 in [h.id for h in hits] and [h.score for h in hits] == sorted(
        (h.score for h in hits), reverse=True
    )
    for h in hits:
        assert top in {f.feature for f in index.features_of(h.id, k=64)}
    heat = index.heatmap(2, top)
    assert heat.shape == (4, 4) and heat.max() == pytest.approx(feats[0].activation, rel=1e-5)


def test_concept_filtered_search(index) -> None:
    f = index.features_of(0, k=1)[0].feature
    on = {h.id for h in index.images_of(f, k=100)}
    with_f = index.search_image(0, k=8, with_features=[f])
    assert {h.id for h in with_f} == on
    without_f = index.search_image(0, k=8, without_features=[f])
    assert {h.id for h in without_f} == set(range(8)) - on
    assert index.search_text("x", k=8, with_features=[f], without_features=[f]) == []


def test_text_to_features_through_text_tower(clip) -> None:
    """SAE on the final embedding with atoms = text embeddings: each text finds its own feature."""
    import skimage.data as skimage  # a dev dependency: missing it must fail, not skip

    from mmsae.analysis.naming import text_embeddings

    words = ["dog", "sailing boat", "violin", "desert"]
    sae = build_sae("topk", 32, 4, k=1, hook="visual", encoder=clip.id)
    with torch.no_grad():
        sae.W_dec.copy_(text_embeddings(clip, words))
    idx = ConceptIndex.build(clip, sae, [Image.fromarray(skimage.astronaut())], vocab=words)
    for j, word in enumerate(words):
        assert idx.search_features(f"a photo of {word}.", k=1)[0].feature == j
        assert idx.feature_name(j) == word


def test_save_load_and_incremental_add(tmp_path, index, folder, sae, clip) -> None:
    path = tmp_path / "idx"
    index.save(path)
    index.save(path)  # overwrite is atomic: old directory swapped out, no temp dirs left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    loaded = ConceptIndex.load(path, encoder=clip)
    assert loaded.search_text("a cat", k=5) == index.search_text("a cat", k=5)
    assert loaded.features_of(3) == index.features_of(3)
    assert loaded.names == index.names

    files = sorted(folder.glob("*.png"))
    part = ConceptIndex.build(clip, sae, files[:5])
    assert part.add(files[5:]) == 3
    np.testing.assert_allclose(part.embeddings_NE, index.embeddings_NE, atol=1e-6)
    np.testing.assert_allclose(part.codes.csr.toarray(), index.codes.csr.toarray(), atol=1e-5)
    for a, b in (
        (part.images_of(7), index.images_of(7)),
        (part.search_image(6, k=8), index.search_image(6, k=8)),
    ):
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)


def test_ann_kinds_recall() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16)).astype(np.float32)
    x = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:50] + 0.01
    _, truth = build_ann(x, AnnConfig(kind="flat")).search(q, 10)
    assert describe(build_ann(x, AnnConfig(exact_below=5000))) == "Flat (exact)"
    for cfg in (AnnConfig(exact_below=1000, nprobe=8), AnnConfig(kind="hnsw")):
        ann = build_ann(x, cfg)
        _, found = ann.search(q, 10)
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
        assert recall >= 0.9, (describe(ann), recall)
    assert describe(build_ann(x, AnnConfig(exact_below=1000))).startswith("IVF54,")  # √N lists
    assert describe(build_ann(x, AnnConfig(kind="ivf", nlist=500))).startswith("IVF76,")  # ≥ 39 points a list


def test_bad_input(tmp_path, folder, sae, clip) -> None:
    from mmsae.datasets.images import ImageReadError

    with pytest.raises(ValueError, match="collection is empty"):
        ConceptIndex.build(clip, sae, [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ConceptIndex.build(clip, sae, tmp_path / "nope")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = [folder / "chelsea.png", broken]
    with pytest.raises(ImageReadError, match=r"broken\.png.*skip_unreadable=True"):
        ConceptIndex.build(clip, sae, good)
    idx = ConceptIndex.build(clip, sae, good, cfg=IndexConfig(skip_unreadable=True))
    assert len(idx) == 1 and idx.skipped == [str(broken)]

    wide = build_sae("topk", 48, 64, k=4, hook=HOOK)
    with pytest.raises(ValueError, match="expects d_in=48"):
        ConceptIndex.build(clip, wide, good[:1])
    with pytest.raises(ValueError, match="trained on 'timm:test_vit'"):
        ConceptIndex.build(clip, build_sae("topk", 32, 8, k=2, encoder="timm:test_vit"), good[:1])

    with pytest.raises(FileNotFoundError, match="build one first"):
        ConceptIndex.load(tmp_path / "never-built")
    idx.save(tmp_path / "idx")
    from mmsae.encoders import get_encoder

    with pytest.raises(ValueError, match="built with encoder 'clip:tiny', got 'timm:test_vit'"):
        ConceptIndex.load(tmp_path / "idx", encoder=get_encoder("timm:test_vit"))
    with pytest.raises(ValueError, match="n_features=64; got d_in=48"):
        ConceptIndex.load(tmp_path / "idx", sae=wide)
    no_models = ConceptIndex.load(tmp_path / "idx")
    assert no_models.images_of(int(no_models.codes.csr.indices[0]))  # sparse queries need no model
    with pytest.raises(RuntimeError, match="embedder=get_encoder"):
        no_models.search_text("cat")
    with pytest.raises(IndexError, match="64 features"):
        no_models.images_of(64)
    with pytest.raises(IndexError, match="holds 1 images"):
        no_models.features_of(5)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (("meta.json", b"{garbage"), r"meta\.json: not valid JSON"),
        (("meta.json", b"[1, 2]"), r"meta\.json: holds a JSON list, expected a dict"),
        (("faiss.index", b"\x00" * 64), r"faiss\.index: not a readable FAISS index"),
        (("paths.json", b'["only-one.png"]'), r"disagree on the number of images \(paths\.json: 1, "),
        (("paths.json", b"[1, 2, 3, 4, 5, 6, 7, 8]"), r"paths\.json: entry 0 is 1, not a path string"),
        (("embeddings.npy", b"not numpy"), r"embeddings\.npy: not a readable NumPy array"),
        (("features.json", b"[[]]"), r"features\.json: 1 name lists for an SAE of 64 features"),
    ],
)
def test_damaged_index_files_are_named_with_the_fix(tmp_path, index, damage, message) -> None:
    """Each used to surface as a bare JSONDecodeError, FAISS's C++ error, or an IndexError in search."""
    from mmsae.index.files import IndexFileError

    index.save(tmp_path / "idx")
    (tmp_path / "idx" / damage[0]).write_bytes(damage[1])
    with pytest.raises(IndexFileError, match=message + r".*Rebuild the index"):
        ConceptIndex.load(tmp_path / "idx")


def test_result_counts_must_be_positive(index) -> None:
    """k=-2 used to reach torch.topk (raw error) or slice results from the end (silently wrong)."""
    for query in (
        lambda k: index.search_features("a cat", k=k),
        lambda k: index.images_of(0, k=k),
        lambda k: index.features_of(0, k=k),
        lambda k: index.search_image(0, k=k),
    ):
        for k in (-2, 0):
            with pytest.raises(ValueError, match=r"k \(the number of results\) must be a positive integer"):
                query(k)


def test_unreadable_query_image_names_the_file_without_build_options(tmp_path, index) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: not an image file") as info:
        index.search_image(str(broken))
    assert "skip_unreadable" not in str(info.value)  # search_image has no such parameter


def test_cli_build_and_query(tmp_path, folder, sae, capsys) -> None:
    save_sae(sae, tmp_path / "sae")
    out = tmp_path / "idx"
    assert cli_main(["query", "--index", str(out), "--feature", "0"]) == 2
    assert "build one first" in capsys.readouterr().err

    torch.manual_seed(0)  # clip:tiny is random-init: same seed at build and query gives the same model
    assert (
        cli_main(["build", "--images", str(folder), "--sae", str(tmp_path / "sae"), "--out", str(out)]) == 0
    )
    capsys.readouterr()
    chelsea = str(folder / "chelsea.png")
    assert cli_main(["query", "--index", str(out), "--image", chelsea, "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == chelsea and set(hits[0]) == {"id", "path", "score"}
    assert cli_main(["query", "--index", str(out), "--features-of", chelsea, "-k", "3", "--json"]) == 0
    feats = json.loads(capsys.readouterr().out)
    assert len(feats) == 3
    assert cli_main(["query", "--index", str(out), "--feature", str(feats[0]["feature"]), "--json"]) == 0
    assert chelsea in [h["path"] for h in json.loads(capsys.readouterr().out)]
    torch.manual_seed(0)
    assert cli_main(["query", "--index", str(out), "--text", "a cat", "-k", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
