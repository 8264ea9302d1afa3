"""REPA / U-REPA regularizers for a trainer: the encoder, the pixels and a scheduled loss, built
from SimpleTuner's `crepa_*` / `urepa_*` config keys.

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

A disabled regularizer (`*_enabled` false, SimpleTuner's default) runs in the same loop as an
enabled one: it loads no encoder, `capture()` hooks nothing, and it returns `(None, {})`. It still
holds its projector, so DDP and `accelerator.prepare` wrap it as they wrap an enabled one (DDP
refuses a module without trainable parameters) and its state_dict has the same keys.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..alignment import Grid
from .capture import (CaptureContext, FeatureCapture, NoCapture, capture_transformer_block, capture_unet_mid_block,
                      check_block_index, unwrap_model)
from ..config import RepaConfig, URepaConfig
from .encoders import VisionEncoder, encoder_matches_name, encoder_width, pixels_from_latents
from .feature_cache import FeatureCache, open_feature_cache, producer_of
from .input_checks import InputWarning, latent_scale_problem, pixel_range_problem
from ..modules import RepaLoss, RepaProjector, URepaLoss
from .simpletuner import check_log_names, simpletuner_logs

# SimpleTuner's recommended crepa_block_index: 8 (Flux, SD3, Chroma), 10 for Sana and PixArt.
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
    # "simpletuner": logs under SimpleTuner 4.10.1's names (from_config(log_names=...)).
    log_names = "repa_fast"
    feature_cache: Optional[FeatureCache] = None  # see use_feature_cache

    def __init__(self, config, model: nn.Module, loss: nn.Module, encoder: Optional[VisionEncoder],
                 vae: Optional[nn.Module]):
        super().__init__()
        self.config = config
        self.alignment_loss = loss
        # Held outside the module tree: frozen, not trained, not checkpointed with the projector.
        self._used = {"model": model, "encoder": encoder, "vae": vae}
        self._warned: set = set()  # input problems already warned about (once each)

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
        return self.alignment_loss.projector

    @classmethod
    def _parse_config(cls, config) -> Any:
        if isinstance(config, cls.config_class):
            return config
        if isinstance(config, Mapping):
            return cls.config_class.from_dict(config, ignore_unrelated=True)
        raise TypeError(f"config must be a mapping of {cls.config_class.prefix}* keys or a "
                        f"{cls.config_class.__name__}, got {type(config).__name__}")

    @classmethod
    def _build_parts(cls, config, given, encoder: Optional[VisionEncoder], vae: Optional[nn.Module],
                     encoder_kwargs: Optional[Mapping[str, Any]]) -> Tuple[Optional[VisionEncoder], int,
                                                                           Optional[nn.Module]]:
        """The encoder (loaded by the config's name when not given; none when disabled), its
        token width and the VAE, checked. `given`: the config as the caller passed it."""
        name = config.encoder_name
        if encoder is not None and not isinstance(encoder, VisionEncoder):
            raise TypeError(f"encoder must be a repa_fast.VisionEncoder, got {type(encoder).__name__}")
        if encoder is not None:
            cls._warn_if_config_disagrees(config, given, encoder)
        elif config.enabled:
            encoder = VisionEncoder.from_pretrained(name, config.encoder_image_size, **dict(encoder_kwargs or {}))
        if getattr(config, "use_tae", False) and vae is not None and type(vae).__name__ != "AutoencoderTiny":
            raise ValueError(f"{config.key('use_tae')} is set: pass vae=AutoencoderTiny.from_pretrained(...) "
                             f"(e.g. madebyollin/taesdxl), got a {type(vae).__name__}")
        width = encoder.dim if encoder is not None else encoder_width(name, **dict(encoder_kwargs or {}))
        return encoder, width, vae

    @classmethod
    def _warn_if_config_disagrees(cls, config, given, encoder: VisionEncoder) -> None:
        """`encoder=` replaces the config's encoder name and image size: say so when the config
        set them (keys given, or fields off their defaults) to something else."""
        defaults = {field.name: field.default for field in dataclasses.fields(config)}

        def was_set(field: str) -> bool:
            if isinstance(given, Mapping):
                return config.key(field) in given
            return getattr(config, field) != defaults[field]

        # The name comes from `*_model`, else `crepa_encoder` (U-REPA falls back to crepa's keys).
        name_keys = {config.key("model"), "crepa_model", "crepa_encoder"}
        name_set = (any(given.get(key) is not None for key in name_keys) if isinstance(given, Mapping)
                    else config.encoder_name != type(config)().encoder_name)
        problems = []
        if name_set and not encoder_matches_name(encoder, config.encoder_name):
            name_key = config.key("model") if config.model else config.key("encoder")
            problems.append(f"{name_key}={config.encoder_name!r}, but the encoder given has "
                            f"width {encoder.dim} and {encoder.num_register_tokens} register tokens")
        if was_set("encoder_image_size") and config.encoder_image_size != encoder.image_size:
            problems.append(f"{config.key('encoder_image_size')}={config.encoder_image_size}, but the encoder given "
                            f"resizes to {encoder.image_size}")
        if problems:
            warnings.warn(f"encoder= replaces the config's encoder: {'; '.join(problems)}. The encoder given is "
                          f"used; make the config agree with it (or drop encoder= to load the config's).",
                          InputWarning, stacklevel=4)

    def _warn_once(self, kind: str, message: Optional[str]) -> None:
        if message is not None:
            self._warned.add(kind)
            warnings.warn(message, InputWarning, stacklevel=4)

    def capture(self) -> CaptureContext:
        raise NotImplementedError

    def _with_log_names(self, log_names: str) -> "_Regularizer":
        self.log_names = check_log_names(log_names)
        return self

    def _logs_as_configured(self, logs: Dict[str, float]) -> Dict[str, Any]:
        if self.log_names == "repa_fast" or not logs:
            return logs
        loss_fn = self.alignment_loss
        return simpletuner_logs(self.config.prefix, logs, manifold_weight=getattr(loss_fn, "manifold_weight", 0.0),
                                similarity_ema=loss_fn.schedule.similarity_ema)

    @property
    def simpletuner_prefix(self) -> str:
        """Where SimpleTuner keeps this projector in the model's state dict."""
        return self.config.prefix + "projector."

    def load_simpletuner_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a projector SimpleTuner trained: its `crepa_projector.*` / `urepa_projector.*` keys
        (a whole model's state dict may be given) or the projector's own `0.weight`, ... keys."""
        if self.projector is None:
            raise ValueError(f"{self.config.key('enabled')} is false: this regularizer has no projector to load")
        self.projector.load_simpletuner_state_dict(state_dict, prefix=self.simpletuner_prefix)

    def simpletuner_state_dict(self) -> Dict[str, torch.Tensor]:
        """The projector as SimpleTuner saves it with the model: `crepa_projector.0.weight`, ..."""
        if self.projector is None:
            raise ValueError(f"{self.config.key('enabled')} is false: this regularizer has no projector to save")
        return self.projector.simpletuner_state_dict(self.simpletuner_prefix)

    def forward(self, hidden: Union[torch.Tensor, FeatureCapture, None], *, pixels: Optional[torch.Tensor] = None,
                latents: Optional[torch.Tensor] = None, hidden_grid: Optional[Grid] = None,
                step: Optional[int] = None, keys: Optional[Sequence[str]] = None,
                ) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """The weighted loss for captured `hidden` states (a tensor, or the capture itself, whose
        grid is then used) against the encoder's tokens of `pixels` (B, 3, H, W) in [0, 1] or of
        `latents` decoded with the VAE (the scaled latents the diffusion model trains on).
        Pixels outside [0, 1] and latents that look unscaled are warned about, once each.

        Returns `(loss, logs)`; loss is None when the config is disabled (logs empty; `hidden`
        may then be a disabled capture's None) or when the schedule has cut the loss off. Off
        for good (past `cutoff_step`, or a "permanent" similarity cutoff) nothing is decoded or
        encoded and logs are `{"weight": 0.0}`, as SimpleTuner skips the work; a "recoverable"
        cutoff still computes the similarity its EMA needs, and logs it. `step`: the trainer's
        global step (default: the regularizer's own count). `keys`: the samples' keys (strings),
        with a feature cache (`use_feature_cache`).
        """
        if isinstance(hidden, CaptureContext):
            raise TypeError("the regularizer got the context manager that capture() returns, not what it captured: "
                            "write `with reg.capture() as cap:` around the model's forward, then call reg(cap, ...)")
        if not self.enabled:
            return None, {}
        if isinstance(hidden, FeatureCapture):
            hidden_grid = hidden.grid if hidden_grid is None else hidden_grid
            hidden = hidden.output
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"hidden must be the captured features (the `cap` of `with reg.capture() as cap:`, or "
                            f"cap.output), got {type(hidden).__name__}")
        loss_fn = self.alignment_loss
        current = loss_fn.step_count if step is None else step
        if loss_fn.schedule.is_off(current):
            if loss_fn.training:
                loss_fn.step_count = int(current) + 1  # as the loss's own forward counts steps
            return None, self._logs_as_configured({"weight": 0.0})
        target, target_grid = self.encode(pixels=pixels, latents=latents, device=hidden.device, keys=keys)
        loss, logs = loss_fn(hidden, target, hidden_grid=hidden_grid, target_grid=target_grid, step=step)
        return (None if loss_fn.schedule.is_cut_off else loss), self._logs_as_configured(logs)

    def use_feature_cache(self, feature_cache: Union[FeatureCache, str, os.PathLike, None]) -> "_Regularizer":
        """Read the encoder's tokens through `feature_cache` (a folder or a FeatureCache; None:
        no cache): calls then pass `keys=`, hits skip the VAE decode and the encoder, misses
        compute, store and use the stored values. Returns the regularizer."""
        self.feature_cache = open_feature_cache(feature_cache)
        self._cache_bound = []  # None (pixels) and the VAE, once bound
        return self

    def encode(self, *, pixels: Optional[torch.Tensor] = None, latents: Optional[torch.Tensor] = None,
               device: Optional[torch.device] = None, keys: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, Grid]:
        """The encoder's (tokens on `device`, grid) for `pixels` or for `latents` decoded with the
        VAE; with a feature cache, through it for the samples `keys`."""
        if (pixels is None) == (latents is None):
            raise ValueError("pass exactly one of pixels= (B, 3, H, W) in [0, 1] or latents= (decoded with the vae)")
        if latents is not None and self.vae is None:
            raise ValueError("latents were given but the regularizer has no vae: build it with vae=... "
                             "or pass pixels=")
        if latents is not None and "latents" not in self._warned:
            self._warn_once("latents", latent_scale_problem(self.vae, latents))
        elif pixels is not None and "pixels" not in self._warned and isinstance(pixels, torch.Tensor) \
                and pixels.is_floating_point():
            self._warn_once("pixels", pixel_range_problem(pixels))
        cache = self.feature_cache
        if (cache is None) != (keys is None):
            raise ValueError("keys= goes with a feature cache: build the regularizer with feature_cache=DIR"
                             if cache is None else f"the regularizer reads targets through {cache}: pass keys=, "
                                                   f"one string per sample")
        inputs, vae = (latents, self.vae) if latents is not None else (pixels, None)
        if cache is None:
            return self._compute_targets(inputs, vae, device)
        if vae not in self._cache_bound:  # once per input kind: the fingerprint reads weights
            cache.bind(producer_of(self.encoder, vae, cache.dtype or self.encoder.dtype))
            self._cache_bound.append(vae)
        tokens, grid = cache.targets(keys, inputs, lambda misses: self._compute_targets(misses, vae, device))
        return (tokens if device is None else tokens.to(device)), grid

    def _compute_targets(self, inputs: torch.Tensor, vae: Optional[nn.Module],
                         device: Optional[torch.device]) -> Tuple[torch.Tensor, Grid]:
        """The encoder's tokens of pixels, or of latents decoded with `vae`."""
        pixels = inputs if vae is None else pixels_from_latents(vae, inputs)
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

    @property
    def block_index(self) -> int:
        return self._block_index

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], RepaConfig], model: nn.Module, *,
                    encoder: Optional[VisionEncoder] = None, vae: Optional[nn.Module] = None,
                    max_train_steps: Optional[int] = None, backend: Optional[str] = None,
                    hidden_dim: Optional[int] = None, encoder_kwargs: Optional[Mapping[str, Any]] = None,
                    feature_cache: Union[FeatureCache, str, os.PathLike, None] = None,
                    log_names: str = "repa_fast") -> "RepaRegularizer":
        """`config`: the trainer's config (keys without the `crepa_` prefix are ignored) or a
        RepaConfig. `encoder`: default `VisionEncoder.from_pretrained(crepa_model or crepa_encoder,
        crepa_encoder_image_size, **encoder_kwargs)`. `vae`: decodes `latents=` (not needed with
        `pixels=`). `hidden_dim`: the block's width, by default heads x head dim from the model's
        config. `max_train_steps`: for a decay schedule with `crepa_decay_steps` 0. `feature_cache`: a
        folder or FeatureCache the encoder's tokens are read through (see `use_feature_cache`).
        `log_names`: "repa_fast" (alignment, similarity, weight) or "simpletuner" (crepa_loss,
        crepa_alignment_score, ..., as SimpleTuner 4.10.1 logs them). Disabled, it is built the same
        way (the model checked, the projector made) but loads no encoder."""
        given, config = config, cls._parse_config(config)
        inner = unwrap_model(model)
        if not _is_dit(inner):
            kind = " It is a UNet: use URepaRegularizer with urepa_* keys." if _is_unet(inner) else ""
            raise TypeError(f"REPA (crepa_*) aligns a DiT's transformer block, and {type(inner).__name__} has no "
                            f"transformer_blocks.{kind}")
        block_index = config.block_index if config.block_index is not None else default_block_index(inner)
        check_block_index(inner, block_index)
        hidden_dim = _dit_width(inner) if hidden_dim is None else hidden_dim
        encoder, encoder_dim, vae = cls._build_parts(config, given, encoder, vae, encoder_kwargs)
        loss = RepaLoss(hidden_dim, encoder_dim, schedule=config.schedule(max_train_steps),
                        spatial_align=config.spatial_align, backend=backend,
                        token_alignment=config.token_alignment, **_projector_options(config, hidden_dim, encoder_dim))
        return cls(config, model, loss, encoder, vae, block_index)._with_log_names(log_names).use_feature_cache(feature_cache)

    def __init__(self, config: RepaConfig, model: nn.Module, loss: RepaLoss,
                 encoder: Optional[VisionEncoder], vae: Optional[nn.Module], block_index: int):
        super().__init__(config, model, loss, encoder, vae)
        self._block_index = block_index

    def capture(self) -> CaptureContext:
        """`with reg.capture() as cap:` around the model's forward; then `reg(cap, ...)`."""
        if not self.enabled:
            return CaptureContext(NoCapture())
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

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], URepaConfig], model: nn.Module, *,
                    encoder: Optional[VisionEncoder] = None, vae: Optional[nn.Module] = None,
                    max_train_steps: Optional[int] = None, backend: Optional[str] = None,
                    hidden_dim: Optional[int] = None, encoder_kwargs: Optional[Mapping[str, Any]] = None,
                    feature_cache: Union[FeatureCache, str, os.PathLike, None] = None,
                    log_names: str = "repa_fast") -> "URepaRegularizer":
        """As RepaRegularizer.from_config with `urepa_*` keys; the encoder defaults to
        `urepa_model`, `hidden_dim` to the UNet's `block_out_channels[-1]`, and with
        `urepa_use_tae` the `vae` must be an AutoencoderTiny."""
        given, config = config, cls._parse_config(config)
        inner = unwrap_model(model)
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
        encoder, encoder_dim, vae = cls._build_parts(config, given, encoder, vae, encoder_kwargs)
        loss = URepaLoss(hidden_dim, encoder_dim, manifold_weight=config.manifold_weight,
                         schedule=config.schedule(max_train_steps), backend=backend,
                         token_alignment=config.token_alignment, **_projector_options(config, hidden_dim, encoder_dim))
        return cls(config, model, loss, encoder, vae)._with_log_names(log_names).use_feature_cache(feature_cache)

    def capture(self) -> CaptureContext:
        """`with reg.capture() as cap:` around the UNet's forward; then `reg(cap, ...)`."""
        if not self.enabled:
            return CaptureContext(NoCapture())
        return capture_unet_mid_block(self._used["model"])
