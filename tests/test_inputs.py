"""Data set → model inputs: the uint8 hand-off of pixels, and what DataLoader workers receive."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mmsae.datasets.images import SkimagePhotos
from mmsae.datasets.pixels import PixelHandoff, split_pipeline
from mmsae.encoders import Encoder, get_encoder
from mmsae.inputs import EncoderInputs, input_batches, probe_image

SPECS = ("timm:test_vit", "clip:tiny")


@pytest.fixture(scope="module")
def encoders() -> dict[str, Encoder]:
    return {spec: get_encoder(spec, pretrained=False) for spec in SPECS}


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos in the modes data sets hand over: RGB, grayscale, with alpha, palette."""
    images = [SkimagePhotos()[i].image for i in range(4)]
    return [images[0], images[1].convert("L"), images[2].convert("RGBA"), images[3].convert("P")]


def _handoff(encoder: Encoder) -> PixelHandoff:
    handoff = split_pipeline(encoder.image_pipeline, probe_image())
    assert handoff is not None, f"{encoder.id}: its pipeline should split before ToTensor"
    return handoff


@pytest.mark.parametrize("spec", SPECS)
def test_handoff_is_bit_identical_to_the_transform(
    encoders: dict[str, Encoder], photos: list[Image.Image], spec: str
) -> None:
    encoder, handoff = encoders[spec], _handoff(encoders[spec])
    for image in photos:
        host_CHW = handoff.host(image)
        assert host_CHW.dtype == torch.uint8 and host_CHW.shape[0] == 3
        assert torch.equal(handoff.finish(host_CHW[None])[0], encoder.transform(image)), image.mode


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twin: test_handoff_is_bit_identical_to_the_transform",
)
@pytest.mark.parametrize("spec", SPECS)
def test_handoff_on_gpu_is_bit_identical(
    encoders: dict[str, Encoder], photos: list[Image.Image], spec: str
) -> None:
    encoder, handoff = encoders[spec], _handoff(encoders[spec])
    host_BCHW = torch.stack([handoff.host(image) for image in photos])
    expected_BCHW = torch.stack([encoder.transform(image) for image in photos])
    assert torch.equal(handoff.finish(host_BCHW.cuda()).cpu(), expected_BCHW)


def test_pipelines_that_do_not_split() -> None:
    probe = probe_image()
    to_tensor = [T.Resize(32), T.CenterCrop(32), T.ToTensor()]
    assert split_pipeline(None, probe) is None
    assert split_pipeline(lambda im: T.functional.to_tensor(im), probe) is None  # not a Compose
    assert split_pipeline(T.Compose(to_tensor), probe) is None  # no RGB step: ToTensor keeps other modes
    with_rgb = T.Compose([lambda im: im.convert("RGB"), *to_tensor])
    with_rgb.transforms[0].__name__ = "rgb"
    assert split_pipeline(with_rgb, probe) is not None
    # A step after Normalize would have to run on the device too: not split.
    extra = T.Compose([*with_rgb.transforms, T.Normalize([0.5] * 3, [0.5] * 3), T.Lambda(lambda x: x * 2)])
    assert split_pipeline(extra, probe) is None


def test_handoff_finish_rejects_floats(encoders: dict[str, Encoder]) -> None:
    with pytest.raises(TypeError, match="uint8"):
        _handoff(encoders["clip:tiny"]).finish(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("spec", [*SPECS, "llava:tiny"])
def test_workers_get_the_pipeline_not_the_model(spec: str) -> None:
    """A spawned worker unpickles its data set: it must hold the preprocessing only (a model would travel
    to every worker, through CUDA IPC on a GPU). The tiny models weigh ≥ 100 kB; the pipelines far less."""
    encoder = get_encoder(spec, pretrained=False)
    model_bytes = sum(p.numel() * p.element_size() for p in encoder.model.parameters())
    inputs = EncoderInputs(SkimagePhotos(["coffee"]), encoder.image_pipeline)
    pickled = pickle.dumps(inputs)
    assert model_bytes > 100_000 and len(pickled) < model_bytes / 4, (len(pickled), model_bytes)
    index, pixels, err = pickle.loads(pickled)[0]
    assert index == 0
    assert err is None and torch.equal(pixels, encoder.transform(SkimagePhotos(["coffee"])[0].image))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_input_batches_equal_the_transform(encoders: dict[str, Encoder], num_workers: int) -> None:
    encoder, photos = encoders["timm:test_vit"], SkimagePhotos()
    batches = [[0, 1, 2], [3, 4]]
    got = list(input_batches(encoder, photos, batches, "image", num_workers))
    assert [b.indices for b in got] == batches
    for batch in got:
        expected_BCHW = torch.stack([encoder.transform(photos[i].image) for i in batch.indices])
        assert batch.inputs.dtype == torch.float32 and torch.equal(batch.inputs, expected_BCHW)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_llava_pairs_are_the_processor_batch_right_padded(num_workers: int) -> None:
    """LLaVA's processor runs on each (image, prompt) in the workers; the batch equals one processor
    call on the whole batch, padded on the right."""
    from mmsae.datasets import ImagePrompts
    from mmsae.encoders.llava import format_prompt

    encoder = get_encoder("llava:tiny")
    pairs = ImagePrompts(SkimagePhotos(["astronaut", "camera"]), ["hi", "a much longer prompt than hi"])
    (batch,) = input_batches(encoder, pairs, [[0, 1, 3]], "image", num_workers=num_workers)
    examples = [pairs[i] for i in (0, 1, 3)]
    expected = encoder.processor(
        images=[ex.image for ex in examples],
        text=[format_prompt(encoder.processor, ex.text) for ex in examples],
        return_tensors="pt",
        padding=True,
        padding_side="right",
    )
    assert batch.indices == [0, 1, 3] and sorted(batch.inputs) == sorted(expected)
    assert not batch.inputs["attention_mask"].all()  # "hi" is padded
    for key, value in expected.items():
        assert torch.equal(batch.inputs[key], value), key
    with pytest.raises(ValueError, match="texts only"):
        next(input_batches(encoder, pairs, [[0]], "text"))


def test_llava_workers_get_the_processor_not_the_model() -> None:
    from mmsae.datasets import ImagePrompts
    from mmsae.inputs import CollatePairs

    encoder = get_encoder("llava:tiny")
    model_bytes = sum(p.numel() * p.element_size() for p in encoder.model.parameters())
    pairs = ImagePrompts(SkimagePhotos(["coffee"]), "What is this?")
    items = EncoderInputs(pairs, None, encoder.pair_pipeline, who=encoder.id)
    pickled = pickle.dumps((items, CollatePairs(encoder.pair_pipeline)))
    assert len(pickled) < model_bytes / 4, (len(pickled), model_bytes)
    index, inputs, err = pickle.loads(pickled)[0][0]
    expected = encoder.pair_pipeline(pairs[0].image, "What is this?")
    assert index == 0 and err is None and all(torch.equal(inputs[k], v) for k, v in expected.items())
