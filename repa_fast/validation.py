"""Input checks shared by every public entry point, run before any backend sees the tensors, so
every backend rejects the same input with the same message.

Bad input raises `ValueError` (shapes, sizes, values, devices) or `TypeError` (not a tensor, not
a dense floating tensor, a parameter dtype that matches neither float32 nor the activations),
naming the argument, what was seen and what was expected.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Dict, Optional, Tuple

import torch

from .alignment import Grid

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Accepted layouts, by number of dims.
HIDDEN_LAYOUTS = {3: "(B, S, D) tokens", 4: "a (B, D, H, W) feature map"}
TOKEN_LAYOUTS = {3: "(B, N, E) tokens"}
PARAM_LAYOUTS = {"ln_weight": {1: "(D,)"}, "ln_bias": {1: "(D,)"}, "proj_weight": {2: "(E, D)"},
                 "proj_bias": {1: "(E,)"}}


def check_tensor(name: str, x, layouts: Dict[int, str]) -> torch.Tensor:
    """A dense floating tensor with one of the `layouts` ranks and no zero-sized dim."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() not in layouts:
        raise ValueError(f"{name} must be {' or '.join(layouts.values())} "
                         f"({' or '.join(map(str, layouts))} dims), got shape {tuple(x.shape)} ({x.dim()} dims)")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty, shape {tuple(x.shape)}: batch, token and feature sizes must all be >= 1")
    return x


def check_grid(name: str, grid) -> Optional[Grid]:
    """None, or a pair of positive ints (h, w) returned as a tuple of ints."""
    if grid is None:
        return None
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"{name} must be None or a pair of positive ints (h, w), got {grid!r}")
    return (int(grid[0]), int(grid[1]))


def as_tokens(name: str, x, grid, *, allow_feature_map: bool = True) -> Tuple[torch.Tensor, Optional[Grid]]:
    """(B, S, C) tokens stay as they are; a (B, C, H, W) feature map becomes the (B, H*W, C)
    view of its tokens (no copy) with grid (H, W). A grid given must cover the tokens."""
    check_tensor(name, x, HIDDEN_LAYOUTS if allow_feature_map else TOKEN_LAYOUTS)
    grid = check_grid(f"{name}_grid", grid)
    if x.dim() == 4:
        fm_grid = (x.shape[2], x.shape[3])
        if grid is not None and grid != fm_grid:
            raise ValueError(f"{name} is a feature map of grid {fm_grid} (shape {tuple(x.shape)}) "
                             f"but {name}_grid={grid} was given; pass None or {fm_grid}")
        return x.flatten(2).transpose(1, 2), fm_grid
    if grid is not None and grid[0] * grid[1] != x.shape[1]:
        raise ValueError(f"{name}_grid={grid} has {grid[0] * grid[1]} cells but there are {x.shape[1]} tokens in "
                         f"{name} of shape {tuple(x.shape)}; expected h * w == {x.shape[1]}")
    return x, grid


def check_same_device(**tensors: torch.Tensor) -> None:
    by_device: Dict[torch.device, list] = {}
    for name, t in tensors.items():
        by_device.setdefault(t.device, []).append(name)
    if len(by_device) > 1:
        seen = " and ".join(f"{', '.join(names)} on {device}" for device, names in by_device.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")


def check_batch(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a_name} of shape {tuple(a.shape)} has batch {a.shape[0]}, "
                         f"{b_name} of shape {tuple(b.shape)} has batch {b.shape[0]}; expected the same B")


def check_projector(hidden: torch.Tensor, ln_weight, ln_bias, proj_weight, proj_bias,
                    target: Optional[torch.Tensor] = None) -> None:
    """hidden (.., D) -> LayerNorm(D) -> Linear(D -> E) must agree with target (.., E) when given."""
    params = {"ln_weight": ln_weight, "ln_bias": ln_bias, "proj_weight": proj_weight, "proj_bias": proj_bias}
    for name, param in params.items():
        check_tensor(name, param, PARAM_LAYOUTS[name])
    features = hidden.shape[1] if hidden.dim() == 4 else hidden.shape[-1]
    seen_hidden = f"hidden of shape {tuple(hidden.shape)} has {features} features"
    for name in ("ln_weight", "ln_bias"):
        if tuple(params[name].shape) != (features,):
            raise ValueError(f"{name} has shape {tuple(params[name].shape)} but {seen_hidden}; expected ({features},)")
    out_features, in_features = proj_weight.shape
    if in_features != features:
        raise ValueError(f"proj_weight has shape {tuple(proj_weight.shape)}, {in_features} in-features, but the "
                         f"LayerNorm (ln_weight) has {features} and {seen_hidden}; "
                         f"expected ({out_features}, {features})")
    if target is not None and out_features != target.shape[-1]:
        raise ValueError(f"proj_weight has shape {tuple(proj_weight.shape)}, {out_features} out-features, but target "
                         f"of shape {tuple(target.shape)} has {target.shape[-1]} features; "
                         f"expected ({target.shape[-1]}, {features})")
    if tuple(proj_bias.shape) != (out_features,):
        raise ValueError(f"proj_bias has shape {tuple(proj_bias.shape)} but proj_weight of shape "
                         f"{tuple(proj_weight.shape)} has {out_features} out-features; expected ({out_features},)")


def check_param_dtypes(hidden: torch.Tensor, **params: torch.Tensor) -> None:
    """Projector parameters are float32 (master weights) or hidden's dtype: what backends expect."""
    for name, param in params.items():
        if param.dtype not in (torch.float32, hidden.dtype):
            raise TypeError(f"{name} has dtype {param.dtype} and hidden {hidden.dtype}: projector parameters must "
                            f"be float32 or hidden's dtype")


def check_eps(ln_eps) -> float:
    if isinstance(ln_eps, bool) or not isinstance(ln_eps, numbers.Real) or not math.isfinite(ln_eps) or ln_eps <= 0:
        raise ValueError(f"ln_eps must be a finite number > 0, got {ln_eps!r}")
    return float(ln_eps)


def check_flag(name: str, value) -> bool:
    """A bool argument; a string such as "false" would otherwise read as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_finite_if_asked(**tensors: torch.Tensor) -> None:
    """`REPA_FAST_CHECK_FINITE=1` turns a NaN/Inf input into an error naming the tensor (it costs
    one device sync per tensor, so it is opt-in; without it NaN propagates to the loss)."""
    if os.environ.get("REPA_FAST_CHECK_FINITE", "0") in ("", "0"):
        return
    for name, t in tensors.items():
        if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
            continue  # no values to check (shape propagation, torch.compile tracing)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds non-finite values (NaN or Inf), shape {tuple(t.shape)} "
                             f"(REPA_FAST_CHECK_FINITE=1 is set)")
