"""The torch backend: the reference semantics of DESIGN.md §1 in plain PyTorch, and the CPU
fallback. Half-precision inputs are computed in float32 (float64 inputs in float64), as a
trainer's fp32 projector does; gradients come back in each input's dtype.

It never allocates a B x N x N tensor: the manifold loss uses the Gram form (E x E products)
when that is cheaper, else the direct form over row chunks with its gradient computed in the
same pass.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .alignment import AlignmentPlan, Resample, resample_tokens

# Direct-form chunks hold B x rows x N fp32 values; 2**24 of them is 64 MiB.
_CHUNK_ELEMENTS = 2 ** 24


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def use_gram_form(tokens: int, dim: int) -> bool:
    """Direct form costs ~6 N^2 E flops with its gradient, the Gram form ~10 N E^2."""
    return 3 * tokens > 5 * dim


def aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan: AlignmentPlan,
                       ln_eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """z = align(P(hidden)), t = align(target) in the compute dtype. `ln_weight` None: no
    LayerNorm, P is the Linear alone (the last layer of an MLP head)."""
    dtype = compute_dtype(hidden, target, proj_weight)
    x = hidden.to(dtype)
    if ln_weight is not None:
        x = F.layer_norm(x, (hidden.shape[-1],), ln_weight.to(dtype), ln_bias.to(dtype), ln_eps)
    z = linear_then_resample(x, proj_weight.to(dtype), proj_bias.to(dtype), plan.a)
    return z, resample_tokens(target.to(dtype), plan.b)


def linear_then_resample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         step: Optional[Resample]) -> torch.Tensor:
    """resample(x @ W^T + b, step), resampling x first when that shrinks the tokens (fewer rows
    to project; exact, the resampling weights sum to one)."""
    if step is not None and step.dst_tokens < step.src_tokens:
        return F.linear(resample_tokens(x, step), weight, bias)
    return resample_tokens(F.linear(x, weight, bias), step)


def target_zscore(target: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's target normalisation as a per-(sample, channel) affine map over the N tokens of
    a (B, N, E) target: (2, B, E) = (shift, scale) with shift = alpha * mean_n, scale =
    1 / (std_n + eps), unbiased std (0 when N == 1), in the compute dtype; applied by
    `apply_target_affine` as (t - shift) * scale. Token resampling commutes with it (its weights
    sum to one), so it may be applied to the resampled target."""
    y = target.to(compute_dtype(target))
    std = y.std(dim=1, correction=1 if y.shape[1] > 1 else 0)
    return torch.stack((alpha * y.mean(dim=1), 1.0 / (std + eps)))


def apply_target_affine(target: torch.Tensor, t_affine: Optional[torch.Tensor]) -> torch.Tensor:
    """(target - shift) * scale per (sample, channel) in the compute dtype; the target itself
    when `t_affine` is None."""
    if t_affine is None:
        return target
    dtype = compute_dtype(target, t_affine)
    shift, scale = t_affine.to(dtype).unsqueeze(2)
    return (target.to(dtype) - shift) * scale


def spatial_zscore(tokens: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's target normalisation, per sample and channel over the N tokens of (B, N, E):
    `(y - alpha * mean_n(y)) / (std_n(y) + eps)`, unbiased std (0 when N == 1). Computed and
    returned in the compute dtype (float32 for half-precision targets)."""
    return apply_target_affine(tokens, target_zscore(tokens, alpha, eps))


def _cosine_of_normalized(zn: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
    return -(zn * tn).sum(-1).mean()


class _DirectManifoldSum(torch.autograd.Function):
    """sum over (b, i, j) of (zn_i . zn_j - tn_i . tn_j)^2, one chunk of rows i at a time.

    The loss ends the graph, so the gradient 4 (Zn Zn^T - Tn Tn^T) Zn is accumulated in the
    same chunk loop and backward only scales it.
    """

    @staticmethod
    def forward(ctx, zn: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = zn.shape
        rows = max(1, _CHUNK_ELEMENTS // (batch * tokens))
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(zn) if want_grad else None
        total = zn.new_zeros(())
        for start in range(0, tokens, rows):
            stop = min(start + rows, tokens)
            diff = torch.baddbmm(zn[:, start:stop] @ zn.transpose(1, 2), tn[:, start:stop], tn.transpose(1, 2),
                                 alpha=-1.0)
            total += diff.square().sum()
            if want_grad:
                grad[:, start:stop] = torch.bmm(diff, zn)
        if want_grad:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * (4.0 * grad_total), None


class _GramManifoldSum(torch.autograd.Function):
    """sum over samples of ||Zn Zn^T - Tn Tn^T||_F^2 from E x E products only.

    With S = Zn + Tn and D = Zn - Tn, Zn Zn^T - Tn Tn^T = (S D^T + D S^T) / 2, so the sum is
    (<P, Q> + <R, R^T>) / 2 with P = S^T S, Q = D^T D, R = S^T D: the same three GEMMs as the
    textbook ||Z^T Z||^2 - 2 ||Z^T T||^2 + ||T^T T||^2, without its cancellation of large terms
    when the rows share a direction or Zn is close to Tn (fp32 error 1e-3 -> 1e-7 on such
    inputs). The gradient 4 (Zn Zn^T - Tn Tn^T) Zn = [S | D] @ [R^T + Q ; P + R] is one more GEMM
    in the forward; backward only scales it.
    """

    @staticmethod
    def forward(ctx, zn: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
        s, d = zn + tn, zn - tn
        st = s.transpose(1, 2)
        p, q, r = st @ s, d.transpose(1, 2) @ d, st @ d
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(torch.cat([s, d], 2) @ torch.cat([r.transpose(1, 2) + q, p + r], 1))
        return 0.5 * ((p * q).sum() + (r * r.transpose(1, 2)).sum())

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None


def _manifold_of_normalized(zn: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
    batch, tokens, dim = zn.shape
    if use_gram_form(tokens, dim):
        total = _GramManifoldSum.apply(zn, tn)
    else:
        total = _DirectManifoldSum.apply(zn, tn)
    return total / (batch * tokens * tokens)


def _normalized_pair(projected, target, t_affine) -> Tuple[torch.Tensor, torch.Tensor]:
    target = apply_target_affine(target, t_affine)
    dtype = compute_dtype(projected, target)
    return F.normalize(projected.to(dtype), dim=-1), F.normalize(target.to(dtype), dim=-1)


def cosine_alignment_loss(projected: torch.Tensor, target: torch.Tensor,
                          t_affine: Optional[torch.Tensor] = None) -> torch.Tensor:
    """-mean cos(z, t'), t' = the target through `t_affine` (`target_zscore`) when given."""
    return _cosine_of_normalized(*_normalized_pair(projected, target, t_affine))


def manifold_loss(projected: torch.Tensor, target: torch.Tensor,
                  t_affine: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _manifold_of_normalized(*_normalized_pair(projected, target, t_affine))


def repa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan: AlignmentPlan,
              ln_eps: float) -> torch.Tensor:
    z, t = aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps)
    return _cosine_of_normalized(F.normalize(z, dim=-1), F.normalize(t, dim=-1))


def urepa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan: AlignmentPlan,
               ln_eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    z, t = aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps)
    zn, tn = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    return _cosine_of_normalized(zn, tn), _manifold_of_normalized(zn, tn)
