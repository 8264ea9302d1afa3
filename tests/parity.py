"""Shared by every parity suite: the literal formulas of DESIGN.md §1, input makers, the
float64-reference comparison of DESIGN.md §4, and an allocation probe.

The literal formulas build the B x N x N matrices on purpose: they are the ground truth the
torch backend is checked against, and they live only here.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import repa_fast as rf

PROJECTION_ARGS = ("hidden", "ln_weight", "ln_bias", "proj_weight", "proj_bias")

# DESIGN.md §4: relative error against the float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOLERANCE = 1e-3


# ---------------------------------------------------------------- literal formulas (float64)

def literal_cosine(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -(F.normalize(z, dim=-1) * F.normalize(t, dim=-1)).sum(-1).mean()


def literal_manifold(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    zn, tn = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    return ((zn @ zn.transpose(1, 2) - tn @ tn.transpose(1, 2)) ** 2).mean()


def literal_projection(hidden, ln_weight, ln_bias, proj_weight, proj_bias, ln_eps=1e-5):
    if hidden.dim() == 4:
        hidden = hidden.flatten(2).transpose(1, 2)
    return F.linear(F.layer_norm(hidden, (hidden.shape[-1],), ln_weight, ln_bias, ln_eps), proj_weight, proj_bias)


def interpolate_tokens(x: torch.Tensor, src: Tuple[int, ...], dst: Tuple[int, ...]) -> torch.Tensor:
    """(B, N, C) tokens through F.interpolate: bilinear for 2-D grids, linear for 1-D."""
    mode = "bilinear" if len(src) == 2 else "linear"
    y = F.interpolate(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *src), size=dst, mode=mode,
                      align_corners=False)
    return y.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------- inputs

def projection_inputs(batch: int, tokens, hidden_dim: int, target_tokens: int, encoder_dim: int, *,
                      dtype=torch.float32, param_dtype=torch.float32, device="cpu",
                      feature_map: bool = False, noise: float = 0.4) -> Dict[str, torch.Tensor]:
    """hidden (B, tokens, D) — or (B, D, h, w) when `feature_map` and tokens is (h, w) — target
    (B, target_tokens, E) and projector parameters near a trained LayerNorm's (gamma ~ 1).

    The target is the projection itself (resampled to the target's count) plus `noise` times its
    std of noise, as after some training: the cosine loss sits well below 0, where its relative
    error means something (against an unrelated target it is ~0 and every relative error is
    noise). Small `noise` is late training, z -> t, where the manifold loss is ill-conditioned."""
    if feature_map:
        hidden = torch.randn(batch, hidden_dim, *tokens, device=device, dtype=torch.float64)
    else:
        hidden = torch.randn(batch, tokens, hidden_dim, device=device, dtype=torch.float64)
    params = {
        "ln_weight": 1.0 + 0.2 * torch.randn(hidden_dim, device=device, dtype=torch.float64),
        "ln_bias": 0.1 * torch.randn(hidden_dim, device=device, dtype=torch.float64),
        "proj_weight": torch.randn(encoder_dim, hidden_dim, device=device, dtype=torch.float64) / math.sqrt(hidden_dim),
        "proj_bias": 0.1 * torch.randn(encoder_dim, device=device, dtype=torch.float64),
    }
    hidden = hidden * 2.0 + 0.5
    if hidden.numel() and target_tokens and encoder_dim and device != "meta":
        z = literal_projection(hidden, *params.values())
        z = interpolate_tokens(z, (z.shape[1],), (target_tokens,))
        target = (z + noise * z.std() * torch.randn_like(z)).contiguous()
    else:   # empty or meta inputs (validation tests): nothing to correlate with
        target = torch.randn(batch, target_tokens, encoder_dim, device=device, dtype=torch.float64)
    return {"hidden": hidden.to(dtype), "target": target.to(dtype),
            **{name: value.to(param_dtype) for name, value in params.items()}}


LATE_TRAINING_NOISES = (0.05, 0.01, 0.001)


def late_training_pair(batch: int, tokens: int, dim: int, noise: float, *, dtype=torch.float32,
                       target_dtype: Optional[torch.dtype] = None, device="cpu") -> Dict[str, torch.Tensor]:
    """(projected, target) late in training: target = projected + `noise` times its std of noise
    (z -> t, where the manifold loss is ill-conditioned: see assert_matches_reference). The small
    scale keeps 16-bit gradients, about 4 sqrt(N) noise / (B N^2 |z|), clear of fp16's subnormals."""
    z = 0.01 * torch.randn(batch, tokens, dim, device=device, dtype=torch.float64)
    target = z + noise * z.std() * torch.randn_like(z)
    return {"projected": z.to(dtype), "target": target.to(target_dtype or dtype)}


def mlp_head_inputs(batch: int, tokens: int, hidden_dim: int, target_tokens: int, encoder_dim: int, *,
                    dtype=torch.float32, device="cpu", noise: float = 0.4) -> Dict[str, torch.Tensor]:
    """The last Linear of an MLP projector head (no LayerNorm): hidden = SiLU activations (not
    unit-variance, mostly positive), the projector's weight and bias (fp32), and a target: the
    projection (square grids resampled to the target's count) plus `noise` times its std."""
    hidden = F.silu(2.0 * torch.randn(batch, tokens, hidden_dim, device=device, dtype=torch.float64))
    proj_weight = torch.randn(encoder_dim, hidden_dim, device=device, dtype=torch.float64) / math.sqrt(hidden_dim)
    proj_bias = 0.1 * torch.randn(encoder_dim, device=device, dtype=torch.float64)
    z = F.linear(hidden, proj_weight, proj_bias)
    if target_tokens != tokens:
        z = interpolate_tokens(z, (math.isqrt(tokens),) * 2, (math.isqrt(target_tokens),) * 2)
    target = z + noise * z.std() * torch.randn_like(z)
    return {"hidden": hidden.to(dtype), "target": target.to(dtype), "proj_weight": proj_weight.float(),
            "proj_bias": proj_bias.float()}


MLP_HEAD_ARGS = ("hidden", "proj_weight", "proj_bias")


def without_layer_norm(loss_name: str) -> Callable:
    """The backends' `loss_name` ("repa_loss", "urepa_loss") with ln_weight = ln_bias = None, as
    the mlp head calls them (repa_fast/projectors.py), taking mlp_head_inputs and `backend`."""
    from repa_fast.alignment import plan_alignment
    from repa_fast.backends import resolve_backend

    def loss(hidden, target, proj_weight, proj_bias, *, backend):
        plan = plan_alignment(hidden.shape[1], target.shape[1])
        module = resolve_backend(backend, hidden.device)
        return getattr(module, loss_name)(hidden, target, None, None, proj_weight, proj_bias, plan, 0.0)
    return loss


def cast(inputs: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in inputs.items()}


# ---------------------------------------------------------------- comparison

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere is infinitely wrong."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


def outputs_and_grads(fn: Callable, inputs: Dict[str, torch.Tensor], grad_names: Sequence[str],
                      **kwargs) -> Dict[str, torch.Tensor]:
    """Each output of fn(**inputs) and the gradient of each output w.r.t. each named input,
    keyed "out0", "out0/hidden", ..."""
    leaves = {k: (v.detach().clone().requires_grad_(k in grad_names)) for k, v in inputs.items()}
    outs = fn(**leaves, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    result = {}
    for i, out in enumerate(outs):
        result[f"out{i}"] = out.detach()
        grads = torch.autograd.grad(out, [leaves[n] for n in grad_names], retain_graph=True, allow_unused=True)
        for name, grad in zip(grad_names, grads):
            result[f"out{i}/{name}"] = torch.zeros_like(leaves[name]) if grad is None else grad
    return result


def assert_matches_reference(fn: Callable, inputs: Dict[str, torch.Tensor], *, backend: str,
                             grad_names: Sequence[str] = PROJECTION_ARGS, tolerance: Optional[float] = None,
                             ill_conditioned: bool = False, **kwargs) -> Dict[str, float]:
    """DESIGN.md §4: every output and gradient of `backend` within `tolerance` of the float64
    torch reference, and no worse than the torch backend in the same dtype plus that margin.
    `ill_conditioned` inputs (z -> t) turn the rounding of the inputs themselves into errors beyond
    `tolerance`, in the torch backend too: only the margin over torch applies. Returns the errors."""
    dtype = inputs["hidden"].dtype if "hidden" in inputs else inputs["projected"].dtype
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    reference = outputs_and_grads(fn, cast(inputs, torch.float64), grad_names, backend="torch", **kwargs)
    same_dtype_torch = outputs_and_grads(fn, inputs, grad_names, backend="torch", **kwargs)
    result = outputs_and_grads(fn, inputs, grad_names, backend=backend, **kwargs)
    errors = {}
    for key, ref in reference.items():
        err, torch_err = rel_err(result[key], ref), rel_err(same_dtype_torch[key], ref)
        errors[key] = err
        assert (ill_conditioned or err <= tolerance) and err <= torch_err + tolerance, (
            f"{backend} {key}: rel err {err:.3g} (torch backend in {dtype}: {torch_err:.3g}, tolerance {tolerance:g})")
    return errors


# ---------------------------------------------------------------- allocation probe

class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) any op produces while active: every allocation
    torch can see, the autograd engine's included (not the Triton interpreter's uint8 copies of
    kernel arguments)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            # uint8 tensors are the Triton interpreter's byte copies of kernel arguments, not data.
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.numel = max(self.numel, t.numel())
        return out
