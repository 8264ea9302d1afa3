"""Input checks shared by every public entry point, run before any backend sees the tensors.

Bad input raises `ValueError` (shapes, sizes, values) or `TypeError` (not a tensor, not a
floating dtype), naming the argument, what was seen and what was expected.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch

from .alignment import Grid

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndims: Sequence[int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    return x


def check_grid(name: str, grid, tokens: int) -> Optional[Grid]:
    if grid is None:
        return None
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"{name} must be a pair of positive ints (h, w), got {grid!r}")
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"{name}={tuple(grid)} has {grid[0] * grid[1]} cells but there are {tokens} tokens")
    return (int(grid[0]), int(grid[1]))


def as_tokens(name: str, x, grid, *, allow_feature_map: bool = True) -> Tuple[torch.Tensor, Optional[Grid]]:
    """(B, S, C) tokens stay as they are; a (B, C, H, W) feature map becomes the (B, H*W, C)
    view of its tokens (no copy) with grid (H, W)."""
    check_tensor(name, x, (3, 4) if allow_feature_map else (3,))
    if x.dim() == 4:
        fm_grid = (x.shape[2], x.shape[3])
        if grid is not None and tuple(grid) != fm_grid:
            raise ValueError(f"{name} is a feature map of grid {fm_grid} but {name}_grid={tuple(grid)} was given")
        return x.flatten(2).transpose(1, 2), fm_grid
    return x, check_grid(f"{name}_grid", grid, x.shape[1])


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")


def check_batch(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a_name} has {a.shape[0]} ({tuple(a.shape)}), "
                         f"{b_name} has {b.shape[0]} ({tuple(b.shape)})")


def check_projector(hidden_dim: int, encoder_dim: int, ln_weight, ln_bias, proj_weight, proj_bias) -> None:
    """hidden (.., D) -> LayerNorm(D) -> Linear(D -> E) must agree with target (.., E)."""
    check_tensor("ln_weight", ln_weight, (1,))
    check_tensor("ln_bias", ln_bias, (1,))
    check_tensor("proj_weight", proj_weight, (2,))
    check_tensor("proj_bias", proj_bias, (1,))
    for name, t, want in (("ln_weight", ln_weight, (hidden_dim,)), ("ln_bias", ln_bias, (hidden_dim,)),
                          ("proj_weight", proj_weight, (encoder_dim, hidden_dim)), ("proj_bias", proj_bias, (encoder_dim,))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} for hidden dim {hidden_dim} and target dim "
                             f"{encoder_dim}, got {tuple(t.shape)}")


def check_eps(ln_eps) -> float:
    if isinstance(ln_eps, bool) or not isinstance(ln_eps, (int, float)) or not math.isfinite(ln_eps) or ln_eps <= 0:
        raise ValueError(f"ln_eps must be a finite number > 0, got {ln_eps!r}")
    return float(ln_eps)


def check_finite_if_asked(**tensors: torch.Tensor) -> None:
    """`REPA_FAST_CHECK_FINITE=1` turns a NaN/Inf input into an error naming the tensor (it costs
    one device sync per tensor, so it is opt-in; without it NaN propagates to the loss)."""
    if os.environ.get("REPA_FAST_CHECK_FINITE", "0") in ("", "0"):
        return
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds non-finite values (NaN or Inf); shape {tuple(t.shape)}")
