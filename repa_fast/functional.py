"""Public loss functions (DESIGN.md §2): validate, read feature maps as tokens, plan the
alignment, then hand the work to the backend picked for these tensors.

Targets are frozen encoder features: they are detached here, on every backend, so no
gradient ever flows into them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .alignment import Grid, check_token_alignment, plan_alignment, resample_tokens
from .backends import resolve_backend
from .reference import compute_dtype, linear_then_resample
from .validation import (TOKEN_LAYOUTS, as_tokens, check_batch, check_eps, check_finite_if_asked, check_flag,
                         check_param_dtypes, check_projector, check_same_device, check_tensor)


def _prepare_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, hidden_grid, target_grid,
                        spatial_align, ln_eps, token_alignment) -> tuple:
    """The backend's arguments: hidden tokens, the detached target, the four parameters, the
    alignment plan and ln_eps."""
    h, h_grid = as_tokens("hidden", hidden, hidden_grid)
    t, t_grid = as_tokens("target", target, target_grid, allow_feature_map=False)
    check_batch("hidden", hidden, "target", target)
    params = dict(ln_weight=ln_weight, ln_bias=ln_bias, proj_weight=proj_weight, proj_bias=proj_bias)
    check_projector(hidden, **params, target=target)
    check_param_dtypes(hidden, **params)
    check_same_device(hidden=hidden, target=target, **params)
    eps = check_eps(ln_eps)
    check_token_alignment(token_alignment)
    check_finite_if_asked(hidden=hidden, target=target, **params)
    plan = plan_alignment(h.shape[1], t.shape[1], h_grid, t_grid, check_flag("spatial_align", spatial_align),
                          token_alignment)
    # Backends may assume contiguous parameters: they are small, so a strided one (a transposed
    # weight, a slice of a shared buffer) costs one cheap copy here.
    return (h, t.detach(), *(param.contiguous() for param in params.values()), plan, eps)


def _prepare_pair(projected, target) -> Tuple[torch.Tensor, torch.Tensor]:
    check_tensor("projected", projected, TOKEN_LAYOUTS)
    check_tensor("target", target, TOKEN_LAYOUTS)
    if projected.shape != target.shape:
        raise ValueError(f"projected and target must have the same (B, N, E) shape, got projected "
                         f"{tuple(projected.shape)} and target {tuple(target.shape)}; "
                         f"align them first with align_tokens")
    check_same_device(projected=projected, target=target)
    check_finite_if_asked(projected=projected, target=target)
    return projected, target.detach()


def _several_encoders_repa_loss(hidden, targets, ln_weights, ln_biases, proj_weights, proj_biases, hidden_grid,
                                target_grids, spatial_align, ln_eps, backend, token_alignment) -> torch.Tensor:
    """The mean over encoders of repa_loss, reading hidden once: one LayerNorm (each encoder's
    affine folds into its Linear, LN_k(h) W_k^T + b_k = xhat (W_k diag g_k)^T + (W_k beta_k + b_k))
    and one GEMM over the stacked folded weights per hidden-side alignment, the cosine reduced
    per encoder's segment of the output columns."""
    count = len(targets)
    lists = dict(ln_weight=ln_weights, ln_bias=ln_biases, proj_weight=proj_weights, proj_bias=proj_biases,
                 target_grid=[None] * count if target_grids is None else target_grids)
    for name, values in lists.items():
        if not isinstance(values, (list, tuple)) or len(values) != count:
            raise ValueError(f"with a list of {count} targets, {name} must be a list of {count} (one per encoder), "
                             f"got {type(values).__name__}" + (f" of {len(values)}" if isinstance(values, (list, tuple))
                                                               else ""))
    prepared = [_prepare_projection(hidden, *encoder, hidden_grid, grid, spatial_align, ln_eps, token_alignment)
                for *encoder, grid in zip(targets, *lists.values())]
    module = resolve_backend(backend, hidden.device)
    if count == 1:
        return module.repa_loss(*prepared[0])
    h = prepared[0][0]
    dtype = compute_dtype(h, *(args[4] for args in prepared))
    xhat = F.layer_norm(h.to(dtype), (h.shape[-1],), eps=prepared[0][7])
    losses = []
    for step in dict.fromkeys(args[6].a for args in prepared):   # distinct hidden-side plans, in order
        group = [args for args in prepared if args[6].a == step]
        weights = [args[4].to(dtype) * args[2].to(dtype) for args in group]
        biases = [args[4].to(dtype) @ args[3].to(dtype) + args[5].to(dtype) for args in group]
        z = linear_then_resample(xhat, torch.cat(weights), torch.cat(biases), step)
        for segment, args in zip(z.split([w.shape[0] for w in weights], dim=-1), group):
            losses.append(module.cosine_alignment_loss(segment, resample_tokens(args[1], args[6].b)))
    return torch.stack(losses).mean()


