"""SimpleTuner drop-in: its regularizers on repa-fast's fused ops, its log names, its checkpoints.

```python
import repa_fast.integrations.simpletuner as rf_simpletuner
rf_simpletuner.apply()     # before SimpleTuner's trainer builds its regularizers (any time before compute_loss)
```

`apply()` patches `compute_loss` of SimpleTuner's `CrepaRegularizer` (image mode) and
`UrepaRegularizer` the way Liger-Kernel's `apply_liger_kernel_to_*` patches transformers: the
projector SimpleTuner built (its parameters, so its optimizer and checkpoints), its scheduler
state, its VAE decode and encoder, its returned logs and `None` results stay SimpleTuner's; only
the projection, token alignment and losses run through `repa_fast.repa_loss` / `urepa_loss`
(fused Triton or CUDA kernels on a GPU), with SimpleTuner's alignment rule
(`token_alignment="sequence"`), so the numbers are SimpleTuner's. Modes it does not cover (video,
self-flow, backbone features, iREPA, a projector that is not `Sequential(LayerNorm, Linear)`) and
every error case go to SimpleTuner's own code. Tested against SimpleTuner 4.10.1 only: another
version is refused.

`simpletuner_logs` is the one translation of repa-fast's logs to SimpleTuner's names, used by the
patch and by the regularizers' `log_names="simpletuner"`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
from types import ModuleType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..alignment import check_token_alignment
from ..backends import check_backend
from ..functional import repa_loss, urepa_loss
from ..validation import check_flag

SUPPORTED_VERSIONS = ("4.10.1",)
CREPA_MODULE = "simpletuner.helpers.training.crepa"
LOG_NAMES = ("repa_fast", "simpletuner")

# SimpleTuner's regularizer class -> its unpatched compute_loss, while patched.
_originals: Dict[type, Callable] = {}


def check_log_names(log_names) -> str:
    if log_names not in LOG_NAMES:
        raise ValueError(f"log_names must be one of {', '.join(map(repr, LOG_NAMES))}, got {log_names!r}")
    return log_names


def simpletuner_logs(prefix: str, logs: Mapping[str, float], *, manifold_weight: float = 0.0,
                     similarity_ema: Optional[float] = None) -> Dict[str, Any]:
    """repa-fast's logs ("alignment", "manifold" for U-REPA, "similarity", "weight") under the names
    SimpleTuner 4.10.1 logs (`prefix` "crepa_" or "urepa_"), with its values: the weighted loss,
    the cutoff flag, and (CREPA, when the scheduler has one) the similarity EMA. A weight of 0
    logs SimpleTuner's cutoff record. Logs without a similarity (a schedule off for good, where
    nothing was computed) give the loss, weight and cutoff only."""
    weight = float(logs["weight"])
    cut_off = weight == 0.0
    if prefix not in ("crepa_", "urepa_"):
        raise ValueError(f"prefix must be 'crepa_' or 'urepa_', got {prefix!r}")
    if "similarity" not in logs:
        return {prefix + "loss": 0.0, prefix + "weight": weight, prefix + "cutoff": cut_off}
    similarity = logs["similarity"]
    if prefix == "crepa_":
        out = {"crepa_loss": 0.0 if cut_off else logs["alignment"] * weight, "crepa_alignment_score": similarity,
               "crepa_similarity_self": similarity, "crepa_weight": weight, "crepa_cutoff": cut_off}
        if similarity_ema is not None:
            out["crepa_alignment_score_ema"] = similarity_ema
        return out
    alignment, manifold = (0.0, 0.0) if cut_off else (logs["alignment"], logs["manifold"])
    return {"urepa_loss": 0.0 if cut_off else weight * (alignment + manifold_weight * manifold),
            "urepa_alignment_loss": alignment, "urepa_manifold_loss": manifold, "urepa_similarity": similarity,
            "urepa_weight": weight, "urepa_cutoff": cut_off}


# ---------------------------------------------------------------- the patch

@dataclasses.dataclass(frozen=True)
class _Options:
    patch_tokens: bool
    token_alignment: str
    backend: Optional[str]


def _projector_args(projector) -> Optional[Tuple[Tuple[torch.Tensor, ...], float]]:
    """((ln_weight, ln_bias, proj_weight, proj_bias), ln_eps) of SimpleTuner's
    `Sequential(LayerNorm, Linear)` projector; None for any other projector."""
    if not (isinstance(projector, nn.Sequential) and len(projector) == 2):
        return None
    norm, linear = projector[0], projector[1]
    if not (isinstance(norm, nn.LayerNorm) and isinstance(linear, nn.Linear) and len(norm.normalized_shape) == 1
            and norm.weight is not None and norm.bias is not None and linear.bias is not None):
        return None
    return (norm.weight, norm.bias, linear.weight, linear.bias), norm.eps


def _hidden_for(hidden: torch.Tensor, projector_dtype: torch.dtype) -> torch.Tensor:
    """SimpleTuner casts the hidden states to the projector's dtype; 16-bit states with an fp32
    projector stay 16-bit instead (tensor-core GEMMs, fp32 accumulation: bf16 rounding only)."""
    if projector_dtype == torch.float32 and hidden.dtype in (torch.float16, torch.bfloat16):
        return hidden
    return hidden.to(projector_dtype)


def _can_compute(regularizer, hidden, latents, vae, hidden_ndim: int) -> bool:
    """The cases SimpleTuner computes a loss for (anything else, errors included, is its own)."""
    return (regularizer.enabled and isinstance(hidden, torch.Tensor) and hidden.ndim == hidden_ndim
            and not regularizer.irepa_enabled and latents is not None
            and (regularizer.model_foundation is not None or vae is not None)
            and regularizer.base_weight != 0 and _projector_args(regularizer.projector) is not None)


def _weighted(regularizer, prefix: str, step, losses: Tuple[torch.Tensor, ...], manifold_weight: float = 0.0):
    """SimpleTuner's tail: the scheduled weight from the similarity, its logs, None when cut off."""
    values = torch.stack([loss.detach().double() for loss in losses]).tolist()   # one device sync
    logs = {"alignment": values[0], "similarity": -values[0]}
    if len(values) == 2:
        logs["manifold"] = values[1]
    scheduler = regularizer.scheduler
    logs["weight"] = (scheduler.get_weight(step, similarity=logs["similarity"]) if scheduler is not None
                      else regularizer.base_weight)
    ema = scheduler.get_similarity_ema() if (scheduler is not None and prefix == "crepa_") else None
    out_logs = simpletuner_logs(prefix, logs, manifold_weight=manifold_weight, similarity_ema=ema)
    if logs["weight"] == 0:
        return None, out_logs
    total = losses[0] if len(losses) == 1 else losses[0] + manifold_weight * losses[1]
    return logs["weight"] * total, out_logs


