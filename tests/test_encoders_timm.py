"""timm ViT adapter on timm's own `test_vit` (random init)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mmsae.encoders import get_encoder
from mmsae.encoders.timm_vit import TimmEncoder


@pytest.fixture(scope="module")
def enc() -> TimmEncoder:
    return get_encoder("timm:test_vit")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))


def test_hooks_are_module_paths(enc: TimmEncoder) -> None:
    hooks = enc.hook_points()
    blocks = [h for h in hooks if h.count(".") == 1 and h.startswith("blocks")]
    assert blocks == [f"blocks.{i}" for i in range(6)]
    assert "norm" in hooks and "blocks.0.attn" in hooks
    assert enc.default_hook == "blocks.4"


def test_token_selection_shapes(enc: TimmEncoder, pixels: torch.Tensor) -> None:
    every = enc.activations(pixels, ["blocks.2"], tokens="all")["blocks.2"]
    assert every.acts_ND.shape == (2 * 101, 64)  # 1 CLS + (160/16)² patches
    cls = enc.activations(pixels, ["blocks.2"], tokens="cls")["blocks.2"]
    torch.testing.assert_close(cls.acts_ND, every.acts_ND[every.meta["token_index"] == 0])
    patch = enc.activations(pixels, ["blocks.2"], tokens="patch")["blocks.2"]
    assert patch.acts_ND.shape == (200, 64) and patch.meta["token_index"].min() == 1
    mean = enc.activations(pixels, ["blocks.2"], tokens="mean")["blocks.2"]
    torch.testing.assert_close(mean.acts_ND, patch.acts_ND.view(2, 100, 64).mean(1))
    pooled = enc.activations(pixels, ["blocks.2"], tokens="pooled")["blocks.2"]  # test_vit pools CLS
    torch.testing.assert_close(pooled.acts_ND, cls.acts_ND)
    fifth = enc.activations(pixels, ["blocks.2"], tokens=5)["blocks.2"]
    torch.testing.assert_close(fifth.acts_ND, every.acts_ND[every.meta["token_index"] == 5])


def test_hooked_values_equal_plain_forward(enc: TimmEncoder, pixels: torch.Tensor) -> None:
    acts = enc.activations(pixels, ["norm"])["norm"].acts_ND
    with torch.no_grad():
        expected = enc.model.forward_features(pixels)
    torch.testing.assert_close(acts, expected.reshape(-1, 64), rtol=0, atol=0)


def test_registers_and_no_cls() -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        depth=2,
        embed_dim=32,
        num_heads=2,
        reg_tokens=2,
        class_token=False,
        global_pool="avg",
    )
    enc = TimmEncoder(model, "timm:registers")
    pixels = torch.randn(1, 3, 32, 32)
    regs = enc.activations(pixels, ["blocks.1"], tokens="registers")["blocks.1"]
    assert regs.meta["token_index"].tolist() == [0, 1]
    assert enc.activations(pixels, ["blocks.1"], tokens="patch")["blocks.1"].acts_ND.shape == (4, 32)
    with pytest.raises(ValueError, match="no CLS token"):
        enc.activations(pixels, ["blocks.1"], tokens="cls")
    with pytest.raises(ValueError, match="32×32"):  # fixed-size model
        enc.activations(torch.randn(1, 3, 48, 48), ["blocks.1"])


def test_dynamic_size_model_takes_other_sizes(enc: TimmEncoder) -> None:
    acts = enc.activations(torch.randn(1, 3, 96, 64), ["blocks.0"], tokens="patch")["blocks.0"]
    assert acts.acts_ND.shape == (6 * 4, 64) and enc.grid == (6, 4)


def test_prefix_free_module_has_no_cls(enc: TimmEncoder, pixels: torch.Tensor) -> None:
    assert enc.activations(pixels, ["patch_embed"])["patch_embed"].acts_ND.shape == (200, 64)
    with pytest.raises(ValueError, match="no CLS token"):
        enc.activations(pixels, ["patch_embed"], tokens="cls")


def test_transform_and_bad_inputs(enc: TimmEncoder) -> None:
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120), dtype=np.uint8))
    assert enc.transform(gray).shape == (3, 160, 160)  # timm's data config: resize + center crop, RGB
    assert enc.activations([gray], ["blocks.0"])["blocks.0"].acts_ND.shape == (101, 64)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc.activations(torch.randn(1, 1, 160, 160), ["blocks.0"])
    with pytest.raises(ValueError, match="mode 'F'"):
        enc.transform(Image.fromarray(np.zeros((8, 8), dtype=np.float32)))
    with pytest.raises(ValueError, match="Unknown token mode"):
        enc.activations(torch.randn(1, 3, 160, 160), ["blocks.0"], tokens="everything")


def test_offline_missing_weights_is_clear() -> None:
    with pytest.raises(RuntimeError, match="pretrained=False"):
        get_encoder("timm:vit_small_patch16_224", pretrained=True)


# ---------------------------------------------------------------- CNNs and classifier heads
@pytest.fixture(scope="module")
def cnn() -> TimmEncoder:
    return get_encoder("timm:test_efficientnet", pretrained=False)


def test_cnn_tokens_are_spatial_positions(cnn: TimmEncoder) -> None:
    pixels = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(2))  # any size
    assert cnn.default_hook == f"blocks.{len(cnn.model.blocks) - 1}" and "conv_head" in cnn.hook_points()
    with torch.no_grad():
        map_BCHW = cnn.model.blocks[:2](cnn.model.bn1(cnn.model.conv_stem(pixels)))
    every = cnn.activations(pixels, ["blocks.1"], tokens="all")["blocks.1"]
    B, C, H, W = map_BCHW.shape
    torch.testing.assert_close(every.acts_ND, map_BCHW.flatten(2).transpose(1, 2).reshape(-1, C))
    assert every.meta["token_index"].tolist() == list(range(H * W)) * B
    assert cnn.hook_grid("blocks.1", H * W) == (H, W)
    for mode in ("mean", "pooled"):
        pooled = cnn.activations(pixels, ["bn2"], tokens=mode)["bn2"]
        with torch.no_grad():
            expected = cnn.model.forward_head(cnn.model.forward_features(pixels), pre_logits=True)
        torch.testing.assert_close(pooled.acts_ND, expected)  # the head's own global average pool
    for mode, word in (("cls", "no CLS token"), ("registers", "no register tokens")):
        with pytest.raises(ValueError, match=word):
            cnn.activations(pixels, ["blocks.1"], tokens=mode)


@pytest.mark.parametrize("spec", ["timm:test_efficientnet", "timm:test_vit"])
def test_logits_from_every_head_hook_equal_the_forward(spec: str) -> None:
    enc = get_encoder(spec, pretrained=False)
    pixels = torch.randn(2, 3, 160, 160) if enc.is_vit else torch.randn(2, 3, 64, 64)
    logits = enc.classify(pixels)
    assert logits.shape == (2, enc.model.num_classes) and len(enc.class_names) == enc.model.num_classes
    for hook in enc.head_hooks():
        acts_ND = enc.activations(pixels, [hook])[hook].acts_ND
        acts_BTD = acts_ND.reshape(2, -1, acts_ND.shape[-1])
        torch.testing.assert_close(enc.logits_from_hook(hook, acts_BTD), logits, atol=1e-5, rtol=1e-5)


def test_logits_from_hook_is_differentiable_and_takes_maps(cnn: TimmEncoder) -> None:
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        map_BCHW = cnn.model.blocks[:3](cnn.model.bn1(cnn.model.conv_stem(pixels)))
    acts = map_BCHW.clone().requires_grad_(True)
    cnn.logits_from_hook("blocks.2", acts)[0, 3].backward()
    assert acts.grad is not None and acts.grad.abs().sum() > 0
    torch.testing.assert_close(cnn.logits_from_hook("blocks.2", map_BCHW), cnn.classify(pixels))


def test_head_errors_name_the_fix(cnn: TimmEncoder) -> None:
    with pytest.raises(ValueError, match=r"cannot resume .*blocks.1.0.conv_dw.*Use one of: conv_stem"):
        cnn.logits_from_hook("blocks.1.0.conv_dw", torch.zeros(1, 4, 8))
    headless = get_encoder("timm:test_vit", pretrained=False, num_classes=0)
    with pytest.raises(TypeError, match="no classifier head"):
        headless.classify(torch.zeros(1, 3, 160, 160))
    assert not headless.has_classifier


def test_imagenet_class_names_are_torchvisions() -> None:
    from mmsae.datasets import imagenet_class_names

    names = imagenet_class_names()
    assert len(names) == 1000 and names[285] == "Egyptian cat" and names[967] == "espresso"
