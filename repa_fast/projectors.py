"""The losses of each projector kind a `RepaProjector` can be (DESIGN.md §2 additions), with
iREPA's spatial z-score of the target.

- "layernorm_linear" (SimpleTuner's): the fused `repa_loss` / `urepa_loss` of every backend.
- "mlp" (REPA's `build_mlp`): the layers before the last run through torch (cuBLAS); the last
  Linear goes to the backend's `repa_loss` / `urepa_loss` with `ln_weight = ln_bias = None` (the
  LayerNorm + Linear head without its LayerNorm): fused with the alignment and the loss terms.
- "conv" (iREPA's): the convolution through torch (cuDNN) on the hidden tokens' grid, then the
  alignment and the backend's cosine (and manifold) terms. iREPA's target z-score is fused with
  them: the backend's `target_zscore` gives its per-(sample, channel) affine map from the
  target in one pass, the loss terms apply it as they load the (resampled) target.

The torch backend is the reference: its torch layers run in the compute dtype (float32 for
half-precision activations, as a trainer's fp32 projector does); the fused backends run them in
the activations' dtype (tensor cores, fp32 accumulation).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import Grid, plan_alignment, resample_tokens, square_grid
from .backends import backend_name, resolve_backend
from .functional import repa_loss, urepa_loss
from .reference import compute_dtype, spatial_zscore
from .validation import as_tokens, check_batch, check_finite_if_asked, check_flag, check_same_device

PROJECTOR_KINDS = ("layernorm_linear", "mlp", "conv")


def check_projector_kind(kind) -> str:
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"projector kind must be one of {', '.join(map(repr, PROJECTOR_KINDS))}, got {kind!r}")
    return kind


def check_zscore_alpha(alpha) -> Optional[float]:
    """None (no z-score) or a finite number >= 0 (iREPA: 0.6)."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
        raise ValueError(f"target_zscore_alpha must be None or a finite number >= 0, got {alpha!r}")
    return float(alpha)


def _layer_dtype(hidden: torch.Tensor, params: Tuple[torch.Tensor, ...], backend: str) -> torch.dtype:
    if backend != "torch" and hidden.dtype in (torch.float16, torch.bfloat16):
        return hidden.dtype
    return compute_dtype(hidden, *params)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))


def _check_widths(projector, hidden: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor) -> None:
    expected = (projector.hidden_dim, projector.encoder_dim)
    seen = (tokens.shape[-1], target.shape[-1])
    if seen != expected:
        raise ValueError(f"the {projector.kind} projector maps {expected[0]} -> {expected[1]} features, but hidden of "
                         f"shape {tuple(hidden.shape)} has {seen[0]} and target of shape {tuple(target.shape)} "
                         f"has {seen[1]}")


def _conv_tokens(projector, tokens: torch.Tensor, grid: Grid, dtype: torch.dtype) -> torch.Tensor:
    """The conv head on (B, S, D) tokens laid out row-major on `grid` -> (B, S, E) tokens, rows
    contiguous for the loss kernels. Contiguous (B, S, D) tokens make a channels-last feature map,
    and the convolution's output on CPU and through cuDNN is channels-last then: no copy."""
    conv = projector.conv
    fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid).to(dtype)
    out = F.conv2d(fmap, conv.weight.to(dtype), conv.bias.to(dtype), padding=conv.padding)
    return out.flatten(2).transpose(1, 2).contiguous()


def projector_losses(projector, hidden: torch.Tensor, target: torch.Tensor, *, hidden_grid: Optional[Grid] = None,
                     target_grid: Optional[Grid] = None, spatial_align: bool = True,
                     target_zscore_alpha: Optional[float] = None, manifold: bool = False,
                     backend: Optional[str] = None, token_alignment: str = "grid") -> Tuple[torch.Tensor, ...]:
    """(L_align,) or, with `manifold`, (L_align, L_manifold) of `projector` (a RepaProjector)
    on `hidden` against `target`, z-scoring the target over its tokens first when
    `target_zscore_alpha` is a number (iREPA, before the alignment as SimpleTuner does).
    `token_alignment` as repa_loss's (the conv head still runs on the hidden tokens' grid)."""
    alpha = check_zscore_alpha(target_zscore_alpha)
    tokens, h_grid = as_tokens("hidden", hidden, hidden_grid)
    t, t_grid = as_tokens("target", target, target_grid, allow_feature_map=False)
    t = t.detach()
    if alpha is not None and projector.kind != "conv":
        t = spatial_zscore(t, alpha)
    if projector.kind == "layernorm_linear":
        kwargs = dict(hidden_grid=hidden_grid, target_grid=t_grid, ln_eps=projector.norm.eps, backend=backend,
                      token_alignment=token_alignment)
        if manifold:
            return urepa_loss(hidden, t, *projector.loss_args(), **kwargs)
        return (repa_loss(hidden, t, *projector.loss_args(), spatial_align=spatial_align, **kwargs),)
    check_batch("hidden", hidden, "target", target)
    _check_widths(projector, hidden, tokens, t)
    params = tuple(projector.parameters())
    check_same_device(hidden=hidden, target=target, projector=params[0])
    check_finite_if_asked(hidden=hidden, target=target)
    name = backend_name(backend, hidden.device)
    dtype = _layer_dtype(hidden, params, name)
    if projector.kind == "mlp":
        x = tokens.to(dtype)
        for layer in projector.hidden_layers:
            x = _linear(x, layer) if isinstance(layer, nn.Linear) else layer(x)
        plan = plan_alignment(x.shape[1], t.shape[1], h_grid, t_grid, check_flag("spatial_align", spatial_align),
                              token_alignment)
        # the last Linear is the LayerNorm + Linear head without its LayerNorm (ln_weight None)
        args = (x, t, None, None, projector.linear.weight, projector.linear.bias, plan, 0.0)
        module = resolve_backend(backend, hidden.device)
        return module.urepa_loss(*args) if manifold else (module.repa_loss(*args),)
    else:
        grid = h_grid if h_grid is not None else square_grid(tokens.shape[1])
        if grid is None:
            raise ValueError(f"the conv projector needs the hidden tokens' grid: hidden of shape {tuple(hidden.shape)} "
                             f"has {tokens.shape[1]} tokens, not a square; pass hidden_grid=(h, w) or a "
                             f"(B, D, H, W) feature map")
        z = _conv_tokens(projector, tokens, grid, dtype)
        plan = plan_alignment(z.shape[1], t.shape[1], grid, t_grid, check_flag("spatial_align", spatial_align),
                              token_alignment)
        module = resolve_backend(backend, hidden.device)
        if alpha is None:
            t_affine = None
            t = resample_tokens(t, plan.b).to(z.dtype)
        else:
            # the z-score's statistics in one pass over the target as it is; the affine map they
            # give commutes with the resampling and is applied where the loss kernels load t.
            # A resampled target is resampled in fp32 (or float64): rounding the raw values to
            # 16 bits would swamp a small std under a large mean.
            t_affine = module.target_zscore(t, alpha)
            t = t if plan.b is None else resample_tokens(t.to(compute_dtype(t)), plan.b)
        z = resample_tokens(z, plan.a)
        align = module.cosine_alignment_loss(z, t, t_affine)
        return (align, module.manifold_loss(z, t, t_affine)) if manifold else (align,)
