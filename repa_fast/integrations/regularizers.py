"""REPA / U-REPA regularizers for a trainer: the encoder, the pixels and a scheduled loss, built
from the seed's `crepa_*` / `urepa_*` config keys.

```python
reg = URepaRegularizer.from_config(config, unet, encoder=encoder, vae=vae, max_train_steps=N)
optimizer = torch.optim.AdamW([*unet.parameters(), *reg.parameters()])
with reg.capture() as cap:
    pred = unet(noisy, t, text).sample
loss = F.mse_loss(pred, target)
reg_loss, logs = reg(cap, latents=latents, step=step)   # or pixels=images
if reg_loss is not None:
    loss = loss + reg_loss
```

A regularizer is an nn.Module whose parameters are the projector's (for the optimizer) and
whose state_dict holds the projector, the step count and the schedule state. The encoder and
the VAE are used but not owned as submodules: they stay out of `parameters()` and `state_dict`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..alignment import Grid
from .capture import FeatureCapture, capture_transformer_block, capture_unet_mid_block, check_block_index, unwrap_model
from ..config import RepaConfig, URepaConfig
from .encoders import VisionEncoder, pixels_from_latents
from ..modules import RepaLoss, RepaProjector, URepaLoss

# The seed's recommended crepa_block_index: 8 (Flux, SD3, Chroma), 10 for Sana and PixArt.
DEFAULT_BLOCK_INDEX = 8
_DEFAULT_BLOCK_INDEX_BY_MODEL = {"SanaTransformer2DModel": 10, "PixArtTransformer2DModel": 10}


def default_block_index(model: nn.Module) -> int:
    for cls in type(unwrap_model(model)).__mro__:
        if cls.__name__ in _DEFAULT_BLOCK_INDEX_BY_MODEL:
            return _DEFAULT_BLOCK_INDEX_BY_MODEL[cls.__name__]
    return DEFAULT_BLOCK_INDEX


def _is_unet(model: nn.Module) -> bool:
    return isinstance(getattr(model, "mid_block", None), nn.Module)


def _is_dit(model: nn.Module) -> bool:
    return isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList)


class _Regularizer(nn.Module):
    """Shared by both regularizers: pixels -> encoder tokens -> the scheduled loss."""

    config_class: type
    encoder_key: str  # the config field naming the encoder

    def __init__(self, config, model: nn.Module, loss: Optional[nn.Module], encoder: Optional[VisionEncoder],
                 vae: Optional[nn.Module]):
        super().__init__()
        self.config = config
        self.alignment_loss = loss
        # Held outside the module tree: frozen, not trained, not checkpointed with the projector.
        self._used = {"model": model, "encoder": encoder, "vae": vae}

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def encoder(self) -> Optional[VisionEncoder]:
        return self._used["encoder"]

    @property
    def vae(self) -> Optional[nn.Module]:
        return self._used["vae"]

    @property
    def projector(self):
        return None if self.alignment_loss is None else self.alignment_loss.projector

    @classmethod
    def _parse_config(cls, config) -> Any:
        if isinstance(config, cls.config_class):
            return config
        if isinstance(config, Mapping):
            return cls.config_class.from_dict(config, ignore_unrelated=True)
        raise TypeError(f"config must be a mapping of {cls.config_class.prefix}* keys or a "
                        f"{cls.config_class.__name__}, got {type(config).__name__}")

    @classmethod
    def _build_parts(cls, config, encoder: Optional[VisionEncoder], vae: Optional[nn.Module],
                     encoder_kwargs: Optional[Mapping[str, Any]]) -> Tuple[VisionEncoder, Optional[nn.Module]]:
        """The encoder (loaded by the config's name when not given) and the VAE, checked."""
        if encoder is None:
            name = getattr(config, cls.encoder_key)
            encoder = VisionEncoder.from_pretrained(name, config.encoder_image_size, **dict(encoder_kwargs or {}))
        elif not isinstance(encoder, VisionEncoder):
            raise TypeError(f"encoder must be a repa_fast.VisionEncoder, got {type(encoder).__name__}")
        if getattr(config, "use_tae", False) and vae is not None and type(vae).__name__ != "AutoencoderTiny":
            raise ValueError(f"{config.key('use_tae')} is set: pass vae=AutoencoderTiny.from_pretrained(...) "
                             f"(e.g. madebyollin/taesdxl), got a {type(vae).__name__}")
        return encoder, vae

    def capture(self) -> contextlib.AbstractContextManager[FeatureCapture]:
        raise NotImplementedError

    def forward(self, hidden: Union[torch.Tensor, FeatureCapture], *, pixels: Optional[torch.Tensor] = None,
                latents: Optional[torch.Tensor] = None, hidden_grid: Optional[Grid] = None,
                step: Optional[int] = None) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """The weighted loss for captured `hidden` states (a tensor, or the capture itself, whose
        grid is then used) against the encoder's tokens of `pixels` (B, 3, H, W) in [0, 1] or of
        `latents` decoded with the VAE.

        Returns `(loss, logs)`; loss is None when the config is disabled (logs empty) or when the
        schedule has cut the loss off. Off for good (past `cutoff_step`, or a "permanent"
        similarity cutoff) nothing is decoded or encoded and logs are `{"weight": 0.0}`, as
        SimpleTuner skips the work; a "recoverable" cutoff still computes the similarity its EMA
        needs, and logs it. `step`: the trainer's global step (default: the regularizer's own count).
        """
        if not self.enabled:
            return None, {}
        loss_fn = self.alignment_loss
        current = loss_fn.step_count if step is None else step
        if loss_fn.schedule.is_off(current):
            if loss_fn.training:
                loss_fn.step_count = int(current) + 1  # as the loss's own forward counts steps
            return None, {"weight": 0.0}
        if isinstance(hidden, FeatureCapture):
            hidden_grid = hidden.grid if hidden_grid is None else hidden_grid
            hidden = hidden.output
        target, target_grid = self.encode(pixels=pixels, latents=latents, device=hidden.device)
        loss, logs = loss_fn(hidden, target, hidden_grid=hidden_grid, target_grid=target_grid, step=step)
        return (None if loss_fn.schedule.is_cut_off else loss), logs

    def encode(self, *, pixels: Optional[torch.Tensor] = None, latents: Optional[torch.Tensor] = None,
               device: Optional[torch.device] = None) -> Tuple[torch.Tensor, Grid]:
        """The encoder's (tokens on `device`, grid) for `pixels` or for `latents` decoded with the VAE."""
        if (pixels is None) == (latents is None):
            raise ValueError("pass exactly one of pixels= (B, 3, H, W) in [0, 1] or latents= (decoded with the vae)")
        if latents is not None:
            if self.vae is None:
                raise ValueError("latents were given but the regularizer has no vae: build it with vae=... "
                                 "or pass pixels=")
            pixels = pixels_from_latents(self.vae, latents)
        encoder = self.encoder
        if device is not None and encoder.device != device:
            encoder.to(device)  # the encoder follows the features (e.g. each DDP rank's GPU)
        tokens, grid = encoder(pixels)
        return (tokens if device is None else tokens.to(device)), grid


def _projector_options(config, hidden_dim: int, encoder_dim: int) -> Dict[str, Any]:
    """The loss's projector (`*_projector_kind`: an MLP of `*_projector_mlp_width`, iREPA's conv of
    `irepa_projector_kernel_size`) and target z-score (`irepa_spatial_norm_alpha` with `irepa_enabled`)."""
    projector = RepaProjector(hidden_dim, encoder_dim, config.projector, mlp_width=config.projector_mlp_width,
                              kernel_size=config.irepa_projector_kernel_size)
    return dict(projector=projector, target_zscore_alpha=config.target_zscore_alpha)


class RepaRegularizer(_Regularizer):
    """REPA for DiTs (SD3, Flux, PixArt, Sana, Chroma, ...): block `crepa_block_index`'s image
    tokens aligned to the encoder's patch tokens (`crepa_*` keys)."""

    config_class = RepaConfig
    encoder_key = "encoder"

    @property
    def block_index(self) -> int:
        return self._block_index

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], RepaConfig], model: nn.Module, *,
                    encoder: Optional[VisionEncoder] = None, vae: Optional[nn.Module] = None,
                    max_train_steps: Optional[int] = None, backend: Optional[str] = None,
                    hidden_dim: Optional[int] = None,
                    encoder_kwargs: Optional[Mapping[str, Any]] = None) -> "RepaRegularizer":
        """`config`: the trainer's config (keys without the `crepa_` prefix are ignored) or a
        RepaConfig. `encoder`: default `VisionEncoder.from_pretrained(crepa_encoder,
        crepa_encoder_image_size, **encoder_kwargs)`. `vae`: decodes `latents=` (not needed with
        `pixels=`). `hidden_dim`: the block's width, by default heads x head dim from the model's
        config. `max_train_steps`: for a decay schedule with `crepa_decay_steps` 0."""
        config = cls._parse_config(config)
        inner = unwrap_model(model)
        if not config.enabled:
            return cls(config, model, None, None, None, None)
        if not _is_dit(inner):
            kind = " It is a UNet: use URepaRegularizer with urepa_* keys." if _is_unet(inner) else ""
            raise TypeError(f"REPA (crepa_*) aligns a DiT's transformer block, and {type(inner).__name__} has no "
                            f"transformer_blocks.{kind}")
        block_index = config.block_index if config.block_index is not None else default_block_index(inner)
        check_block_index(inner, block_index)
        hidden_dim = _dit_width(inner) if hidden_dim is None else hidden_dim
        encoder, vae = cls._build_parts(config, encoder, vae, encoder_kwargs)
        loss = RepaLoss(hidden_dim, encoder.dim, schedule=config.schedule(max_train_steps),
                        spatial_align=config.spatial_align, backend=backend,
                        **_projector_options(config, hidden_dim, encoder.dim))
        return cls(config, model, loss, encoder, vae, block_index)

    def __init__(self, config: RepaConfig, model: nn.Module, loss: Optional[RepaLoss],
                 encoder: Optional[VisionEncoder], vae: Optional[nn.Module], block_index: Optional[int]):
        super().__init__(config, model, loss, encoder, vae)
        self._block_index = block_index

    def capture(self) -> contextlib.AbstractContextManager[FeatureCapture]:
        """`with reg.capture() as cap:` around the model's forward; then `reg(cap, ...)`."""
        if not self.enabled:
            return contextlib.nullcontext(FeatureCapture())
        return capture_transformer_block(self._used["model"], self._block_index)


