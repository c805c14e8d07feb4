"""Where in an image a feature fires: its activation on every patch token, as an [H, W] array."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from mmsae.analysis.images import ImageLike, stack_pixels
from mmsae.argorder import encoder_and_sae
from mmsae.datasets.images import open_image
from mmsae.encoders.base import Encoder
from mmsae.legacy_names import legacy_kwargs, module_getattr
from mmsae.sae import SAE, as_dense


def patch_grid(encoder: Encoder, n_patches: int) -> tuple[int, int]:
    """(H, W) of the patch grid, from the model's own grid size (never assumed square)."""
    model = encoder.model
    for owner in (getattr(model, "visual", None), getattr(model, "patch_embed", None), model):
        grid = getattr(owner, "grid_size", None)
        if grid is not None:
            h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
            if h * w == n_patches:
                return int(h), int(w)
    raise ValueError(
        f"Cannot tell the patch grid of {encoder.id} for {n_patches} patch tokens: the hook does "
        "not produce one token per image patch, so there is no heatmap to draw."
    )


@torch.no_grad()
def patch_codes(
    encode: Callable[[Tensor], Tensor],
    encoder: Encoder,
    images: Sequence[ImageLike],
    hook: str,
    batch_size: int = 16,
) -> Tensor:
    """Codes of every patch token, float32 [B, H, W, n]: `encode` maps the hook's [N, D] tokens to [N, n]
    (an SAE's dense codes, or any other feature basis, e.g. random directions for a baseline)."""
    if not images:
        raise ValueError("patch_codes needs at least one image.")
    maps = []
    for start in range(0, len(images), batch_size):
        pixels = stack_pixels(encoder, [open_image(im) for im in images[start : start + batch_size]])
        acts = encoder.activations(pixels, [hook], tokens="patch")[hook]
        codes_Nn = encode(acts.acts_ND).float().cpu()
        maps.append(codes_Nn.view(pixels.shape[0], -1, codes_Nn.shape[-1]))
    codes_BTn = torch.cat(maps)
    h, w = patch_grid(encoder, codes_BTn.shape[1])
    return codes_BTn.view(len(images), h, w, -1)


def sae_encoder(sae: SAE) -> Callable[[Tensor], Tensor]:
    """`encode` for `patch_codes`: the SAE's dense codes, on its device and dtype."""
    return lambda x_ND: as_dense(sae.encode(x_ND.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)))


@torch.no_grad()
@legacy_kwargs
def feature_heatmaps(
    encoder: Encoder, sae: SAE, images: Sequence[ImageLike], feature: int, hook: str | None = None
) -> list[np.ndarray]:
    """Activation of `feature` on each patch token, one float32 [H, W] array per image."""
    encoder, sae = encoder_and_sae(encoder, sae, "feature_heatmaps")
    if not 0 <= feature < sae.n_features:
        raise IndexError(f"Feature {feature} is out of range for an SAE with {sae.n_features} features.")
    hook = hook or sae.cfg.hook or encoder.default_hook
    encode = sae_encoder(sae)
    maps_BHW = patch_codes(lambda x_ND: encode(x_ND)[:, feature : feature + 1], encoder, images, hook)
    return [m[..., 0].numpy() for m in maps_BHW]


__getattr__ = module_getattr(__name__)  # old public names (mmsae.legacy_names)