def _crepa_compute_loss(original: Callable, options: _Options) -> Callable:
    @functools.wraps(original)
    def compute_loss(self, hidden_states, latents, vae=None, *, frame_features=None, step=0):
        covered = (_can_compute(self, hidden_states, latents, vae, 3) and frame_features is None
                   and getattr(self.mode, "name", None) == "IMAGE" and not self.uses_internal_teacher_features)
        if not covered:
            return original(self, hidden_states, latents, vae, frame_features=frame_features, step=step)
        params, ln_eps = _projector_args(self.projector)
        pixels = self._decode_latents_unified(latents, vae)
        # (B, T, N, E); an image model's hidden states are one frame, which SimpleTuner pairs with
        # the first decoded frame.
        target = self._encode_frames(pixels)[:, 0]
        loss = repa_loss(_hidden_for(hidden_states, params[0].dtype), target, *params,
                         spatial_align=self.spatial_align, ln_eps=ln_eps, backend=options.backend,
                         token_alignment=options.token_alignment)
        return _weighted(self, "crepa_", step, (loss,))
    return compute_loss


class _PatchTokens(nn.Module):
    """A torch.hub DINOv2 whose call returns its `forward_features` dict: SimpleTuner's U-REPA
    encode step then takes the final-LayerNorm patch tokens (`x_norm_patchtokens`) instead of the
    CLS vector a plain hub forward returns (one token: a manifold loss of 0 for ever)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "forward_features", None)):
            raise ValueError(f"apply(patch_tokens=True) needs an encoder with forward_features (a torch.hub "
                             f"DINOv2), got a {type(model).__name__}")
        self.model = model

    def forward(self, pixels: torch.Tensor):
        return self.model.forward_features(pixels)


def _urepa_compute_loss(original: Callable, options: _Options) -> Callable:
    @functools.wraps(original)
    def compute_loss(self, hidden_states, latents, vae=None, *, step=0):
        if not _can_compute(self, hidden_states, latents, vae, 4):
            return original(self, hidden_states, latents, vae, step=step)
        params, ln_eps = _projector_args(self.projector)
        pixels = self._decode_latents(latents, vae)
        if options.patch_tokens:
            encoder = self.encoder
            self.encoder = _PatchTokens(encoder)
            try:
                target = self._encode_pixels(pixels)
            finally:
                self.encoder = encoder
        else:
            target = self._encode_pixels(pixels)
        losses = urepa_loss(_hidden_for(hidden_states, params[0].dtype), target, *params, ln_eps=ln_eps,
                            backend=options.backend, token_alignment=options.token_alignment)
        return _weighted(self, "urepa_", step, losses, self.manifold_weight)
    return compute_loss


_PATCHES = {"CrepaRegularizer": _crepa_compute_loss, "UrepaRegularizer": _urepa_compute_loss}


def _crepa_module(crepa_module: Optional[ModuleType]) -> ModuleType:
    if crepa_module is not None:
        return crepa_module
    try:
        return importlib.import_module(CREPA_MODULE)
    except ImportError as err:
        raise ImportError(f"repa_fast.integrations.simpletuner needs SimpleTuner ({CREPA_MODULE}): {err}") from err


def apply(crepa_module: Optional[ModuleType] = None, *, patch_tokens: bool = False,
          token_alignment: str = "sequence", backend: Optional[str] = None,
          simpletuner_version: Optional[str] = None) -> None:
    """Make SimpleTuner's CrepaRegularizer (image mode) and UrepaRegularizer compute their losses
    with repa-fast's fused ops; every instance, existing or future, until `revert()`.

    `crepa_module`: SimpleTuner's `simpletuner.helpers.training.crepa` (default: imported), of
    SimpleTuner `simpletuner_version` (default: the installed distribution's); only the versions in
    SUPPORTED_VERSIONS are accepted. `token_alignment`: "sequence" (SimpleTuner's numbers) or
    "grid" (each side bilinear on its grid; differs on non-square grids). `patch_tokens=True`:
    U-REPA aligns to the hub DINOv2's patch tokens rather than its CLS vector (SimpleTuner 4.10.1's
    U-REPA target is one token, so its manifold term is always 0; this changes the numbers, on
    purpose). `backend`: as for every repa-fast loss (None: auto). Calling it again re-patches
    with the new options.
    """
    patch_tokens = check_flag("patch_tokens", patch_tokens)
    options = _Options(patch_tokens, check_token_alignment(token_alignment), check_backend(backend))
    module = _crepa_module(crepa_module)
    version = simpletuner_version
    if version is None:
        try:
            version = importlib.metadata.version("simpletuner")
        except importlib.metadata.PackageNotFoundError as err:
            raise RuntimeError("cannot tell SimpleTuner's version (no installed simpletuner distribution): pass "
                               "simpletuner_version=") from err
    if version not in SUPPORTED_VERSIONS:
        raise RuntimeError(f"repa_fast.integrations.simpletuner.apply() is tested with SimpleTuner "
                           f"{', '.join(SUPPORTED_VERSIONS)} only, found {version}: its regularizers may differ, so "
                           f"nothing was patched")
    for name in _PATCHES:
        cls = getattr(module, name, None)
        if cls is None or not callable(getattr(cls, "compute_loss", None)):
            raise RuntimeError(f"{module.__name__}.{name}.compute_loss not found: not SimpleTuner's crepa module")
    for name, make_patch in _PATCHES.items():
        cls = getattr(module, name)
        original = _originals.setdefault(cls, cls.compute_loss)
        cls.compute_loss = make_patch(original, options)


def revert(crepa_module: Optional[ModuleType] = None) -> None:
    """Give SimpleTuner's regularizers back their own compute_loss (a no-op when not patched)."""
    module = _crepa_module(crepa_module)
    for name in _PATCHES:
        cls = getattr(module, name, None)
        if cls in _originals:
            cls.compute_loss = _originals.pop(cls)


def is_applied(crepa_module: Optional[ModuleType] = None) -> bool:
    module = _crepa_module(crepa_module)
    return any(getattr(module, name, None) in _originals for name in _PATCHES)
