"""Every open_clip architecture family at tiny width: hooks and tokens in both towers, zero-shot.

Tiny open_clip configs (registered with `open_clip.add_model_config`) mirror the real configs of each
family: their timm trunks are tiny timm models registered here, the HF text tower is a tiny RoBERTa
written to a local directory (config + tokenizer built offline), so no hub is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from timm.models import eva, fastvit, swin_transformer, vision_transformer
from timm.models._registry import _model_entrypoints, register_model

from mmsae.encoders import get_encoder
from mmsae.encoders.clip import ClipEncoder

TEXTS = ["a photo of a cat", "a dog"]
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
VIT_CFG = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}


def _timm_tiny(name: str, build: Any) -> None:
    """Register a tiny timm model `name` (idempotent): timm passes its factory options, which we drop."""
    if name in _model_entrypoints:
        return

    def fn(pretrained: bool = False, **kw: Any) -> torch.nn.Module:
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kw.pop(k, None)
        model = build(**kw)
        model.pretrained_cfg = model.default_cfg = {}  # what timm's builder sets; open_clip reads it
        return model

    fn.__name__ = name
    register_model(fn)


_timm_tiny(  # SigLIP's trunk: no CLS token, attention-pool ("map") head
    "mmsae_tiny_siglip",
    lambda **kw: vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False, **kw
    ),
)
_timm_tiny(  # EVA-02: rotary position embedding, CLS token
    "mmsae_tiny_eva02",
    lambda **kw: eva.Eva(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 4),
        **kw,
    ),
)
_timm_tiny(  # Swin: stages output [B, H, W, C]
    "mmsae_tiny_swin",
    lambda **kw: swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), **kw
    ),
)
_timm_tiny(  # MobileCLIP's FastViT
    "mmsae_tiny_fastvit",
    lambda **kw: fastvit.FastVit(
        layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), mlp_ratios=(2, 2, 2, 2), **kw
    ),
)


def _timm_vision(name: str, pool: str, proj: str = "linear", size: int = 32) -> dict[str, Any]:
    return {"timm_model_name": name, "timm_pool": pool, "timm_proj": proj, "image_size": size}


def _hf_text_dir(root: Path) -> Path:
    """A tiny RoBERTa (config + fast tokenizer) in a local directory, built without the hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, RobertaConfig

    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {tok: i for i, tok in enumerate(["<s>", "<pad>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    out = root / "tiny-roberta"
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(out)
    RobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ).save_pretrained(out)  # fmt: skip
    return out


def _configs(hf_dir: Path) -> dict[str, dict[str, Any]]:
    """family → a tiny open_clip config shaped like the real ones of that family."""
    siglip_text = {**TEXT_CFG, "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}
    return {
        "rn": {  # RN50: ModifiedResNet image tower, attention pooling
            "embed_dim": 32,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
            "text_cfg": TEXT_CFG,
        },
        "mapvit": {
            "embed_dim": 32,
            "init_logit_bias": -10,
            "custom_text": True,
            "vision_cfg": _timm_vision("mmsae_tiny_siglip", "map", "none"),
            "text_cfg": siglip_text,
        },
        "eva": {
            "embed_dim": 32,
            "vision_cfg": _timm_vision("mmsae_tiny_eva02", "token"),
            "text_cfg": {**TEXT_CFG, "pool_type": "argmax"},
            "custom_text": True,
        },
        "convnext": {
            "embed_dim": 32,
            "vision_cfg": _timm_vision("test_convnext", "", size=64),
            "text_cfg": TEXT_CFG,
        },
        "swin": {"embed_dim": 32, "vision_cfg": _timm_vision("mmsae_tiny_swin", ""), "text_cfg": TEXT_CFG},
        "fastvit": {
            "embed_dim": 32,
            "custom_text": True,
            "vision_cfg": _timm_vision("mmsae_tiny_fastvit", "avg", size=64),
            "text_cfg": TEXT_CFG,
        },
        "hf_text": {
            "embed_dim": 32,
            "vision_cfg": VIT_CFG,
            "text_cfg": {
                "hf_model_name": str(hf_dir),
                "hf_tokenizer_name": str(hf_dir),
                "hf_pooler_type": "mean_pooler",
                "hf_proj_type": "mlp",
                "context_length": 16,
            },
        },
        "coca": {
            "embed_dim": 32,
            "vision_cfg": {
                **VIT_CFG,
                "attentional_pool": True,
                "attn_pooler_heads": 2,
                "output_tokens": True,
            },
            "text_cfg": {**TEXT_CFG, "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {
                "context_length": 16,
                "width": 32,
                "heads": 2,
                "layers": 1,
                "vocab_size": 49408,
            },
            "custom_text": True,
        },
    }


# family → (expected image hook prefix, does 'pooled' apply to image blocks, can 'cls' apply to them)
FAMILIES = {
    "rn": ("visual.layer", False, False),
    "mapvit": ("visual.trunk.blocks.", False, False),  # SigLIP-style trunk and text tower
    "eva": ("visual.trunk.blocks.", True, True),
    "convnext": ("visual.trunk.stages.", True, False),
    "swin": ("visual.trunk.layers.", True, False),
    "fastvit": ("visual.trunk.stages.", True, False),
    "hf_text": ("visual.transformer.resblocks.", True, True),
    "coca": ("visual.transformer.resblocks.", False, True),
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip-families")
    hf_dir = _hf_text_dir(root)
    for family, cfg in _configs(hf_dir).items():
        (root / f"mmsae-test-{family}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    return root


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_hooks_tokens_and_zero_shot(registered: Path, family: str) -> None:
    image_prefix, pooled_applies, cls_applies = FAMILIES[family]
    enc = get_encoder(f"clip:mmsae-test-{family}", pretrained=False)
    assert isinstance(enc, ClipEncoder)
    image_hooks = [h for h in enc.hook_points() if not enc.is_text_hook(h)]
    text_hooks = [h for h in enc.hook_points() if enc.is_text_hook(h)]
    blocks = [h for h in image_hooks if h.startswith(image_prefix)]
    assert len(blocks) >= 2 and "visual" in image_hooks and enc.default_hook in blocks
    assert len(text_hooks) >= 3  # blocks + final norm or pooled text embedding

    pixels = torch.randn(2, 3, *enc.image_size)
    acts = enc.activations(pixels, [*blocks, "visual"])
    for hook in blocks:
        n_tokens = acts[hook].acts_ND.shape[0] // 2
        assert acts[hook].acts_ND.shape[0] == 2 * n_tokens and n_tokens > 1, hook
    torch.testing.assert_close(acts["visual"].acts_ND, enc.encode_image(pixels, normalize=False))
    last = blocks[-1]
    if pooled_applies:
        pooled = enc.activations(pixels, [last], tokens="pooled")[last]
        assert pooled.acts_ND.shape[0] == 2
    else:
        with pytest.raises(ValueError, match="pools its image tower with attention"):
            enc.activations(pixels, [last], tokens="pooled")
    if not cls_applies:
        with pytest.raises(ValueError, match="no CLS token"):
            enc.activations(pixels, [last], tokens="cls")
    mean = enc.activations(pixels, [last], tokens="mean")[last]
    assert mean.acts_ND.shape[0] == 2 and mean.meta["token_index"].tolist() == [-1, -1]

    text_acts = enc.activations(TEXTS, text_hooks, tokens="pooled")
    assert all(a.acts_ND.shape[0] == 2 for a in text_acts.values())
    image_BE, text_BE = enc.encode_image(pixels), enc.encode_text(TEXTS)
    assert image_BE.shape == text_BE.shape == (2, enc.embed_dim)
    assert (image_BE @ text_BE.T).shape == (2, 2)  # zero-shot / text search scores


def test_nhwc_stage_tokens_are_spatial_positions(registered: Path) -> None:
    """Swin stages output [B, H, W, C]: tokens are the H·W positions with C features, and edits round-trip."""
    enc = get_encoder("clip:mmsae-test-swin", pretrained=False)
    hook = "visual.trunk.layers.0"
    acts = enc.activations(torch.randn(1, 3, 32, 32), [hook])[hook]
    assert acts.acts_ND.shape == (8 * 8, 16)  # 32/4 = 8×8 positions, embed_dim 16 channels
    pixels = torch.randn(1, 3, 32, 32)
    with enc.edit(hook, lambda t: t):
        torch.testing.assert_close(enc.encode_image(pixels), enc.encode_image(pixels))


def test_hf_text_pooled_is_the_mean_over_real_tokens(registered: Path) -> None:
    """HF mean pooler: 'pooled' on the last layer, run through the projection, is the text embedding."""
    enc = get_encoder("clip:mmsae-test-hf_text", pretrained=False)
    last = [h for h in enc.hook_points() if h.startswith("text.transformer.encoder.layer.")][-1]
    pooled = enc.activations(TEXTS, [last], tokens="pooled")[last].acts_ND
    torch.testing.assert_close(enc.model.text.proj(pooled), enc.encode_text(TEXTS, normalize=False))
