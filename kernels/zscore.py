"""iREPA's target z-score as a per-(sample, channel) affine map: the `triton` backend's
`target_zscore` (repa_fast.reference.target_zscore is the definition).

    shift = alpha * mean_n(t),   scale = 1 / (std_n(t) + eps)    (B, E) each, unbiased std, 0 when N == 1

The statistics take one pass over the frozen (B, N, E) target, read in place through its strides
and in its dtype: one program per (sample, feature block) loops over blocks of tokens, takes each
block's mean and sum of squared deviations from it (M2) in fp32, of the values less the
sample's first token (a pivot: sums at the scale of the std), and merges them into the running
ones the Chan et al. way (delta = block mean - mean; mean += delta * n_b / n; M2 += M2_b + delta^2
n_a n_b / n). Deviations are always taken from a mean, never as E[t^2] - E[t]^2, so a target whose
|mean| is far above its std (an offset of 1e3 on unit noise) keeps its std to fp32's relative
precision. The loss kernels (projection.py's cosine rows, manifold.py's row pass) apply
(t - shift) * scale to the target rows as they load them: no normalised copy of the target.
"""
from __future__ import annotations

from typing import Dict, Iterator

import torch
import triton
import triton.language as tl

from ..reference import target_zscore as _reference_target_zscore

EPS = 1e-6                     # iREPA's (SimpleTuner's spatial_zscore)
# (tokens per step, features per program, warps): a streaming pass, one stage.
STATS_BLOCK = dict(BLOCK_N=32, BLOCK_E=64, num_warps=4, num_stages=1)


@triton.jit
def _zscore_stats_kernel(T,            # (B, N, E) target, any strides
                         Affine,       # (2, B, E) fp32 out: shift, scale
                         B, N, E, stride_tb, stride_tn, stride_te, alpha, eps,
                         BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(1)
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = es < E
    rows = T + b.to(tl.int64) * stride_tb + es[None, :].to(tl.int64) * stride_te
    # Deviations from the sample's first token: their block sums stay at the scale of the std
    # (an fp32 sum of raw values near 1e3 errs by ~1e-4 of a unit std).
    pivot = tl.load(rows, mask=e_ok[None, :], other=0.0).to(tl.float32)
    mean = tl.zeros((BLOCK_E,), tl.float32)
    m2 = tl.zeros((BLOCK_E,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        mask = (ns < N)[:, None] & e_ok[None, :]
        t = tl.load(rows + ns[:, None].to(tl.int64) * stride_tn, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, t - pivot, 0.0)
        count = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
        block_mean = tl.sum(d, 0) / count
        dev = tl.where(mask, d - block_mean[None, :], 0.0)
        seen = n0 * 1.0   # tokens merged so far, as fp32
        total = seen + count
        delta = block_mean - mean
        mean += delta * (count / total)
        m2 += tl.sum(dev * dev, 0) + delta * delta * (seen * count / total)
    mean += tl.sum(pivot, 0)
    std = tl.sqrt(m2 / tl.maximum(N - 1, 1).to(tl.float32))   # N == 1: m2 is 0
    out = Affine + b * E + es
    tl.store(out, alpha * mean, mask=e_ok)
    tl.store(out + B * E, 1.0 / (std + eps), mask=e_ok)


def _zscore_stats(target: torch.Tensor, alpha: float) -> torch.Tensor:
    batch, tokens, dim = target.shape
    affine = torch.empty((2, batch, dim), device=target.device, dtype=torch.float32)
    block = STATS_BLOCK
    _zscore_stats_kernel[(triton.cdiv(dim, block["BLOCK_E"]), batch)](
        target, affine, batch, tokens, dim, *target.stride(), alpha, EPS, **block)
    return affine


@torch.library.custom_op("repa_fast::triton_target_zscore", mutates_args=())
def _target_zscore_op(target: torch.Tensor, alpha: float) -> torch.Tensor:
    return _zscore_stats(target, alpha)


@_target_zscore_op.register_fake
def _(target, alpha):
    return target.new_empty((2, target.shape[0], target.shape[2]), dtype=torch.float32)


def target_zscore(target: torch.Tensor, alpha: float) -> torch.Tensor:
    """(2, B, E) fp32 (shift, scale) of iREPA's z-score of a (B, N, E) fp32/fp16/bf16 target over
    its tokens (float64 targets: the torch backend's, in float64)."""
    if target.dtype == torch.float64:
        return _reference_target_zscore(target, alpha, EPS)
    return _target_zscore_op(target.detach(), float(alpha))


# ahead-of-time compile specs (tests/aot_compile.py)

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def aot_specs() -> Iterator[Dict[str, object]]:
    """One configuration per target dtype, contiguous: stride_te is the constant 1, pointers and
    the other strides 16-divisible, as the JIT specialises a model-sized launch."""
    fn = _zscore_stats_kernel
    for dtype, pointer in _PTR.items():
        constexprs = {"BLOCK_N": STATS_BLOCK["BLOCK_N"], "BLOCK_E": STATS_BLOCK["BLOCK_E"], "stride_te": 1}
        signature, attrs = {}, {}
        for index, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            else:
                signature[name] = {"T": pointer, "Affine": "*fp32"}.get(name) or \
                    ("fp32" if name in ("alpha", "eps") else "i32")
            if name in ("T", "Affine", "E", "stride_tb", "stride_tn"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        yield {"name": f"_zscore_stats_kernel[{pointer[1:]}]", "fn": fn, "signature": signature,
               "constexprs": constexprs, "attrs": attrs, "num_warps": STATS_BLOCK["num_warps"],
               "num_stages": STATS_BLOCK["num_stages"], "tensor_cores": False}


__all__ = ["target_zscore", "aot_specs"]
