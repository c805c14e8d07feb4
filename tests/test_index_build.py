"""Building the concept index fast: extraction's input path (workers, decode modes), pooling from sparse
pairs, codes kept on the device until read; each with the results of the one-image-at-a-time build."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from PIL import Image

from mmsae.analysis.images import pooled_codes, stack_pixels
from mmsae.datasets.images import ImageList, open_image
from mmsae.encoders.base import TokenActs
from mmsae.index import ConceptIndex, IndexConfig
from mmsae.index.codes import SparseCodeStore
from mmsae.index.inputs import _aligned, index_batches
from mmsae.inputs import InputBatch
from mmsae.sae import SparseCodes, as_dense, build_sae

HOOK = "visual.transformer.resblocks.1"
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "grass")


@pytest.fixture(scope="module")
def folder(write_photos):
    root = write_photos(PHOTOS)
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def clip():
    from mmsae.encoders import get_encoder

    torch.manual_seed(0)
    return get_encoder("clip:tiny")


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return build_sae("abstopk", 32, 64, k=4, hook=HOOK, encoder="clip:tiny")


def _dense_pool(sae, acts: TokenActs, n_examples: int, pool: str) -> torch.Tensor:
    """The pooling as it was: dense [N, n] codes, scatter max / bincount mean."""
    codes_Nn = as_dense(sae.encode(acts.acts_ND)).float()
    ids = acts.meta["example_id"]
    out = torch.zeros(n_examples, sae.n_features)
    if pool == "max":
        return out.scatter_reduce_(0, ids[:, None].expand_as(codes_Nn), codes_Nn, "amax", include_self=False)
    return out.index_add_(0, ids, codes_Nn) / torch.bincount(ids, minlength=n_examples).clamp_min(1)[:, None]


def _one_by_one(clip, sae, items, cfg: IndexConfig):
    """Reference: the build as it read images, one PIL image at a time, in the main process."""
    codes, embeddings, paths = SparseCodeStore.empty(sae.n_features), [], []
    for start in range(0, len(items), cfg.batch_size):
        batch = items[start : start + cfg.batch_size]
        pil, labels = [], []
        for offset, item in enumerate(batch):
            try:
                pil.append(open_image(item))
            except ValueError:
                continue
            labels.append(str(item) if not isinstance(item, Image.Image) else f"<image {start + offset}>")
        with torch.no_grad():
            acts = clip.activations(stack_pixels(clip, pil), [HOOK], tokens=cfg.tokens)[HOOK]
            codes.append(_dense_pool(sae, acts, len(pil), cfg.pool), cfg.max_codes_per_image)
            emb = clip.encode_image(stack_pixels(clip, pil), normalize=True).float()
        embeddings.append(emb.numpy())
        paths += labels
    return codes.csr, np.concatenate(embeddings), paths


@pytest.mark.parametrize(
    "num_workers,pool,tokens", [(0, "max", "cls"), (2, "mean", "all"), (1, "max", "all")]
)
def test_build_through_loader_workers_equals_the_one_by_one_build(
    folder, clip, sae, num_workers: int, pool: str, tokens: str
) -> None:
    items = [*sorted(folder.iterdir()), Image.open(folder / "coins.png").convert("L")]
    cfg = IndexConfig(batch_size=3, tokens=tokens, pool=pool, num_workers=num_workers, skip_unreadable=True)
    index = ConceptIndex.build(clip, sae, items, cfg=cfg)
    csr, embeddings, paths = _one_by_one(clip, sae, items, cfg)
    assert index.paths == paths and index.paths[-1] == "<image 8>"
    assert index.skipped == [str(folder / "broken.jpg")]
    np.testing.assert_allclose(index.embeddings_NE, embeddings, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(index.codes.csr.toarray(), csr.toarray(), rtol=1e-5, atol=1e-6)
    if tokens == "cls" or pool == "mean":
        assert (index.codes.csr.toarray() < 0).any()  # signed (AbsTopK) codes pooled


def test_unreadable_file_fails_the_build_with_its_name(folder, clip, sae) -> None:
    with pytest.raises(ValueError, match=r"broken\.jpg: .*skip_unreadable=True"):
        ConceptIndex.build(clip, sae, folder, cfg=IndexConfig(batch_size=4, num_workers=1))


def test_an_embedder_with_other_preprocessing_reads_its_own_pixels(folder, sae) -> None:
    from mmsae.encoders import get_encoder

    torch.manual_seed(0)
    vit, clip = get_encoder("timm:test_vit"), get_encoder("clip:tiny")
    vit_sae = build_sae("topk", 64, 48, k=4, hook="blocks.4")
    files = ImageList(sorted(folder.glob("*.png"))[:4])
    batches = list(index_batches(vit, clip, files, batch_size=3))
    assert [b.indices for b in batches] == [[0, 1, 2], [3]]
    pil = [open_image(p) for p in files.images[:3]]
    assert torch.equal(batches[0].pixels, stack_pixels(vit, pil))
    assert torch.equal(batches[0].embed_pixels, stack_pixels(clip, pil))
    index = ConceptIndex.build(vit, vit_sae, list(files.images), embedder=clip, cfg=IndexConfig(batch_size=3))
    expected = clip.encode_image(stack_pixels(clip, [open_image(p) for p in files.images]), normalize=True)
    np.testing.assert_allclose(index.embeddings_NE, expected.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_batch_read_twice_keeps_the_images_both_reads_decoded() -> None:
    px_a, px_b = torch.arange(3.0)[:, None], torch.arange(10.0, 13.0)[:, None]
    err5 = {"index": 5, "source": "x.jpg", "reason": "truncated"}
    err6 = {"index": 6, "source": "y.jpg", "reason": "truncated"}
    got = _aligned(InputBatch([4, 6, 7], px_a, [err5]), InputBatch([4, 5, 7], px_b, [err6, err5]))
    assert got.indices == [4, 7] and got.skipped == [err5, err6]
    assert got.pixels.flatten().tolist() == [0.0, 2.0] and got.embed_pixels.flatten().tolist() == [10.0, 12.0]


# ---------------------------------------------------------------- pooling from sparse pairs
def _acts(n_tokens: int, ids: list[int], d: int = 8) -> TokenActs:
    g = torch.Generator().manual_seed(3)
    return TokenActs(torch.randn(n_tokens, d, generator=g), {"example_id": torch.tensor(ids)})


@pytest.mark.parametrize("arch", ["topk", "abstopk", "relu"])
@pytest.mark.parametrize("pool", ["max", "mean"])
def test_sparse_pooling_equals_dense_pooling(arch: str, pool: str) -> None:
    torch.manual_seed(0)
    kwargs = {"k": 3} if arch != "relu" else {}
    sae = build_sae(arch, 8, 6, **kwargs)  # few features: many are on at every token of an example
    # one-token examples (codes pool as they are), examples of 2 and 20 tokens, an example with none (23)
    acts = _acts(40, [*range(16), *[16, 17] * 2, *[20, 21] * 10])
    got, expected = pooled_codes(sae, acts, 23, pool), _dense_pool(sae, acts, 23, pool)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    if arch == "abstopk" and pool == "max":
        assert (got < 0).any()  # a feature negative at every token of an example pools negative


def test_sparse_pooling_is_signed_where_every_token_is_negative() -> None:
    sae = build_sae("abstopk", 4, 3, k=1)
    codes = SparseCodes(torch.tensor([[-2.0], [-1.0], [-3.0], [5.0]]), torch.tensor([[0], [0], [0], [1]]), 3)
    sae.encode = lambda x: codes  # the pooling of given codes
    acts = TokenActs(torch.zeros(4, 4), {"example_id": torch.tensor([0, 0, 1, 1])})
    # example 0: feature 0 at both tokens (max −1); example 1: feature 0 at one token only (max with 0)
    expected = torch.tensor([[-1.0, 0, 0], [0, 5, 0]])
    assert torch.equal(pooled_codes(sae, acts, 2, "max"), expected)
    assert torch.equal(pooled_codes(sae, acts, 2, "mean"), torch.tensor([[-1.5, 0, 0], [-1.5, 2.5, 0]]))


def test_sparse_pooling_never_builds_dense_codes(monkeypatch) -> None:
    """The [tokens, n] dense codes were 1.6 GB for 64 images × 197 tokens × 32768 features."""
    sae = build_sae("topk", 8, 6, k=2)
    monkeypatch.setattr(SparseCodes, "dense", lambda self: pytest.fail("dense codes built"))
    pooled_codes(sae, _acts(10, [0] * 5 + [1] * 5), 2, "max")
    pooled_codes(sae, _acts(10, [0] * 5 + [1] * 5), 2, "mean")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twins: test_sparse_pooling_equals_dense_pooling, test_appends_stack_once",
)
def test_pooling_and_appending_never_wait_for_the_device() -> None:
    sae = build_sae("topk", 64, 512, k=8).cuda()
    acts = TokenActs(
        torch.randn(64 * 50, 64, device="cuda"), {"example_id": torch.arange(64, device="cuda").repeat(50)}
    )
    store = SparseCodeStore.empty(512)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for pool in ("max", "mean"):
            store.append(pooled_codes(sae, acts, 64, pool), max_per_row=16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(store) == 128 and store.csr.shape == (128, 512)


# ---------------------------------------------------------------- the code store
def test_appends_stack_once(monkeypatch) -> None:
    """Stacking the whole matrix on every append made a build quadratic in the images."""
    calls = []
    vstack = sp.vstack
    monkeypatch.setattr(sp, "vstack", lambda *a, **k: calls.append(1) or vstack(*a, **k))
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 30, generator=g) * (torch.rand(4, 30, generator=g) < 0.3) for _ in range(50)]
    store = SparseCodeStore.empty(30)
    for b in batches:
        store.append(b, max_per_row=5)
    assert len(store) == 200 and len(calls) == 0
    reference = torch.cat(batches)
    top = reference.topk(5, dim=1)
    expected = torch.zeros_like(reference).scatter_(1, top.indices, top.values)
    np.testing.assert_array_equal(store.csr.toarray(), expected.numpy())
    assert len(calls) <= 1


def test_reads_between_appends_see_every_row(monkeypatch) -> None:
    monkeypatch.setattr(SparseCodeStore, "PENDING_ROWS", 5)  # some appends move rows to the host
    store = SparseCodeStore.empty(6)
    rows = []
    for i in range(7):
        block = torch.zeros(3, 6)
        block[:, i % 6] = i + 1.0
        block[1] = 0  # an image where nothing fired
        store.append(block, max_per_row=2)
        rows.append(block)
        assert store.csr.shape == (3 * (i + 1), 6) and store.column(i % 6)[1][0] == i + 1
    np.testing.assert_array_equal(store.csr.toarray(), torch.cat(rows).numpy())
    assert math.isclose(store.csc.sum(), float(torch.cat(rows).sum()))


@pytest.mark.parametrize("decode", ["draft", "device"])
def test_decode_modes_index_the_same_images(tmp_path, folder, clip, sae, decode: str) -> None:
    """decode='draft' / 'device' give pixels within a few levels of PIL's: nearly the same embeddings."""
    for name in PHOTOS[:4]:
        Image.open(folder / f"{name}.png").save(tmp_path / f"{name}.jpg", quality=95)
    (tmp_path / "coins.png").write_bytes((folder / "coins.png").read_bytes())  # not a JPEG: PIL path
    pil = ConceptIndex.build(clip, sae, tmp_path, cfg=IndexConfig(batch_size=2))
    other = ConceptIndex.build(
        clip, sae, tmp_path, cfg=IndexConfig(batch_size=2, decode=decode, num_workers=1)
    )
    assert other.paths == pil.paths and len(other) == 5
    cosine = (other.embeddings_NE * pil.embeddings_NE).sum(1)
    assert cosine.min() > 0.99