def _dit_width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    inner_dim = getattr(model, "inner_dim", None)
    if isinstance(inner_dim, int):
        return inner_dim
    raise ValueError(f"cannot tell the width of {type(model).__name__}'s blocks from its config "
                     f"(num_attention_heads x attention_head_dim): pass hidden_dim=")


class URepaRegularizer(_Regularizer):
    """U-REPA for UNets (SDXL, SD1.5, Kolors): the mid-block features aligned to the encoder's
    patch tokens plus the manifold loss (`urepa_*` keys)."""

    config_class = URepaConfig
    encoder_key = "model"

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], URepaConfig], model: nn.Module, *,
                    encoder: Optional[VisionEncoder] = None, vae: Optional[nn.Module] = None,
                    max_train_steps: Optional[int] = None, backend: Optional[str] = None,
                    hidden_dim: Optional[int] = None,
                    encoder_kwargs: Optional[Mapping[str, Any]] = None) -> "URepaRegularizer":
        """As RepaRegularizer.from_config with `urepa_*` keys; the encoder defaults to
        `urepa_model`, `hidden_dim` to the UNet's `block_out_channels[-1]`, and with
        `urepa_use_tae` the `vae` must be an AutoencoderTiny."""
        config = cls._parse_config(config)
        inner = unwrap_model(model)
        if not config.enabled:
            return cls(config, model, None, None, None)
        if not _is_unet(inner):
            kind = " It is a DiT: use RepaRegularizer with crepa_* keys." if _is_dit(inner) else ""
            raise TypeError(f"U-REPA (urepa_*) aligns a UNet's mid_block, and {type(inner).__name__} has no "
                            f"mid_block.{kind}")
        if hidden_dim is None:
            channels = getattr(getattr(inner, "config", None), "block_out_channels", None)
            if not channels:
                raise ValueError(f"cannot tell {type(inner).__name__}'s mid-block width (no block_out_channels "
                                 f"in its config): pass hidden_dim=")
            hidden_dim = int(channels[-1])
        encoder, vae = cls._build_parts(config, encoder, vae, encoder_kwargs)
        loss = URepaLoss(hidden_dim, encoder.dim, manifold_weight=config.manifold_weight,
                         schedule=config.schedule(max_train_steps), backend=backend,
                         **_projector_options(config, hidden_dim, encoder.dim))
        return cls(config, model, loss, encoder, vae)

    def capture(self) -> contextlib.AbstractContextManager[FeatureCapture]:
        """`with reg.capture() as cap:` around the UNet's forward; then `reg(cap, ...)`."""
        if not self.enabled:
            return contextlib.nullcontext(FeatureCapture())
        return capture_unet_mid_block(self._used["model"])
