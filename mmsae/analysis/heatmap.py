"""Where in an image a latent fires: its activation on every patch token, as an [H, W] array."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mmsae.analysis.images import ImageLike, stack_pixels
from mmsae.argorder import encoder_and_sae
from mmsae.datasets.images import open_image
from mmsae.encoders.base import Encoder
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
def latent_heatmaps(
    encoder: Encoder, sae: SAE, images: Sequence[ImageLike], latent: int, hook: str | None = None
) -> list[np.ndarray]:
    """Activation of `latent` on each patch token, one float32 [H, W] array per image."""
    encoder, sae = encoder_and_sae(encoder, sae, "latent_heatmaps")
    if not 0 <= latent < sae.n_latents:
        raise IndexError(f"Latent {latent} is out of range for an SAE with {sae.n_latents} latents.")
    hook = hook or sae.cfg.hook or encoder.default_hook
    pixels = stack_pixels(encoder, [open_image(im) for im in images])
    acts = encoder.activations(pixels, [hook], tokens="patch")[hook]
    x = acts.acts_ND.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    codes_N = as_dense(sae.encode(x))[:, latent].float().cpu()
    maps_BT = codes_N.view(len(images), -1)
    h, w = patch_grid(encoder, maps_BT.shape[1])
    return [m.view(h, w).numpy() for m in maps_BT]
