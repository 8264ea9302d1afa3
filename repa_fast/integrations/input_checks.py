"""Cheap checks of what a trainer feeds a regularizer, for the mistakes that give wrong targets
without any error: pixels in [0, 255] or [-1, 1] instead of [0, 1], and latents not multiplied
by the VAE's scaling factor (the clamp after decoding hides them). Each returns a message saying
what was seen and what to pass, or None; the regularizer warns once per kind, with an
InputWarning (a UserWarning: `warnings.simplefilter("error", InputWarning)` makes them errors).

Each check costs one reduction and one host sync, as the regularizer's float logs do.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

# Pixels in [0, 1] resized with an overshooting filter (bicubic, Lanczos) leave [0, 1] by a little.
PIXEL_SLACK = 0.05
# A scaling factor this far from 1 (either way) separates scaled latents (std ~1) from raw
# ones (std ~1 / scaling_factor) on a single batch; closer to 1 the two overlap.
LATENT_SCALE_RATIO = 2.0


class InputWarning(UserWarning):
    """What a regularizer was given looks wrong (pixel range, latent scale, encoder vs config)."""


def pixel_range_problem(pixels: torch.Tensor) -> Optional[str]:
    """Why `pixels` do not look like images in [0, 1], or None."""
    low, high = (float(v) for v in torch.stack(torch.aminmax(pixels.detach())).float().tolist())
    if not (math.isfinite(low) and math.isfinite(high)) or (-PIXEL_SLACK <= low and high <= 1 + PIXEL_SLACK):
        return None  # NaN / Inf propagate to the loss, as everywhere else
    if high > 2:
        guess = "they look like [0, 255]: pass pixels / 255"
    elif low < -0.5:
        guess = "they look like [-1, 1]: pass (pixels + 1) / 2"
    else:
        guess = "clamp or rescale them to [0, 1]"
    return (f"pixels range over [{low:.3g}, {high:.3g}], but the encoder expects images in [0, 1]; {guess}. "
            f"Targets from other ranges are silently wrong.")


def latent_scale_problem(vae: nn.Module, latents: torch.Tensor) -> Optional[str]:
    """Why `latents` look like raw VAE latents rather than the scaled ones a diffusion model
    trains on (`(z - shift_factor) * scaling_factor`), or None. Judged by the batch's standard
    deviation: ~1 when scaled, ~1 / scaling_factor when not; skipped for VAEs whose scaling
    factor is too close to 1 to tell, and for those normalized by latents_mean / latents_std."""
    config = vae.config
    scaling = getattr(config, "scaling_factor", None)
    if getattr(config, "latents_mean", None) is not None or not scaling or latents.numel() < 2:
        return None
    if max(scaling, 1 / scaling) < LATENT_SCALE_RATIO:
        return None
    std = float(latents.detach().float().std())
    # Closer (in log scale) to a raw latent's std than to a scaled one's.
    if not math.isfinite(std) or std <= 0 or abs(math.log(std * scaling)) >= abs(math.log(std)):
        return None
    shift = getattr(config, "shift_factor", None)
    scaled = f"(latents - {shift}) * {scaling}" if shift else f"latents * {scaling}"
    return (f"latents have standard deviation {std:.3g}, near 1 / vae.config.scaling_factor = {1 / scaling:.3g} "
            f"rather than 1: they look unscaled, and decode to wrong pixels. Pass them as the diffusion model "
            f"sees them: {scaled} (vae.config.scaling_factor{', shift_factor' if shift else ''}).")
