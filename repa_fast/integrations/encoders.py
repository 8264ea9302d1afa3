"""The frozen vision encoder (transformers DINOv2) and the decoding of latents back to pixels.

`VisionEncoder` turns pixels in [0, 1] into DINOv2's final-LayerNorm patch tokens with their
grid: the targets of REPA / U-REPA. The CLS vector alone (what a plain hub forward of the
torch.hub DINOv2 returns) is one token, with which every manifold loss is 0; this returns all
the patch tokens, CLS and register tokens removed. `pixels_from_latents` decodes a batch of
training latents with a diffusers AutoencoderKL or AutoencoderTiny.

transformers and diffusers are imported inside functions: `import repa_fast` works without them.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..alignment import Grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_HUB_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
_HUB_WIDTHS = {"facebook/dinov2-small": 384, "facebook/dinov2-base": 768, "facebook/dinov2-large": 1024,
               "facebook/dinov2-giant": 1536}


def _encoder_aliases() -> dict:
    """Every accepted name (lower case, '-' read as '_') -> hub id: the torch.hub names
    (`dinov2_vitg14`, `dinov2_vitg14_reg`) and SimpleTuner's aliases (`dino_v2_g`, `dinov2_g`,
    `dinov2-vitg14`), for the four sizes, each with an optional `_reg` suffix (registers)."""
    aliases = {}
    for letter, size in _HUB_SIZES.items():
        for stem in (f"dinov2_vit{letter}14", f"dino_v2_{letter}", f"dinov2_{letter}"):
            aliases[stem] = f"facebook/dinov2-{size}"
            aliases[stem + "_reg"] = f"facebook/dinov2-with-registers-{size}"
    return aliases


ENCODER_ALIASES = _encoder_aliases()


def encoder_hub_id(name: str) -> Optional[str]:
    """The Hugging Face hub id of a DINOv2 name (`dinov2_vitg14` -> `facebook/dinov2-giant`,
    `dinov2_vits14_reg` -> `facebook/dinov2-with-registers-small`, `dino_v2_g` ->
    `facebook/dinov2-giant`), or None when `name` is not one of those names."""
    if not isinstance(name, str):
        raise TypeError(f"encoder name must be a string, got {type(name).__name__}")
    return ENCODER_ALIASES.get(name.strip().lower().replace("-", "_"))


def encoder_width(name_or_path: str, **from_pretrained_kwargs) -> int:
    """E, the token width of the encoder `name_or_path` names, without loading its weights: from
    the DINOv2 names' sizes, else from its config (a local directory's config.json, or the
    config file alone of a hub id)."""
    hub_id = encoder_hub_id(os.fspath(name_or_path))
    if hub_id is not None and not os.path.isdir(name_or_path):
        return _HUB_WIDTHS[hub_id.replace("-with-registers", "")]
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(os.fspath(name_or_path), **from_pretrained_kwargs).hidden_size


def encoder_matches_name(encoder: "VisionEncoder", name_or_path: str) -> bool:
    """False when `encoder` is visibly not the one `name_or_path` names: for a DINOv2 name, a
    different width or register count; for a hub id or directory, loaded from elsewhere (when
    its config records where it was loaded from). True when nothing tells them apart."""
    name = os.fspath(name_or_path)
    hub_id = encoder_hub_id(name)
    if hub_id is not None and not os.path.isdir(name):
        registers = "-with-registers" in hub_id
        width = _HUB_WIDTHS[hub_id.replace("-with-registers", "")]
        return encoder.dim == width and (encoder.num_register_tokens > 0) == registers
    loaded_from = getattr(encoder.model.config, "_name_or_path", "") or ""
    return not loaded_from or os.path.normpath(loaded_from) == os.path.normpath(name)


def _dinov2_classes() -> tuple:
    from transformers import Dinov2Model, Dinov2WithRegistersModel
    return Dinov2Model, Dinov2WithRegistersModel


class VisionEncoder(nn.Module):
    """A frozen transformers DINOv2 (`Dinov2Model` or `Dinov2WithRegistersModel`) as REPA's target.

    `encoder(pixels)` with pixels (B, 3, H, W) in [0, 1] returns `(tokens, grid)`: tokens
    (B, h * w, E) are the final-LayerNorm patch tokens in row-major grid order, grid is (h, w).
    Pixels are resized (bilinear) to `image_size` x `image_size` (SimpleTuner's behaviour), or with
    `keep_aspect=True` to the multiple-of-patch size nearest the input's aspect ratio at the same
    area, then normalized with the ImageNet mean and std. The model is kept in eval mode without
    gradients, in `dtype` (default: as given); `chunk_size` runs large batches in chunks.
    """

    def __init__(self, model: nn.Module, image_size: int = 518, *, keep_aspect: bool = False,
                 dtype: Optional[torch.dtype] = None, chunk_size: Optional[int] = None):
        super().__init__()
        classes = _dinov2_classes()
        if not isinstance(model, classes):
            raise TypeError(f"model must be a transformers Dinov2Model or Dinov2WithRegistersModel, "
                            f"got {type(model).__name__}")
        for name, value, optional in (("image_size", image_size, False), ("chunk_size", chunk_size, True)):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype must be a floating torch dtype or None, got {dtype!r}")
        if dtype is not None:
            model = model.to(dtype)
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        self.keep_aspect = bool(keep_aspect)
        self.chunk_size = chunk_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, image_size: int = 518, *, keep_aspect: bool = False,
                        dtype: Optional[torch.dtype] = None, chunk_size: Optional[int] = None,
                        device: Optional[torch.device | str] = None, **from_pretrained_kwargs) -> "VisionEncoder":
        """Load a DINOv2 by name (`dinov2_vitg14`, `dinov2_vits14_reg`, `dino_v2_g`, ...: see
        `encoder_hub_id`), hub id (`facebook/dinov2-base`) or local directory (`save_pretrained`
        output). Extra keyword arguments go to transformers' `from_pretrained` (`revision`,
        `cache_dir`, `local_files_only`, ...)."""
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}")
        source = os.fspath(name_or_path)
        if not os.path.isdir(source):
            hub_id = encoder_hub_id(source)
            if hub_id is not None:
                source = hub_id
            elif "/" not in source:
                raise ValueError(f"unknown encoder {source!r}: give a DINOv2 name such as 'dinov2_vitg14', "
                                 f"'dinov2_vitb14_reg' or 'dino_v2_g', a hub id such as 'facebook/dinov2-base', "
                                 f"or a local directory")
        from transformers import AutoModel
        model = AutoModel.from_pretrained(source, **from_pretrained_kwargs)
        if not isinstance(model, _dinov2_classes()):
            raise TypeError(f"{source!r} loads a {type(model).__name__}, not a DINOv2 "
                            f"(Dinov2Model or Dinov2WithRegistersModel)")
        encoder = cls(model, image_size, keep_aspect=keep_aspect, dtype=dtype, chunk_size=chunk_size)
        return encoder.to(device) if device is not None else encoder

    @property
    def dim(self) -> int:
        """E, the width of the tokens."""
        return self.model.config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    @property
    def num_register_tokens(self) -> int:
        return getattr(self.model.config, "num_register_tokens", 0)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embeddings.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        """The (height, width) in pixels that an image of this size is resized to."""
        if not self.keep_aspect:
            return self.image_size, self.image_size
        aspect, p = width / height, self.patch_size
        rows = max(1, round(self.image_size / math.sqrt(aspect) / p))
        cols = max(1, round(self.image_size * math.sqrt(aspect) / p))
        return rows * p, cols * p

    def grid(self, height: int, width: int) -> Grid:
        """The (h, w) token grid of an image of this size."""
        size = self.input_size(height, width)
        return size[0] // self.patch_size, size[1] // self.patch_size

    def train(self, mode: bool = True) -> "VisionEncoder":
        # Frozen: the wrapped model stays in eval mode whatever a trainer's .train() says.
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        """pixels (B, 3, H, W) in [0, 1] -> (tokens (B, h * w, E) in the encoder's dtype on its
        device, grid (h, w))."""
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise TypeError(f"pixels must be a floating torch.Tensor, got "
                            f"{pixels.dtype if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
            raise ValueError(f"pixels must have shape (B, 3, H, W) with B > 0, got {tuple(pixels.shape)}")
        size = self.input_size(pixels.shape[2], pixels.shape[3])
        chunks = pixels.split(self.chunk_size) if self.chunk_size else (pixels,)
        tokens = torch.cat([self._encode(chunk, size) for chunk in chunks])
        return tokens, self.grid(pixels.shape[2], pixels.shape[3])

    def _encode(self, pixels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        x = pixels.to(self.device, torch.float32)
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).to(self.dtype)
        hidden = self.model(pixel_values=x).last_hidden_state  # after the final LayerNorm
        return hidden[:, 1 + self.num_register_tokens:]


@torch.no_grad()
def pixels_from_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Decode training latents (B, C, h, w) with a diffusers `AutoencoderKL` or `AutoencoderTiny`
    into pixels (B, 3, H, W) in [0, 1], float32, on the VAE's device; no gradient.

    The latents are in the trainer's scaled space: undone as the diffusers pipelines do, by
    `latents_mean` / `latents_std` when the VAE's config has both (SDXL-style), else by
    `scaling_factor` and `shift_factor` (SD3 / Flux) when set.
    """
    if not hasattr(vae, "decode") or not hasattr(vae, "config"):
        raise TypeError(f"vae must be a diffusers autoencoder (AutoencoderKL or AutoencoderTiny), "
                        f"got {type(vae).__name__}")
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.dim() != 4:
        raise ValueError(f"latents must be a floating (B, C, h, w) tensor, got "
                         f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
    param = next(vae.parameters())
    z = latents.to(param.device, torch.float32)
    config = vae.config
    scaling = getattr(config, "scaling_factor", None) or 1.0
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, z.shape[1], 1, 1)
        std, mean = (torch.tensor(v, device=z.device).view(shape) for v in (std, mean))
        z = z * std / scaling + mean
    else:
        z = z / scaling
        shift = getattr(config, "shift_factor", None)
        if shift:
            z = z + shift
    decoded = vae.decode(z.to(param.dtype)).sample
    return (decoded.float().clamp(-1, 1) + 1) / 2
