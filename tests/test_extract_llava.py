"""LLaVA through extraction: (image, prompt) data sets → `mmsae.extract` / `mmsae extract` → store → SAE.

Tiny random-init `llava:tiny` (3 CLIP vision layers, 16 image features, 2 Llama layers). Expected token
positions come from LLaVA's own processor run on each example alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mmsae
from mmsae import cli
from mmsae.checkpoint import load_sae
from mmsae.datasets import ImagePrompts, PromptList, SkimagePhotos, load_dataset
from mmsae.encoders import get_encoder
from mmsae.encoders.llava import LlavaEncoder, format_prompt
from mmsae.store import ActivationStore

VISION = "model.vision_tower.encoder.layers.1"  # the layer tiny LLaVA reads (its default hook)
LLM = "model.language_model.layers.0"
PROMPTS = ["Describe the image.", "What is shown here, in a few more words than that?"]
N_IMAGE_TOKENS = 16  # (32 / 8)² patches; the "default" strategy drops CLS


@pytest.fixture(scope="module")
def enc() -> LlavaEncoder:
    return get_encoder("llava:tiny")


@pytest.fixture(scope="module")
def pairs() -> ImagePrompts:
    return ImagePrompts(SkimagePhotos(["astronaut", "camera", "chelsea"]), PROMPTS)


def _ids(enc: LlavaEncoder, pairs: ImagePrompts, index: int) -> torch.Tensor:
    """input_ids of one example processed alone (no padding)."""
    example = pairs[index]
    inputs = enc.processor(
        images=[example.image], text=[format_prompt(enc.processor, example.text)], return_tensors="pt"
    )
    return inputs["input_ids"][0]


def _expected_positions(enc: LlavaEncoder, ids: torch.Tensor, tokens: str) -> list[int]:
    is_image = ids == enc.model.config.image_token_index
    keep = {"all": torch.ones_like(is_image), "image": is_image, "text": ~is_image}[tokens]
    return keep.nonzero()[:, 0].tolist()


def test_image_prompts_pairs_and_specs(pairs: ImagePrompts) -> None:
    assert len(pairs) == 6
    assert (pairs[3].text, pairs[3].image.size) == (PROMPTS[1], pairs[2].image.size)  # image 1, prompt 1
    assert "camera" in pairs.source(3) and "What is shown" in pairs.source(3)
    one = ImagePrompts(SkimagePhotos(["astronaut", "camera", "chelsea"]), PROMPTS[0])
    assert len(one) == 3 and one.fingerprint() != pairs.fingerprint()
    spec = load_dataset("skimage+prompt:Describe the image.")
    assert isinstance(spec, ImagePrompts) and len(spec) == len(SkimagePhotos())
    assert spec[0].text == "Describe the image."
    crops = load_dataset("skimage-crops:4+prompt:What is this?")
    assert len(crops) == 4 and crops[1].text == "What is this?"


def test_image_prompts_prompt_file_and_errors(tmp_path: Path) -> None:
    questions = tmp_path / "questions.txt"
    questions.write_text("# questions\nWhat is this?\nWhat colour is it?\n")
    spec = load_dataset(f"skimage+prompts:{questions}")
    assert len(spec) == 2 * len(SkimagePhotos()) and spec[1].text == "What colour is it?"
    with pytest.raises(ValueError, match="needs an image data set"):
        ImagePrompts(PromptList(["a"]), "b")
    with pytest.raises(ValueError, match="non-empty prompt"):
        ImagePrompts(SkimagePhotos(["camera"]), [])


@pytest.mark.parametrize(
    ("hook", "tokens"),
    [(LLM, "image"), (LLM, "text"), (LLM, "all"), (VISION, "patch"), (VISION, "all")],
)
def test_extract_store_holds_the_selected_tokens_of_each_example(
    enc: LlavaEncoder, pairs: ImagePrompts, tmp_path: Path, hook: str, tokens: str
) -> None:
    # batch_size 4: batches mix the two prompts, so the shorter one is padded
    store = mmsae.extract(
        enc,
        pairs,
        hooks=[hook],
        out_dir=tmp_path,
        tokens=tokens,
        batch_size=4,
        dtype="float32",
        progress=False,
    )
    meta = store.meta(hook)
    acts_ND = torch.cat([store.shard_acts(hook, s) for s in range(store.n_shards)])
    for i in range(len(pairs)):
        ids = _ids(enc, pairs, i)
        if hook == VISION:  # CLS + 16 patches of the image
            expected = list(range(1 if tokens == "patch" else 0, N_IMAGE_TOKENS + 1))
        else:
            expected = _expected_positions(enc, ids, tokens)
        rows = np.flatnonzero(meta["example_id"] == i)
        assert meta["token_index"][rows].tolist() == expected, (i, tokens)
        if tokens == "image":
            assert len(rows) == N_IMAGE_TOKENS
        # the same activations as the example run alone: no padding leaked in, metadata aligned
        alone = enc.activations(([pairs[i].image], [pairs[i].text]), [hook], tokens=tokens)[hook]
        torch.testing.assert_close(acts_ND[rows], alone.acts_ND, rtol=1e-4, atol=1e-5)
    assert store.n_tokens == len(meta["example_id"])


def test_llm_text_and_image_tokens_partition_the_sequence(
    enc: LlavaEncoder, pairs: ImagePrompts, tmp_path: Path
) -> None:
    counts = {
        tokens: mmsae.extract(
            enc, pairs, LLM, tmp_path / tokens, tokens=tokens, batch_size=4, progress=False
        ).n_tokens
        for tokens in ("image", "text", "all")
    }
    lengths = [len(_ids(enc, pairs, i)) for i in range(len(pairs))]
    assert counts["image"] == N_IMAGE_TOKENS * len(pairs)
    assert counts["image"] + counts["text"] == counts["all"] == sum(lengths)  # no padding


def test_bad_data_and_token_modes_are_clear_errors(enc: LlavaEncoder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no prompt.*\+prompt:"):
        mmsae.extract(enc, SkimagePhotos(["camera"]), LLM, tmp_path, progress=False)
    with pytest.raises(ValueError, match="texts only"):
        mmsae.extract(enc, PromptList(["a cat"]), LLM, tmp_path, progress=False)
    pairs = ImagePrompts(SkimagePhotos(["camera"]), "hi")
    with pytest.raises(ValueError, match="use decode='pil'"):
        mmsae.extract(enc, pairs, LLM, tmp_path, decode="device", progress=False)
    with pytest.raises(ValueError, match="vision hook"):
        mmsae.extract(enc, pairs, VISION, tmp_path, tokens="image", progress=False)
    with pytest.raises(ValueError, match="no CLS token"):
        mmsae.extract(enc, pairs, LLM, tmp_path, tokens="cls", progress=False)


def test_cli_extract_then_train_an_sae(
    enc: LlavaEncoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def extract(*args: str) -> int:
        argv = ["extract", "--encoder", "llava:tiny", "--dataset", "skimage+prompt:Describe the image."]
        return cli.main([*argv, "--device", "cpu", "--batch_size", "8", *args])

    assert extract("--hooks", LLM, VISION, "--tokens", "all", "--out_dir", str(tmp_path / "all")) == 0
    store = ActivationStore(capsys.readouterr().out.splitlines()[0])
    n, photo = len(SkimagePhotos()), SkimagePhotos()[0].image
    seq = len(enc.processor(images=[photo], text=[format_prompt(enc.processor, PROMPTS[0])])["input_ids"][0])
    assert store.hooks == [LLM, VISION]
    assert store.token_counts() == {LLM: n * seq, VISION: n * (N_IMAGE_TOKENS + 1)}
    assert extract("--hooks", LLM, "--tokens", "image", "--out_dir", str(tmp_path / "image")) == 0
    image_store = ActivationStore(capsys.readouterr().out.splitlines()[0])
    assert np.bincount(image_store.meta()["example_id"]).tolist() == [N_IMAGE_TOKENS] * n
    assert extract("--hooks", LLM, "--tokens", "text", "--out_dir", str(tmp_path / "text")) == 0
    text_store = ActivationStore(capsys.readouterr().out.splitlines()[0])
    assert text_store.n_tokens == n * (seq - N_IMAGE_TOKENS)
    assert extract("--hooks", VISION, "--tokens", "image", "--out_dir", str(tmp_path / "bad")) == 1
    assert "vision hook" in capsys.readouterr().err
    sae = mmsae.train(
        store,
        hook=LLM,
        sae="topk",
        n_features=32,
        k=4,
        tokens=256,
        batch_size=64,
        out_dir=str(tmp_path / "sae"),
    )
    (saved,) = [p.parent for p in (tmp_path / "sae").rglob("cfg.json")]
    loaded = load_sae(saved)
    assert (loaded.cfg.d_in, loaded.cfg.n_features) == (16, 32) == (sae.cfg.d_in, sae.cfg.n_features)
    x_ND = store.shard_acts(LLM, 0)[:8].float()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_dense(x_ND), sae.encode_dense(x_ND))


def test_the_processor_text_side_names_the_store(pairs: ImagePrompts, tmp_path: Path) -> None:
    """Same weights, same pixels, another image-token expansion: a new store, not a stale cache hit."""
    enc = get_encoder("llava:tiny")
    first = mmsae.extract(enc, pairs, LLM, tmp_path, tokens="image", progress=False)
    assert first.n_tokens == N_IMAGE_TOKENS * len(pairs)
    enc.processor.vision_feature_select_strategy = "full"  # keeps CLS: one more image token each
    enc.model.config.vision_feature_select_strategy = "full"
    second = mmsae.extract(enc, pairs, LLM, tmp_path, tokens="image", progress=False)
    assert second.path != first.path and second.n_tokens == (N_IMAGE_TOKENS + 1) * len(pairs)