def test_cli_build_takes_workers_and_decode(tmp_path, folder, sae, capsys) -> None:
    from mmsae.checkpoint import save_sae
    from mmsae.index import cli_main

    save_sae(sae, tmp_path / "sae")
    argv = ["build", "--images", str(folder), "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "idx")]
    assert cli_main([*argv, "--num-workers", "1", "--decode", "draft", "--skip-unreadable"]) == 0
    meta = ConceptIndex.load(tmp_path / "idx").meta
    assert meta["config"]["num_workers"] == 1 and meta["config"]["decode"] == "draft"
    assert meta["n_images"] == len(PHOTOS) and "broken.jpg" in capsys.readouterr().err


def test_fp8_encode_is_used_for_the_codes_and_checked(folder, clip, sae, monkeypatch) -> None:
    """`IndexConfig(encode="fp8")` computes the SAE codes inside one `kernels.fp8_encode()` context per build
    (the weights are quantised once; on the CPU the exact encode still runs there, so the index equals the
    exact one); an unknown mode is refused by name."""
    import contextlib

    from mmsae.kernels import candidates

    entered = []
    real = candidates.fp8_encode

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        entered.append(1)
        with real(*args, **kwargs) as state:
            yield state

    monkeypatch.setattr(candidates, "fp8_encode", recording)
    images = sorted(p for p in folder.iterdir() if p.name != "broken.jpg")
    exact = ConceptIndex.build(clip, sae, images, cfg=IndexConfig(batch_size=4))
    assert not entered
    fp8 = ConceptIndex.build(clip, sae, images, cfg=IndexConfig(batch_size=4, encode="fp8"))
    assert len(entered) == 1 and len(images) > 4  # one context for several batches
    np.testing.assert_array_equal(fp8.codes.csr.toarray(), exact.codes.csr.toarray())
    with pytest.raises(ValueError, match=r"IndexConfig\.encode"):
        IndexConfig(encode="int8")