def repa_loss(hidden: torch.Tensor, target: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
              proj_weight: torch.Tensor, proj_bias: torch.Tensor, *, hidden_grid: Optional[Grid] = None,
              target_grid: Optional[Grid] = None, spatial_align: bool = True, ln_eps: float = 1e-5,
              backend: Optional[str] = None, token_alignment: str = "grid") -> torch.Tensor:
    """REPA alignment loss: -mean cos(align(LayerNorm(hidden) @ W^T + b), align(target)).

    hidden: (B, S, D) tokens or a (B, D, H, W) feature map; target: (B, N, E) encoder tokens;
    ln_weight, ln_bias: (D,); proj_weight: (E, D); proj_bias: (E,). Returns a scalar in [-1, 1].
    `token_alignment`: "grid" (each side bilinear on its own grid) or "sequence" (SimpleTuner's rule).

    Several encoders: `target` a list of (B, N_k, E_k), each of the four parameters and
    `target_grid` (or None) a list of the same length; returns the mean over encoders.
    """
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, torch.Tensor) for t in target):
        return _several_encoders_repa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, hidden_grid,
                                           target_grid, spatial_align, ln_eps, backend, token_alignment)
    args = _prepare_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, hidden_grid, target_grid,
                               spatial_align, ln_eps, token_alignment)
    return resolve_backend(backend, hidden.device).repa_loss(*args)


def urepa_loss(hidden: torch.Tensor, target: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
               proj_weight: torch.Tensor, proj_bias: torch.Tensor, *, hidden_grid: Optional[Grid] = None,
               target_grid: Optional[Grid] = None, ln_eps: float = 1e-5,
               backend: Optional[str] = None, token_alignment: str = "grid") -> Tuple[torch.Tensor, torch.Tensor]:
    """U-REPA: (alignment loss, manifold loss) of one projection, aligned spatially as repa_loss.
    The trainer's total is lambda * (alignment + manifold_weight * manifold)."""
    args = _prepare_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, hidden_grid, target_grid,
                               True, ln_eps, token_alignment)
    return resolve_backend(backend, hidden.device).urepa_loss(*args)


def cosine_alignment_loss(projected: torch.Tensor, target: torch.Tensor, *,
                          backend: Optional[str] = None) -> torch.Tensor:
    """-mean over (b, n) of cos(projected[b, n], target[b, n]); both (B, N, E)."""
    z, t = _prepare_pair(projected, target)
    return resolve_backend(backend, z.device).cosine_alignment_loss(z, t)


def manifold_loss(projected: torch.Tensor, target: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """mean over (b, i, j) of (cos(z_bi, z_bj) - cos(t_bi, t_bj))^2; both (B, N, E). Never builds
    the N x N matrices."""
    z, t = _prepare_pair(projected, target)
    return resolve_backend(backend, z.device).manifold_loss(z, t)


def align_tokens(a: torch.Tensor, b: torch.Tensor, *, a_grid: Optional[Grid] = None, b_grid: Optional[Grid] = None,
                 spatial_align: bool = True, token_alignment: str = "grid") -> Tuple[torch.Tensor, torch.Tensor]:
    """Resample (B, Na, Ca) and (B, Nb, Cb) tokens (or (B, C, H, W) feature maps) to one token
    count, the smaller one (DESIGN.md §1). Returns (B, N, Ca) and (B, N, Cb)."""
    a_tokens, a_grid = as_tokens("a", a, a_grid)
    b_tokens, b_grid = as_tokens("b", b, b_grid)
    check_batch("a", a, "b", b)
    check_same_device(a=a, b=b)
    check_finite_if_asked(a=a, b=b)
    plan = plan_alignment(a_tokens.shape[1], b_tokens.shape[1], a_grid, b_grid,
                          check_flag("spatial_align", spatial_align), token_alignment)
    return resample_tokens(a_tokens, plan.a), resample_tokens(b_tokens, plan.b)
