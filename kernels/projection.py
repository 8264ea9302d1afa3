"""Fused REPA projector and cosine alignment: the `triton` backend of `repa_loss`, and the
projection half of `urepa_loss` (DESIGN.md §1).

    z = align(LayerNorm(h) @ W^T + b),   t = align(y),   loss = -mean over rows of cos(z, t)

or, with ln_weight = ln_bias = None (the "mlp" head's last Linear), z = align(h @ W^T + b).

How it is computed (M = B*S hidden rows, M' = B*N' aligned rows, M' <= M):

* LayerNorm is folded into the projector: with xhat = (h - mean) * rstd,
  LayerNorm(h) @ W^T + b = xhat @ Wf^T + bf, Wf = W * gamma (E x D, in the operand dtype, see
  below) and bf = W @ beta + b (fp32). The GEMMs normalise tiles of h as they load them (row
  statistics from `_ln_stats_kernel`), reading h through its strides: a (B, C, H, W) feature
  map's transposed token view is read in place. No LayerNorm output is written.
* Alignment: resampling is linear with weights summing to one, so align(xhat @ Wf^T + bf) =
  align(xhat) @ Wf^T + bf. The aligned count is never larger than the hidden count, so when the
  hidden side is resampled its normalised rows are resampled first (`_resample_normalized_kernel`,
  M' x D, operand dtype) and every GEMM runs on the M' aligned rows. The frozen target is
  resampled with torch.
* Forward GEMM epilogue: stores z - bf = acc (bias-free: the LayerNorm backward below needs
  z - bf, which a stored z would give only after cancelling against bf, catastrophically for a
  large bias and a small LayerNorm weight), plus per-row partial <z,t>, |z|^2, |t|^2 of each E-tile in
  a per-tile buffer, summed in a fixed order by `_cosine_finish_kernel`, which also gives
  dL/dz = alpha * t + beta * z per row.
* repa_loss keeps z - bf (operand dtype) for backward: the one M' x E intermediate. The backward
  GEMMs form dL/dz tiles on the fly from z - bf, bf, t, alpha, beta (`aligned_projection`'s backward reads
  the dL/dz handed in instead; same kernels).
* Backward: one GEMM over E x D tiles (rows split over per-split buffers when E x D alone cannot
  fill the GPU) gives G = dZ^T xhat and db = colsum(dZ), hence dW = G * gamma + db beta^T and
  dgamma = colsum_E(W * G); dbeta = W^T db (`_weight_t_vec_kernel`). A second GEMM gives
  dxhat = dZ @ Wf and, without resampling, the LayerNorm backward in its epilogue:
  dh = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), the two row means being
  dz . rowsum(Wf) / D and dz . (z - bf) / D, accumulated in the same K-loop. With resampling the
  means need the source rows: dxhat (M' x D, fp32) goes through the adjoint resampling and the
  LayerNorm backward in `_ln_backward_rows_kernel`.
* Without LayerNorm the same kernels run with identity row statistics (mean 0, rstd 1: no
  statistics pass), Wf = W (a copy in the operand dtype) and bf = b; the rows are read contiguous
  (an MLP's activations are; any other layout is copied once). Backward: dW = G and db (no
  dgamma, no dbeta), dL/dh = dZ @ W written straight into the hidden gradient (FUSE_LN off) or,
  when resampled, through the adjoint resampling alone (`_ln_backward_rows_kernel` with
  LAYER_NORM off); the autograd returns None for ln_weight and ln_bias.
* `cosine_alignment_loss` (the conv head's) may take iREPA's z-score of the target as a
  per-(sample, channel) affine map (zscore.py): its kernels form (t - shift) * scale in fp32 as
  they load t, which is read in its own dtype.
* No atomics anywhere: every reduction has a fixed order, so results are bitwise reproducible.

Dtypes: hidden fp32/fp16/bf16, the target in the hidden dtype or else fp32 (an exact cast: a
1e-8-scale fp32 target would vanish in fp16), projector params fp32 or the hidden dtype. Hidden
and target are read in their own dtype; the GEMMs multiply tiles of the operand dtype
(`operand_dtype`, `operand_class`) with fp32 accumulation:
* fp16 for both 16-bit activation dtypes: the xhat tiles, Wf, the dL/dz tiles, the resampled rows
  and repa_loss's saved z. bf16 operands (8 mantissa bits) put the gradients at DESIGN.md §4's
  1e-2 tolerance on model-like inputs; fp16 runs at the same tensor-core speed with 3 more bits.
  Its narrower range: each row of dL/dz is scaled by its own power of two to at most 1 before
  the cast and back after the GEMM (dL/dz of a mean over many rows lies far below fp16's normal
  range, and a zero token's reaches 1e11: one scale for all rows flushed the others to 0); the
  dW GEMM scales each xhat row by a matching power of two, so every product is at most 2
  (`_operand_scales`). All scales are exact powers of two, formed on the device. xhat has unit
  variance; without LayerNorm the rows are an MLP's SiLU activations, which repa_loss's forward
  casts to fp16 unscaled: they are assumed to lie below 65504 in magnitude, like z (above, z
  and the loss are not finite; aligned_projection's forward reads them in fp32, the dW GEMM
  scales them); z and Wf are assumed to fit (|z| < 65504: |z_e| <= sqrt(D) |Wf_e| + |bf_e|
  for LayerNorm'd rows, so only absurd projector weights break it). That is not checked on the
  host (a sync per call, and no CUDA-graph capture); the forward's row sums are taken from z as
  stored, so an overflowed z gives a NaN loss, not a finite loss beside inf gradients.
* fp32 for fp32 activations: TF32 where torch's fp32 matmul precision allows it, else exact.
`aligned_projection` returns z in fp32, and for 16-bit activations its forward GEMM multiplies fp32
xhat and Wf with tf32x3 (`projection_operands`): the U-REPA manifold term amplifies the 3e-4 error
of an fp16-operand z as z approaches t. Its backward GEMMs keep fp16 operands.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..alignment import AlignmentPlan, Resample, resample_taps, resample_tokens

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# =============================================================================================
# jit helpers
# =============================================================================================

@triton.jit
def _tile_ids(num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share their A rows in L2 while sweeping the columns."""
    pid = tl.program_id(0)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _row_offsets(rows, N, stride_b, stride_n):
    """int64 offsets of token rows (flat int32 index b * N + n) in a (B, N, C) tensor; the
    division stays in int32 (an int64 one is a slow subroutine)."""
    batch = rows // N
    return batch.to(tl.int64) * stride_b + (rows - batch * N).to(tl.int64) * stride_n


@triton.jit
def _dot(a, b, acc, OPERANDS: tl.constexpr):
    """acc + a @ b with fp32 accumulation. OPERANDS (`operand_class`, `projection_operands`): "fp16"
    casts both tiles to fp16 (tensor cores), "tf32" / "tf32x3" / "ieee" multiply fp32 tiles with
    that input precision."""
    if OPERANDS == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        return tl.dot(a, b, acc, input_precision=OPERANDS)


@triton.jit
def _load_normalized(X, row_offs, mean, rstd, cols, mask, stride_xd):
    """(x - mean) * rstd on a (rows, cols) tile of X, fp32."""
    x = tl.load(X + row_offs[:, None] + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    return (x - mean[:, None]) * rstd[:, None]


@triton.jit
def _grad_z_tile(DZ, Z, T, dz_offs, z_offs, t_offs, mask, alpha, beta, bias,
                 DZ_FROM_COSINE: tl.constexpr, LOAD_Z: tl.constexpr):
    """dL/dz on a tile of (B, N, E) in fp32, and the tile of Z when needed (else 0): alpha * t +
    beta * (Z + bias) for the cosine loss (alpha, beta: per-row values, bias: per-column,
    broadcast to the tile; Z holds z - bias for the projection's), else read from DZ."""
    if DZ_FROM_COSINE or LOAD_Z:
        z = tl.load(Z + z_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        z = 0.0
    if DZ_FROM_COSINE:
        t = tl.load(T + t_offs, mask=mask, other=0.0).to(tl.float32)
        dz = alpha * t + beta * z + beta * bias
    else:
        dz = tl.load(DZ + dz_offs, mask=mask, other=0.0).to(tl.float32)
    return dz, z


@triton.jit
def _store_cosine_terms(RowTerms, rows, mask, M, zt, zz, tt, inv_rows):
    """From each row's <z,t>, |z|^2, |t|^2, with F.normalize's clamp of norms at 1e-12: RowTerms
    (4, M) = cos(z, t), alpha, beta with d(-mean cos)/dz = alpha * t + beta * z, and a bound on
    |dL/dz| (for operand scaling)."""
    z_len = tl.sqrt(zz)
    z_norm = tl.maximum(z_len, 1e-12)
    t_norm = tl.maximum(tl.sqrt(tt), 1e-12)
    cos = zt / (z_norm * t_norm)
    alpha = -inv_rows / (z_norm * t_norm)
    # the clamped norm is constant below 1e-12: no gradient through it there
    beta = tl.where(z_len > 1e-12, inv_rows * cos / (z_norm * z_norm), 0.0)
    bound = tl.abs(alpha) * tl.sqrt(tt) + tl.abs(beta) * z_len
    tl.store(RowTerms + rows, cos, mask=mask)
    tl.store(RowTerms + M + rows, alpha, mask=mask)
    tl.store(RowTerms + 2 * M + rows, beta, mask=mask)
    tl.store(RowTerms + 3 * M + rows, bound, mask=mask)


# =============================================================================================
# kernels
# =============================================================================================

@triton.jit
def _ln_stats_kernel(X, Mean, Rstd,  # X: (B, S, D) strided; Mean, Rstd: (B*S,) fp32
                     M, S, D, stride_xb, stride_xs, stride_xd, eps,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """LayerNorm row statistics, two passes over each row (the second mostly from L2): the
    centred variance does not cancel when |mean| >> std."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < M
    row_offs = _row_offsets(rows, S, stride_xb, stride_xs)
    total = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(X + row_offs[:, None] + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(x, axis=1)
    mean = total / D
    squares = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(X + row_offs[:, None] + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, x - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, 1.0 / tl.sqrt(squares / D + eps), mask=row_mask)


@triton.jit
def _row_abs_max_kernel(X, Mean, Rstd, Out,  # X: (B, N, D) strided; Mean, Rstd, Out: (B*N,) fp32
                        M, N, D, stride_xb, stride_xn, stride_xd,
                        BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """max |xhat| of each projected row (for the fp16 operand scales of the dW GEMM)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < M
    row_offs = _row_offsets(rows, N, stride_xb, stride_xn)
    mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    largest = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        xhat = _load_normalized(X, row_offs, mean, rstd, cols, mask, stride_xd)
        largest = tl.maximum(largest, tl.max(tl.where(mask, tl.abs(xhat), 0.0), axis=1))
    tl.store(Out + rows, largest, mask=row_mask)


@triton.jit
def _fold_params_kernel(W, Gamma, Beta, Bias,        # W: (E, D) strided; Gamma, Beta: (D,); Bias: (E,)
                        WFolded, Folded,             # WFolded: (E, D) operand dtype; Folded: (2, E) fp32
                        E, D, stride_we, stride_wd,
                        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Wf = W * gamma; Folded[0] = bf = W @ beta + b; Folded[1] = rowsum(Wf) of the rounded Wf
    (what the GEMMs multiply by, so the LayerNorm backward's row mean matches them)."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    bias_sum = tl.zeros([BLOCK_E], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        mask = e_mask[:, None] & d_mask[None, :]
        w = tl.load(W + e[:, None] * stride_we + d[None, :] * stride_wd, mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(Gamma + d, mask=d_mask, other=0.0).to(tl.float32)
        beta = tl.load(Beta + d, mask=d_mask, other=0.0).to(tl.float32)
        folded = (w * gamma[None, :]).to(WFolded.dtype.element_ty)
        tl.store(WFolded + e[:, None] * D + d[None, :], folded, mask=mask)
        row_sum += tl.sum(folded.to(tl.float32), axis=1)
        bias_sum += tl.sum(w * beta[None, :], axis=1)
    bias = tl.load(Bias + e, mask=e_mask, other=0.0).to(tl.float32)
    tl.store(Folded + e, bias_sum + bias, mask=e_mask)
    tl.store(Folded + E + e, row_sum, mask=e_mask)


@triton.jit
def _resample_normalized_kernel(X, Mean, Rstd,           # X: (B, S, D) strided hidden; Mean, Rstd: (B*S,)
                                TapIndex, TapWeight,     # (N, K) int64 source token, fp32 weight per output token
                                Out,                     # (B, N, D) resampled xhat, operand dtype
                                M_out, S, N, D, K, stride_xb, stride_xs, stride_xd,
                                BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, n] = sum_k w[n, k] * xhat[b, index[n, k]] (bilinear K=4, linear K=2, mean K=S)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < M_out
    mask = row_mask[:, None] & (cols < D)[None, :]
    batch = rows // N
    token = rows - batch * N
    batch_offs = batch.to(tl.int64) * stride_xb
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        src = tl.load(TapIndex + token * K + k, mask=row_mask, other=0)
        weight = tl.load(TapWeight + token * K + k, mask=row_mask, other=0.0)
        src_rows = batch * S + src
        mean = tl.load(Mean + src_rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + src_rows, mask=row_mask, other=0.0)
        xhat = _load_normalized(X, batch_offs + src * stride_xs, mean, rstd, cols, mask, stride_xd)
        acc += weight[:, None] * xhat
    tl.store(Out + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _projection_fwd_kernel(X, Mean, Rstd,        # X: (B, N, D) strided rows to project; Mean, Rstd: (B*N,) fp32
                           WFolded, Folded,      # (E, D) operand dtype; (2, E) fp32 (bf, rowsum Wf)
                           T, Z, RowSums,        # T, Z (out, z - bf): (B, N, E); RowSums: (E-tiles, 3, B*N) fp32
                           M, N, D, E, stride_xb, stride_xn, stride_xd, stride_tb, stride_tn, stride_te,
                           ROW_SUMS: tl.constexpr, OPERANDS: tl.constexpr, GROUP_M: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Z = xhat @ Wf^T on a BLOCK_M x BLOCK_N tile, without the bias bf (z = Z + bf, formed in fp32
    where it is read: the LayerNorm backward needs z - bf, which would cancel when |bf| >> |z - bf|);
    with ROW_SUMS also the tile's partial <z,t>, |z|^2, |t|^2 per row, of Z as stored: the loss
    belongs to the z the backward reads, and a Z that overflows fp16 gives a NaN loss."""
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(E, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    e = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    e_mask = e < E
    row_offs = _row_offsets(rows, N, stride_xb, stride_xn)
    mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < D
        xhat = _load_normalized(X, row_offs, mean, rstd, k, row_mask[:, None] & k_mask[None, :], stride_xd)
        w = tl.load(WFolded + e[None, :] * D + k[:, None], mask=k_mask[:, None] & e_mask[None, :], other=0.0)
        acc = _dot(xhat, w, acc, OPERANDS)
    z_free = acc.to(Z.dtype.element_ty)
    mask = row_mask[:, None] & e_mask[None, :]
    tl.store(Z + rows.to(tl.int64)[:, None] * E + e[None, :], z_free, mask=mask)
    if ROW_SUMS:
        t_offs = _row_offsets(rows, N, stride_tb, stride_tn)
        t = tl.load(T + t_offs[:, None] + e[None, :] * stride_te, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, z_free.to(tl.float32) + tl.load(Folded + e, mask=e_mask, other=0.0)[None, :], 0.0)
        sums = RowSums + pid_n.to(tl.int64) * 3 * M + rows
        tl.store(sums, tl.sum(z * t, axis=1), mask=row_mask)
        tl.store(sums + M, tl.sum(z * z, axis=1), mask=row_mask)
        tl.store(sums + 2 * M, tl.sum(t * t, axis=1), mask=row_mask)


@triton.jit
def _cosine_finish_kernel(RowSums, RowTerms,  # RowSums: (parts, 3, M) fp32; RowTerms: (4, M) fp32 out
                          M, PARTS, inv_rows, BLOCK: tl.constexpr):
    """Sums the per-tile row partials in tile order; RowTerms = cos, alpha, beta, |dL/dz| bound."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < M
    zt = tl.zeros([BLOCK], dtype=tl.float32)
    zz = tl.zeros([BLOCK], dtype=tl.float32)
    tt = tl.zeros([BLOCK], dtype=tl.float32)
    for part in range(PARTS):
        sums = RowSums + part * 3 * M + rows
        zt += tl.load(sums, mask=mask, other=0.0)
        zz += tl.load(sums + M, mask=mask, other=0.0)
        tt += tl.load(sums + 2 * M, mask=mask, other=0.0)
    _store_cosine_terms(RowTerms, rows, mask, M, zt, zz, tt, inv_rows)


@triton.jit
def _target_tile(t_ptrs, mask, Shift, Scale, affine_offs, affine_mask, T_AFFINE: tl.constexpr):
    """A tile of the target in fp32; with T_AFFINE, (t - shift) * scale (iREPA's z-score,
    `target_zscore`: Shift, Scale (B, E) fp32 each) with the sample's shift and scale at
    `affine_offs` (sample * E + feature)."""
    t = tl.load(t_ptrs, mask=mask, other=0.0).to(tl.float32)
    if T_AFFINE:
        t = (t - tl.load(Shift + affine_offs, mask=affine_mask, other=0.0)) * \
            tl.load(Scale + affine_offs, mask=affine_mask, other=0.0)
    return t


@triton.jit
def _cosine_rows_kernel(Z, T,          # (B, N, E) strided
                        Shift, Scale,  # (B, E) fp32 each: t' = (t - shift) * scale is the target (T_AFFINE)
                        RowTerms,      # (4, M) fp32 out
                        M, N, E, stride_zb, stride_zn, stride_ze, stride_tb, stride_tn, stride_te, inv_rows,
                        BLOCK_ROWS: tl.constexpr, BLOCK_E: tl.constexpr, T_AFFINE: tl.constexpr):
    """cosine_alignment_loss's rows: <z,t>, |z|^2, |t|^2 over E, then the shared cosine terms."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < M
    z_offs = _row_offsets(rows, N, stride_zb, stride_zn)
    t_offs = _row_offsets(rows, N, stride_tb, stride_tn)
    affine_offs = rows // N * E
    zt = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    zz = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    tt = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        mask = row_mask[:, None] & (e < E)[None, :]
        z = tl.load(Z + z_offs[:, None] + e[None, :] * stride_ze, mask=mask, other=0.0).to(tl.float32)
        t = _target_tile(T + t_offs[:, None] + e[None, :] * stride_te, mask, Shift, Scale,
                         affine_offs[:, None] + e[None, :], mask, T_AFFINE)
        zt += tl.sum(z * t, axis=1)
        zz += tl.sum(z * z, axis=1)
        tt += tl.sum(t * t, axis=1)
    _store_cosine_terms(RowTerms, rows, row_mask, M, zt, zz, tt, inv_rows)


@triton.jit
def _cosine_grad_kernel(Z, T,          # (B, N, E) strided
                        Shift, Scale,  # (B, E) fp32 each (T_AFFINE), as in _cosine_rows_kernel
                        Alpha, Beta,   # (M,) fp32
                        DZ,            # (B, N, E) out
                        M, N, E, stride_zb, stride_zn, stride_ze, stride_tb, stride_tn, stride_te,
                        BLOCK_ROWS: tl.constexpr, BLOCK_E: tl.constexpr, T_AFFINE: tl.constexpr):
    """cosine_alignment_loss's backward: dz = alpha * t + beta * z (grad_output folded into alpha, beta)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_mask = rows < M
    mask = row_mask[:, None] & (e < E)[None, :]
    alpha = tl.load(Alpha + rows, mask=row_mask, other=0.0)
    beta = tl.load(Beta + rows, mask=row_mask, other=0.0)
    z_offs = _row_offsets(rows, N, stride_zb, stride_zn)[:, None] + e[None, :] * stride_ze
    z = tl.load(Z + z_offs, mask=mask, other=0.0).to(tl.float32)
    t_offs = _row_offsets(rows, N, stride_tb, stride_tn)[:, None] + e[None, :] * stride_te
    t = _target_tile(T + t_offs, mask, Shift, Scale, (rows // N * E)[:, None] + e[None, :], mask, T_AFFINE)
    dz = alpha[:, None] * t + beta[:, None] * z
    tl.store(DZ + rows.to(tl.int64)[:, None] * E + e[None, :], dz.to(DZ.dtype.element_ty), mask=mask)


@triton.jit
def _dw_epilogue(g, db, e, d, pid_e, pid_d, E, D,
                 W, stride_we, stride_wd, Gamma, Beta, DW, Db, DGammaPart, LAYER_NORM: tl.constexpr):
    """From G = dZ^T xhat and db = colsum(dZ) on an E x D tile: dW = G * gamma + db beta^T,
    this E-tile's share of dgamma = colsum(W * G), and db itself; without LAYER_NORM dW = G
    (W, Gamma, Beta, DGammaPart unused)."""
    e_mask = e < E
    d_mask = d < D
    mask = e_mask[:, None] & d_mask[None, :]
    if LAYER_NORM:
        gamma = tl.load(Gamma + d, mask=d_mask, other=0.0).to(tl.float32)
        beta = tl.load(Beta + d, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(W + e[:, None] * stride_we + d[None, :] * stride_wd, mask=mask, other=0.0).to(tl.float32)
        dw = g * gamma[None, :] + db[:, None] * beta[None, :]
        tl.store(DW + e[:, None] * D + d[None, :], dw.to(DW.dtype.element_ty), mask=mask)
        tl.store(DGammaPart + pid_e.to(tl.int64) * D + d, tl.sum(w * g, axis=0), mask=d_mask)
    else:
        tl.store(DW + e[:, None] * D + d[None, :], g.to(DW.dtype.element_ty), mask=mask)
    if pid_d == 0:
        tl.store(Db + e, db, mask=e_mask)


@triton.jit
def _projection_dw_kernel(DZ, Z, T, Alpha, Beta,          # dL/dz: DZ or Alpha*T + Beta*(Z + bf), all (B, N, E)
                          DzScale, XScale, GScale,         # (B*N,), (B*N,), (1,) powers of two; fp32: (1,) ones
                          Folded,                          # (2, E) fp32: bf, rowsum Wf
                          X, Mean, Rstd,                   # projected rows, as in the forward
                          W, Gamma, Beta_ln,               # W: (E, D) strided; Gamma, Beta_ln: (D,)
                          DW, Db, DGammaPart,              # (E, D) param dtype; (E,) fp32; (E-tiles, D) fp32
                          GPart, DbPart,                   # (splits, E, D), (splits, E) fp32 when split
                          M, N, D, E, rows_per_split, num_splits,
                          stride_dzb, stride_dzn, stride_dze, stride_zb, stride_zn, stride_ze,
                          stride_tb, stride_tn, stride_te, stride_xb, stride_xn, stride_xd, stride_we, stride_wd,
                          DZ_FROM_COSINE: tl.constexpr, LAYER_NORM: tl.constexpr, OPERANDS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """G = dZ^T xhat (BLOCK_M of E x BLOCK_N of D) and db = colsum(dZ) over one split of the rows.
    fp16 operands: row r of dZ is scaled by s_r = DzScale[r] and of xhat by S / s_r = XScale[r]
    before the cast, G = acc / S after (`_operand_scales`): every product is at most 2 and exact
    powers of two cancel, so no row's range sets another's."""
    pid_e = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    e = pid_e * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    e_mask = e < E
    d_mask = d < D
    # 1 for fp32 operands: the multiply by it keeps the fp32 register use (180 on triton 3.6, 255 without)
    g_scale = tl.load(GScale)
    if DZ_FROM_COSINE:
        bias = tl.load(Folded + e, mask=e_mask, other=0.0)[:, None]
    else:
        bias = 0.0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # db is carried as a column and reshaped once after the loop: triton 3.6-3.8's
    # OptimizeThreadLocality asserts that a loop-carried row sum has a single use
    db = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, M)
    for r0 in range(row_start, row_stop, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_mask = rows < row_stop
        if DZ_FROM_COSINE:
            alpha = tl.load(Alpha + rows, mask=row_mask, other=0.0)[None, :]
            beta = tl.load(Beta + rows, mask=row_mask, other=0.0)[None, :]
        else:
            alpha = 0.0
            beta = 0.0
        # dZ^T tile (BLOCK_M of E, BLOCK_K rows), read transposed
        dz_t, _ = _grad_z_tile(DZ, Z, T,
                               e[:, None] * stride_dze + _row_offsets(rows, N, stride_dzb, stride_dzn)[None, :],
                               e[:, None] * stride_ze + _row_offsets(rows, N, stride_zb, stride_zn)[None, :],
                               e[:, None] * stride_te + _row_offsets(rows, N, stride_tb, stride_tn)[None, :],
                               e_mask[:, None] & row_mask[None, :], alpha, beta, bias, DZ_FROM_COSINE, False)
        db += tl.sum(dz_t, axis=1, keep_dims=True)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = _load_normalized(X, _row_offsets(rows, N, stride_xb, stride_xn), mean, rstd, d,
                                row_mask[:, None] & d_mask[None, :], stride_xd)
        if OPERANDS == "fp16":
            dz_t = dz_t * tl.load(DzScale + rows, mask=row_mask, other=1.0)[None, :]
            xhat = xhat * tl.load(XScale + rows, mask=row_mask, other=1.0)[:, None]
        else:
            dz_t = dz_t * g_scale
        acc = _dot(dz_t, xhat, acc, OPERANDS)
    acc = acc * (1.0 / g_scale)
    db = tl.reshape(db, (BLOCK_M,))
    if num_splits == 1:
        _dw_epilogue(acc, db, e, d, pid_e, pid_d, E, D, W, stride_we, stride_wd, Gamma, Beta_ln,
                     DW, Db, DGammaPart, LAYER_NORM)
    else:
        part = GPart + split.to(tl.int64) * E * D
        tl.store(part + e[:, None] * D + d[None, :], acc, mask=e_mask[:, None] & d_mask[None, :])
        if pid_d == 0:
            tl.store(DbPart + split.to(tl.int64) * E + e, db, mask=e_mask)


@triton.jit
def _dw_split_reduce_kernel(GPart, DbPart,                    # (splits, E, D), (splits, E) fp32
                            W, Gamma, Beta_ln, DW, Db, DGammaPart,  # as in _projection_dw_kernel
                            E, D, SPLITS, stride_we, stride_wd,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Second stage of the row-split dW GEMM: the splits summed in order, then its epilogue (with
    LayerNorm; without, dW = G is the splits' sum alone: `_projection_backward`)."""
    pid_e = tl.program_id(0)
    pid_d = tl.program_id(1)
    e = pid_e * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    e_mask = e < E
    mask = e_mask[:, None] & (d < D)[None, :]
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for split in range(SPLITS):
        g += tl.load(GPart + split * E * D + e[:, None] * D + d[None, :], mask=mask, other=0.0)
        db += tl.load(DbPart + split * E + e, mask=e_mask, other=0.0)
    _dw_epilogue(g, db, e, d, pid_e, pid_d, E, D, W, stride_we, stride_wd, Gamma, Beta_ln,
                 DW, Db, DGammaPart, True)


@triton.jit
def _weight_t_vec_kernel(W, V, Out,  # W: (E, D) strided; V: (E,) fp32; Out: (D,) fp32
                         E, D, stride_we, stride_wd, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out = W^T v (dbeta = W^T db), fp32, summed over E in order."""
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < E
        w = tl.load(W + e[:, None] * stride_we + d[None, :] * stride_wd, mask=e_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * tl.load(V + e, mask=e_mask, other=0.0)[:, None], axis=0)
    tl.store(Out + d, acc, mask=d_mask)


@triton.jit
def _projection_dx_kernel(DZ, Z, T, Alpha, Beta, DzScale,  # dL/dz, its row scales as in _projection_dw_kernel
                          WFolded, Folded,                 # (E, D) operand dtype; (2, E) fp32 (bf, rowsum Wf)
                          X, Mean, Rstd,                   # FUSE_LN: the hidden rows (B, N, D) strided, their stats
                          Out,                             # FUSE_LN: dL/dh (B, N, D); else dL/dxhat (fp32 or,
                                                           # no LayerNorm nor resampling, dL/dh)
                          M, N, D, E,
                          stride_dzb, stride_dzn, stride_dze, stride_zb, stride_zn, stride_ze,
                          stride_tb, stride_tn, stride_te, stride_xb, stride_xn, stride_xd,
                          stride_ob, stride_on, stride_od,
                          DZ_FROM_COSINE: tl.constexpr, FUSE_LN: tl.constexpr, OPERANDS: tl.constexpr,
                          GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """dxhat = dZ @ Wf on a BLOCK_M x BLOCK_N (of D) tile. FUSE_LN (rows not resampled): the
    LayerNorm backward in the epilogue, its row means dz.rowsum(Wf)/D and dz.(z - bf)/D summed
    in the K-loop (Z holds z - bf: no cancellation against a large bias). fp16 operands: row r
    of dZ is multiplied by the power of two DzScale[r] before the cast and the row of the result
    divided by it: exact, and each row keeps its own range."""
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    d_mask = d < D
    if DZ_FROM_COSINE:
        alpha = tl.load(Alpha + rows, mask=row_mask, other=0.0)[:, None]
        beta = tl.load(Beta + rows, mask=row_mask, other=0.0)[:, None]
    else:
        alpha = 0.0
        beta = 0.0
    dz_rows = _row_offsets(rows, N, stride_dzb, stride_dzn)
    z_rows = _row_offsets(rows, N, stride_zb, stride_zn)
    t_rows = _row_offsets(rows, N, stride_tb, stride_tn)
    if OPERANDS == "fp16":
        scale = tl.load(DzScale + rows, mask=row_mask, other=1.0)[:, None]
    else:  # (1,) = 1, read as the fp16 scales are: the fp32 register use stays as it was
        scale = tl.load(DzScale)
    mean_dx = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean_dx_xhat = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, E, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < E
        mask = row_mask[:, None] & k_mask[None, :]
        if DZ_FROM_COSINE:
            bias = tl.load(Folded + k, mask=k_mask, other=0.0)[None, :]
        else:
            bias = 0.0
        dz, z_free = _grad_z_tile(DZ, Z, T, dz_rows[:, None] + k[None, :] * stride_dze,
                                  z_rows[:, None] + k[None, :] * stride_ze, t_rows[:, None] + k[None, :] * stride_te,
                                  mask, alpha, beta, bias, DZ_FROM_COSINE, FUSE_LN)
        if FUSE_LN:
            row_sum = tl.load(Folded + E + k, mask=k_mask, other=0.0)
            mean_dx += tl.sum(dz * row_sum[None, :], axis=1)
            mean_dx_xhat += tl.sum(dz * z_free, axis=1)
        w = tl.load(WFolded + k[:, None] * D + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        acc = _dot(dz * scale, w, acc, OPERANDS)
    dx = acc * (1.0 / scale)
    mask = row_mask[:, None] & d_mask[None, :]
    out_offs = _row_offsets(rows, N, stride_ob, stride_on)[:, None] + d[None, :] * stride_od
    if FUSE_LN:
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = _load_normalized(X, _row_offsets(rows, N, stride_xb, stride_xn), mean, rstd, d, mask, stride_xd)
        dx = rstd[:, None] * (dx - mean_dx[:, None] / D - xhat * (mean_dx_xhat[:, None] / D))
    tl.store(Out + out_offs, dx.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _adjoint_resampled(GradXhat, AdjIndex, AdjWeight, batch, token, row_mask, d, mask, N, D, K,
                       BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_k w[s, k] * GradXhat[b, index[s, k], d] on a (rows, d) tile, fp32."""
    g = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        dst = tl.load(AdjIndex + token * K + k, mask=row_mask, other=0)
        weight = tl.load(AdjWeight + token * K + k, mask=row_mask, other=0.0)
        g += weight[:, None] * tl.load(GradXhat + ((batch * N + dst) * D)[:, None] + d[None, :], mask=mask, other=0.0)
    return g


@triton.jit
def _ln_backward_rows_kernel(GradXhat,               # (B, N, D) fp32 dL/d(resampled xhat)
                             AdjIndex, AdjWeight,    # (S, K) int64 output token, fp32 weight per source token
                             X, Mean, Rstd, DX,      # X, DX: (B, S, D) strided; Mean, Rstd: (B*S,)
                             M, S, N, D, K, stride_xb, stride_xs, stride_xd, stride_ob, stride_os, stride_od,
                             LAYER_NORM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adjoint resampling (g[s] = sum_k w[s, k] * GradXhat[index[s, k]]) and the LayerNorm
    backward dh = rstd * (g - mean(g) - xhat * mean(g * xhat)), two passes over each row;
    without LAYER_NORM dh = g, one pass (X, Mean, Rstd unused)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < M
    batch = rows // S
    token = rows - batch * S
    out_offs = _row_offsets(rows, S, stride_ob, stride_os)
    if LAYER_NORM:
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        x_offs = _row_offsets(rows, S, stride_xb, stride_xs)
        mean_g = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        mean_g_xhat = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for sweep in tl.static_range(2):
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                mask = row_mask[:, None] & (d < D)[None, :]
                g = _adjoint_resampled(GradXhat, AdjIndex, AdjWeight, batch, token, row_mask, d, mask, N, D, K,
                                       BLOCK_ROWS, BLOCK_D)
                xhat = _load_normalized(X, x_offs, mean, rstd, d, mask, stride_xd)
                if sweep == 0:
                    mean_g += tl.sum(g, axis=1)
                    mean_g_xhat += tl.sum(g * xhat, axis=1)
                else:
                    dx = rstd[:, None] * (g - mean_g[:, None] / D - xhat * (mean_g_xhat[:, None] / D))
                    tl.store(DX + out_offs[:, None] + d[None, :] * stride_od, dx.to(DX.dtype.element_ty),
                             mask=mask)
    else:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (d < D)[None, :]
            g = _adjoint_resampled(GradXhat, AdjIndex, AdjWeight, batch, token, row_mask, d, mask, N, D, K,
                                   BLOCK_ROWS, BLOCK_D)
            tl.store(DX + out_offs[:, None] + d[None, :] * stride_od, g.to(DX.dtype.element_ty), mask=mask)


# =============================================================================================
# launch configuration
# =============================================================================================

@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# GEMM tiles per kernel ("fwd", "dx", "dw") and operand class: "fp16" and "tf32" run on tensor
# cores (fp32 operands take half the K depth so three stages fit an A100's 164 KiB of shared
# memory); "ieee" is exact fp32 on the FMA units, small tiles. dx's and dw's K-loops also form the
# dL/dz tiles (dx also the LayerNorm row means), hence their shallower K step: no register spills on
# triton 3.6 to 3.9 (tests/test_triton_aot.py). "tf32x3" (three TF32 products, about fp32's
# accuracy on tensor cores; a 128 x 64 x 16 tile over 8 warps: 128 x 128 takes stack on triton 3.8
# sm_80) is the forward of `aligned_projection` for 16-bit activations only.
GEMM_CONFIGS = {
    ("fwd", "fp16"): GemmConfig(128, 128, 64, 8, 3),
    ("fwd", "tf32"): GemmConfig(128, 128, 32, 8, 3),
    ("fwd", "ieee"): GemmConfig(64, 64, 16, 4, 2),
    ("fwd", "tf32x3"): GemmConfig(128, 64, 16, 8, 3),
    ("dx", "fp16"): GemmConfig(128, 128, 32, 8, 3),
    ("dx", "tf32"): GemmConfig(128, 128, 16, 8, 3),
    ("dx", "ieee"): GemmConfig(64, 64, 16, 4, 3),
    ("dw", "fp16"): GemmConfig(128, 128, 32, 8, 3),
    ("dw", "tf32"): GemmConfig(128, 128, 32, 8, 3),
    ("dw", "ieee"): GemmConfig(64, 64, 16, 4, 3),
}
# Rows read in place from a UNet feature map (U-REPA; token stride 1, feature stride H W): with the
# tiles above, dx's fused LayerNorm epilogue and the 16-bit forward reach 255 registers and a stack
# (8 B to 1.4 KiB, sm_80 and sm_90, triton 3.9); these tiles do not.
FEATURE_MAP_GEMM_CONFIGS = {
    ("fwd", "fp16"): GemmConfig(128, 128, 32, 8, 3),
    ("dx", "fp16"): GemmConfig(64, 64, 32, 8, 3),
    ("dx", "tf32"): GemmConfig(64, 64, 32, 8, 3),
    ("dx", "ieee"): GemmConfig(64, 64, 32, 8, 3),
}
GROUP_M = 8
ROW_BLOCK = (32, 128, 4)  # BLOCK_ROWS, BLOCK_D, num_warps of the row kernels
# the adjoint resampling without LayerNorm over 4 warps takes 8 stack bytes (96 registers, 16-bit
# rows, triton 3.9 sm_90); over 8 warps none
ADJOINT_ONLY_WARPS = 8
FINISH_BLOCK = 256
VEC_BLOCK = (64, 64, 4)  # BLOCK_E, BLOCK_D, num_warps of W^T v
# The interpreter has no SM count; this is an H100's, so tests take the launch paths a GPU would.
_INTERPRETER_SMS = 132


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def operand_class(dtype: torch.dtype) -> str:
    """How the GEMMs multiply for `dtype` activations: "fp16" (fp16 operands, for fp16 and bf16),
    "tf32" (fp32 where torch's fp32 matmul precision allows TF32) or "ieee" (exact fp32)."""
    if dtype != torch.float32:
        return "fp16"
    try:
        allowed = torch.backends.cuda.matmul.fp32_precision == "tf32"
    except (AttributeError, RuntimeError):  # torch without the fp32_precision API
        allowed = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allowed else "ieee"


def projection_operands(dtype: torch.dtype) -> str:
    """How `aligned_projection`'s forward GEMM multiplies for `dtype` activations: "tf32x3" on fp32
    tiles (xhat and Wf kept in fp32) for 16-bit ones, else as `operand_class`. Its z feeds the
    U-REPA manifold term, which amplifies an fp16 GEMM's 3e-4 relative error of z as z -> t."""
    return "tf32x3" if dtype != torch.float32 else operand_class(dtype)


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the GEMM operand buffers (Wf, resampled rows) and of repa_loss's saved z for
    `dtype` activations."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def dw_split(rows: int, e_dim: int, d_dim: int, config: GemmConfig, device: torch.device) -> Tuple[int, int]:
    """Row split of the E x D weight-gradient GEMM giving about two programs per SM, each split
    at least 4 K-steps deep. Returns (rows_per_split, splits)."""
    tiles = triton.cdiv(e_dim, config.block_m) * triton.cdiv(d_dim, config.block_n)
    want = triton.cdiv(2 * _num_sms(device), tiles)
    splits = max(1, min(want, rows // (4 * config.block_k)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), config.block_k) * config.block_k
    return rows_per_split, triton.cdiv(rows, rows_per_split)


# =============================================================================================
# launchers
# =============================================================================================

def gemm_config(kind: str, operands: str, feature_map: bool) -> GemmConfig:
    """The tile configuration of GEMM `kind` ("fwd", "dx", "dw") for rows read contiguously or, with
    `feature_map`, in place from a feature map (`_is_feature_map`)."""
    if feature_map:
        return FEATURE_MAP_GEMM_CONFIGS.get((kind, operands), GEMM_CONFIGS[kind, operands])
    return GEMM_CONFIGS[kind, operands]


def _is_feature_map(x: torch.Tensor) -> bool:
    """(B, N, D) rows with token stride 1 and another feature stride: the layout the JIT
    specialises as a feature map read in place."""
    return x.shape[1] > 1 and x.stride(1) == 1 and x.stride(2) != 1


def _strides3(x: torch.Tensor) -> Tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _ln_stats(hidden: torch.Tensor, ln_eps: float) -> torch.Tensor:
    """(2, B*S) fp32: mean and rstd of each hidden row."""
    batch, tokens, dim = hidden.shape
    stats = torch.empty(2, batch * tokens, device=hidden.device, dtype=torch.float32)
    rows, block_d, warps = ROW_BLOCK
    _ln_stats_kernel[(triton.cdiv(batch * tokens, rows),)](
        hidden, stats[0], stats[1], batch * tokens, tokens, dim, *_strides3(hidden), ln_eps,
        BLOCK_ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return stats


def _fold_params(ln_weight, ln_bias, proj_weight, proj_bias, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Wf = W * gamma (E, D) in `dtype` (the operand dtype); folded (2, E) fp32: bf = W beta + b,
    rowsum(Wf)."""
    e_dim, d_dim = proj_weight.shape
    w_folded = torch.empty(e_dim, d_dim, device=proj_weight.device, dtype=dtype)
    folded = torch.empty(2, e_dim, device=proj_weight.device, dtype=torch.float32)
    rows, block_d, warps = ROW_BLOCK
    _fold_params_kernel[(triton.cdiv(e_dim, rows),)](
        proj_weight, ln_weight, ln_bias, proj_bias, w_folded, folded, e_dim, d_dim, *proj_weight.stride(),
        BLOCK_E=rows, BLOCK_D=block_d, num_warps=warps)
    return w_folded, folded


@functools.lru_cache(maxsize=64)
def _adjoint_taps_cpu(step: Resample) -> Tuple[torch.Tensor, torch.Tensor]:
    """The transpose of `resample_taps`: per source token, the output tokens it feeds and their
    weights (src tokens, K'), duplicate pairs merged, zero weights dropped, padded with weight 0."""
    index, weight = resample_taps(step)
    dst_tokens, src_tokens = step.dst_tokens, step.src_tokens
    dst = torch.arange(dst_tokens).repeat_interleave(index.shape[1])
    keys, inverse = torch.unique(index.flatten() * dst_tokens + dst, return_inverse=True)
    weights = torch.zeros(keys.numel(), dtype=torch.float64).index_add_(0, inverse, weight.flatten().double())
    keep = weights != 0
    keys, weights = keys[keep], weights[keep]
    src, dst = keys // dst_tokens, keys % dst_tokens
    counts = torch.bincount(src, minlength=src_tokens)
    slot = torch.arange(keys.numel()) - (torch.cumsum(counts, 0) - counts)[src]
    width = max(int(counts.max()), 1)
    adj_index = torch.zeros(src_tokens, width, dtype=torch.int64)
    adj_weight = torch.zeros(src_tokens, width, dtype=torch.float32)
    adj_index[src, slot] = dst
    adj_weight[src, slot] = weights.float()
    return adj_index, adj_weight


@functools.lru_cache(maxsize=64)
def _device_taps(step: Resample, device: torch.device, adjoint: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    index, weight = (_adjoint_taps_cpu if adjoint else resample_taps)(step)
    return index.to(device), weight.to(device)


def _resample_normalized(hidden: torch.Tensor, stats: torch.Tensor, step: Resample, dtype: torch.dtype) -> torch.Tensor:
    """(B, N', D) resampled xhat in `dtype` (the operand dtype)."""
    batch, tokens, dim = hidden.shape
    index, weight = _device_taps(step, hidden.device, False)
    out = torch.empty(batch, step.dst_tokens, dim, device=hidden.device, dtype=dtype)
    rows, block_d, warps = ROW_BLOCK
    grid = (triton.cdiv(batch * step.dst_tokens, rows), triton.cdiv(dim, block_d))
    _resample_normalized_kernel[grid](
        hidden, stats[0], stats[1], index, weight, out, batch * step.dst_tokens, tokens, step.dst_tokens, dim,
        index.shape[1], *_strides3(hidden), BLOCK_ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return out


def _identity_stats(rows: int, device: torch.device) -> torch.Tensor:
    """(2, rows) fp32 (mean, rstd) = (0, 1): rows the GEMMs read as they are."""
    identity = torch.zeros(2, rows, device=device, dtype=torch.float32)
    identity[1] = 1.0
    return identity


def _projected_rows(hidden, stats, xa) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows the GEMMs project and their (mean, rstd): the hidden rows, or the already
    normalised resampled rows (statistics 0 and 1)."""
    if xa.numel() == 0:
        return hidden, stats
    return xa, _identity_stats(xa.shape[0] * xa.shape[1], xa.device)


def _projection_forward(x, x_stats, w_folded, folded, t: Optional[torch.Tensor], z_dtype: torch.dtype,
                        operands: str):
    """z - bf (B, N', E) in z_dtype, the GEMM multiplying as `operands` (`_dot`); with a target t
    also the row terms (4, M') of the cosine loss."""
    batch, tokens, dim = x.shape
    e_dim = w_folded.shape[0]
    rows = batch * tokens
    config = gemm_config("fwd", operands, _is_feature_map(x))
    tiles_e = triton.cdiv(e_dim, config.block_n)
    z = torch.empty(batch, tokens, e_dim, device=x.device, dtype=z_dtype)
    row_sums = torch.empty(tiles_e if t is not None else 0, 3, rows, device=x.device, dtype=torch.float32)
    target = t if t is not None else z
    _projection_fwd_kernel[(triton.cdiv(rows, config.block_m) * tiles_e,)](
        x, x_stats[0], x_stats[1], w_folded, folded, target, z, row_sums, rows, tokens, dim, e_dim,
        *_strides3(x), *_strides3(target), ROW_SUMS=t is not None, OPERANDS=operands,
        GROUP_M=GROUP_M, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if t is None:
        return z, None
    row_terms = torch.empty(4, rows, device=x.device, dtype=torch.float32)
    _cosine_finish_kernel[(triton.cdiv(rows, FINISH_BLOCK),)](row_sums, row_terms, rows, tiles_e, 1.0 / rows,
                                                              BLOCK=FINISH_BLOCK)
    return z, row_terms


def _power_of_two_below(bound: torch.Tensor) -> torch.Tensor:
    """fp32 powers of two s in [2^-60, 2^60] with s * bound <= 1 (elementwise)."""
    return torch.exp2(-torch.ceil(torch.log2(bound.float().clamp(2.0 ** -60, 2.0 ** 60))))


def _row_abs_max(x: torch.Tensor, x_stats: torch.Tensor) -> torch.Tensor:
    """(B*N,) fp32 max |xhat| of each projected row."""
    batch, tokens, dim = x.shape
    out = torch.empty(batch * tokens, device=x.device, dtype=torch.float32)
    rows, block_d, warps = ROW_BLOCK
    _row_abs_max_kernel[(triton.cdiv(batch * tokens, rows),)](
        x, x_stats[0], x_stats[1], out, batch * tokens, tokens, dim, *_strides3(x),
        BLOCK_ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return out


def _operand_scales(bound: torch.Tensor, x: torch.Tensor, x_stats: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The fp16 operand scales of the backward GEMMs from `bound` (B*N,) >= |dL/dz| per row
    (dL/dz of a mean over many rows lies far below fp16's normal range, and one row of a zero
    token reaches 1e11): dz_scale s_r brings row r of dL/dz to at most 1; x_scale S / s_r and
    g_scale S, S = 2^-ceil(log2 max_r(bound_r max|xhat_r|)), make every product of the dW GEMM
    at most 2 (a row with xhat = 0 adds exactly 0, whatever its dL/dz). All are powers of two in
    fp32's normal range, so the scaling is exact; computed on the device, no host sync."""
    dz_scale = _power_of_two_below(bound)
    g_scale = _power_of_two_below((bound.float() * _row_abs_max(x, x_stats)).amax().reshape(1))
    return dz_scale, g_scale / dz_scale, g_scale


def _projection_backward(grad_z, z, t, alpha, beta, hidden, stats, xa, ln_weight, ln_bias, proj_weight,
                         w_folded, folded, step: Optional[Resample], bound: torch.Tensor):
    """Gradients (hidden, ln_weight, ln_bias, proj_weight, proj_bias) from dL/dz, which is grad_z,
    or alpha * t + beta * z when grad_z is None; `z` holds z - bf (`_projection_forward`); `bound`
    (B*N',) >= |dL/dz| per row, for fp16 operands (else None). Without LayerNorm (ln_weight None) its gradients are empty."""
    x, x_stats = _projected_rows(hidden, stats, xa)
    batch, tokens, dim = x.shape
    e_dim = proj_weight.shape[0]
    rows = batch * tokens
    device = x.device
    from_cosine = grad_z is None
    layer_norm = ln_weight is not None
    dz = z if from_cosine else grad_z
    if from_cosine:
        t_arg, alpha_arg, beta_arg = t, alpha, beta
    else:  # unused pointers of the cosine form
        t_arg, alpha_arg, beta_arg = grad_z, folded, folded
    operands = operand_class(hidden.dtype)  # x, w_folded: fp32 after aligned_projection's forward
    # only fp16 operands are scaled (else the kernels read one scale of 1)
    if bound is not None:
        dz_scale, x_scale, g_scale = _operand_scales(bound, x, x_stats)
    else:
        dz_scale = x_scale = g_scale = torch.ones(1, device=device, dtype=torch.float32)
    # without LayerNorm the epilogues read no gamma, beta nor W and write no dgamma
    gamma, beta_ln = (ln_weight, ln_bias) if layer_norm else (proj_weight, proj_weight)
    f32 = dict(device=device, dtype=torch.float32)

    # weight side: G = dZ^T xhat, db
    config = GEMM_CONFIGS["dw", operands]
    rows_per_split, splits = dw_split(rows, e_dim, dim, config, device)
    tiles_e, tiles_d = triton.cdiv(e_dim, config.block_m), triton.cdiv(dim, config.block_n)
    grad_w = torch.empty(e_dim, dim, device=device, dtype=proj_weight.dtype)
    grad_b = torch.empty(e_dim, **f32)
    gamma_part = torch.empty(tiles_e if layer_norm else 0, dim, **f32)
    g_part = torch.empty(splits if splits > 1 else 0, e_dim, dim, **f32)
    db_part = torch.empty(splits if splits > 1 else 0, e_dim, **f32)
    _projection_dw_kernel[(tiles_e, tiles_d, splits)](
        dz, z, t_arg, alpha_arg, beta_arg, dz_scale, x_scale, g_scale, folded, x, x_stats[0], x_stats[1], proj_weight,
        gamma, beta_ln, grad_w, grad_b, gamma_part, g_part, db_part, rows, tokens, dim, e_dim, rows_per_split, splits,
        *_strides3(dz), *_strides3(z), *_strides3(t_arg), *_strides3(x), *proj_weight.stride(),
        DZ_FROM_COSINE=from_cosine, LAYER_NORM=layer_norm, OPERANDS=operands, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    if splits > 1 and layer_norm:
        _dw_split_reduce_kernel[(tiles_e, tiles_d)](
            g_part, db_part, proj_weight, ln_weight, ln_bias, grad_w, grad_b, gamma_part, e_dim, dim,
            splits, *proj_weight.stride(), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            num_warps=config.num_warps)
    elif splits > 1:  # dW = G, db: the splits summed by torch (a fixed order, no atomics)
        grad_w.copy_(g_part.sum(0))
        grad_b.copy_(db_part.sum(0))

    # input side: dxhat = dZ @ Wf, then the LayerNorm backward (fused without resampling); without
    # LayerNorm dxhat is dL/dh, written in place when not resampled
    grad_hidden = torch.empty_like(hidden)
    fuse_ln = step is None and layer_norm
    out = grad_hidden if step is None else torch.empty(batch, tokens, dim, **f32)
    config = gemm_config("dx", operands, fuse_ln and _is_feature_map(x))
    grid = (triton.cdiv(rows, config.block_m) * triton.cdiv(dim, config.block_n),)
    _projection_dx_kernel[grid](
        dz, z, t_arg, alpha_arg, beta_arg, dz_scale, w_folded, folded, x, x_stats[0], x_stats[1], out,
        rows, tokens, dim, e_dim, *_strides3(dz), *_strides3(z), *_strides3(t_arg), *_strides3(x), *_strides3(out),
        DZ_FROM_COSINE=from_cosine, FUSE_LN=fuse_ln, OPERANDS=operands, GROUP_M=GROUP_M,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if step is not None:
        adj_index, adj_weight = _device_taps(step, device, True)
        src_rows = hidden.shape[0] * hidden.shape[1]
        block_rows, block_d, warps = ROW_BLOCK
        _ln_backward_rows_kernel[(triton.cdiv(src_rows, block_rows),)](
            out, adj_index, adj_weight, hidden, stats[0], stats[1], grad_hidden, src_rows, hidden.shape[1], tokens,
            dim, adj_index.shape[1], *_strides3(hidden), *_strides3(grad_hidden),
            LAYER_NORM=layer_norm, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            num_warps=warps if layer_norm else ADJOINT_ONLY_WARPS)
    if not layer_norm:
        return grad_hidden, proj_weight.new_empty(0), proj_weight.new_empty(0), grad_w, grad_b.to(proj_weight.dtype)
    grad_beta = torch.empty(dim, **f32)
    _weight_t_vec_kernel[(triton.cdiv(dim, VEC_BLOCK[1]),)](
        proj_weight, grad_b, grad_beta, e_dim, dim, *proj_weight.stride(), BLOCK_E=VEC_BLOCK[0],
        BLOCK_D=VEC_BLOCK[1], num_warps=VEC_BLOCK[2])
    # LayerNorm's dgamma sums dy * xhat over every hidden row, so a non-finite row that no output
    # reads (dy = 0) still makes it NaN there (0 * NaN); the GEMM above saw only the resampled
    # rows, the row means carry it.
    grad_gamma = gamma_part.sum(0) + 0.0 * stats[0].sum()
    return (grad_hidden, grad_gamma.to(ln_weight.dtype), grad_beta.to(ln_bias.dtype), grad_w,
            grad_b.to(proj_weight.dtype))  # the bias shares W's dtype (_projector_params)


def _affine_rows(t_affine: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(shift, scale), (B, E) fp32 each, of a `target_zscore` affine; (None, None) without one."""
    return (None, None) if t_affine is None else tuple(t_affine.float().contiguous())


def _cosine_rows(z: torch.Tensor, t: torch.Tensor, t_affine: Optional[torch.Tensor]) -> torch.Tensor:
    batch, tokens, e_dim = z.shape
    rows = batch * tokens
    row_terms = torch.empty(4, rows, device=z.device, dtype=torch.float32)
    block_rows, block_e, warps = ROW_BLOCK
    _cosine_rows_kernel[(triton.cdiv(rows, block_rows),)](
        z, t, *_affine_rows(t_affine), row_terms, rows, tokens, e_dim, *_strides3(z), *_strides3(t), 1.0 / rows,
        BLOCK_ROWS=block_rows, BLOCK_E=block_e, T_AFFINE=t_affine is not None, num_warps=warps)
    return row_terms


def _cosine_grad(z, t, t_affine, alpha, beta) -> torch.Tensor:
    batch, tokens, e_dim = z.shape
    rows = batch * tokens
    grad = torch.empty(batch, tokens, e_dim, device=z.device, dtype=z.dtype)
    block_rows, block_e, warps = ROW_BLOCK
    _cosine_grad_kernel[(triton.cdiv(rows, block_rows), triton.cdiv(e_dim, block_e))](
        z, t, *_affine_rows(t_affine), alpha, beta, grad, rows, tokens, e_dim, *_strides3(z), *_strides3(t),
        BLOCK_ROWS=block_rows, BLOCK_E=block_e, T_AFFINE=t_affine is not None, num_warps=warps)
    return grad


# =============================================================================================
# torch.library ops: forward ops return what their backward keeps; the public functions below
# return only the loss / z. The resampling plan travels as (kind, src, dst), kind "none" for none.
# =============================================================================================

Tensor = torch.Tensor


def _decode_step(kind: str, src: List[int], dst: List[int]) -> Optional[Resample]:
    return None if kind == "none" else Resample(kind, tuple(src), tuple(dst))


def _encode_step(step: Optional[Resample]) -> Tuple[str, List[int], List[int]]:
    return ("none", [], []) if step is None else (step.kind, list(step.src), list(step.dst))


def _forward_common(hidden, ln_weight, ln_bias, proj_weight, proj_bias, step, ln_eps, operand: torch.dtype):
    """(stats, xa, w_folded, folded); the resampled rows xa and Wf in the `operand` dtype. Without
    LayerNorm (ln_weight None) the statistics are the identity, Wf = W and bf = b (folded[1],
    rowsum(Wf), is read only by the LayerNorm backward: zeros)."""
    if ln_weight is None:
        stats = _identity_stats(hidden.shape[0] * hidden.shape[1], hidden.device)
        w_folded = proj_weight.to(dtype=operand, memory_format=torch.contiguous_format, copy=True)
        folded = torch.stack((proj_bias.float(), torch.zeros_like(proj_bias, dtype=torch.float32)))
    else:
        stats = _ln_stats(hidden, ln_eps)
        w_folded, folded = _fold_params(ln_weight, ln_bias, proj_weight, proj_bias, operand)
    xa = hidden.new_empty(0) if step is None else _resample_normalized(hidden, stats, step, operand)
    return stats, xa, w_folded, folded


def _fake_common(hidden, proj_weight, kind, dst, operand: torch.dtype):
    """Fake (stats, xa, w_folded, folded) and the aligned token count."""
    batch, tokens, dim = hidden.shape
    aligned = tokens if kind == "none" else math.prod(dst)
    f32 = torch.float32
    xa = hidden.new_empty(0) if kind == "none" else hidden.new_empty(batch, aligned, dim, dtype=operand)
    return (hidden.new_empty(2, batch * tokens, dtype=f32), xa,
            hidden.new_empty(proj_weight.shape[0], dim, dtype=operand),
            hidden.new_empty(2, proj_weight.shape[0], dtype=f32)), aligned


@torch.library.custom_op("repa_fast::triton_repa_loss", mutates_args=())
def _repa_loss_op(hidden: Tensor, target: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                  proj_weight: Tensor,
                  proj_bias: Tensor, resample_kind: str, resample_src: List[int], resample_dst: List[int],
                  ln_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, z, stats, xa, row_terms, w_folded, folded); target already aligned, in the hidden dtype or fp32;
    ln_weight = ln_bias = None: no LayerNorm."""
    step = _decode_step(resample_kind, resample_src, resample_dst)
    operand = operand_dtype(hidden.dtype)
    stats, xa, w_folded, folded = _forward_common(hidden, ln_weight, ln_bias, proj_weight, proj_bias, step, ln_eps,
                                                  operand)
    x, x_stats = _projected_rows(hidden, stats, xa)
    z, row_terms = _projection_forward(x, x_stats, w_folded, folded, target, operand, operand_class(hidden.dtype))
    return -row_terms[0].mean(), z, stats, xa, row_terms, w_folded, folded


@_repa_loss_op.register_fake
def _repa_loss_fake(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, resample_kind, resample_src,
                    resample_dst, ln_eps):
    (stats, xa, w_folded, folded), aligned = _fake_common(hidden, proj_weight, resample_kind, resample_dst,
                                                          operand_dtype(hidden.dtype))
    batch = hidden.shape[0]
    z = hidden.new_empty(batch, aligned, proj_weight.shape[0], dtype=operand_dtype(hidden.dtype))
    return (hidden.new_empty((), dtype=torch.float32), z, stats, xa,
            hidden.new_empty(4, batch * aligned, dtype=torch.float32), w_folded, folded)


def _layer_norm_grads_or_none(ln_weight: Optional[Tensor], grads: Tuple[Tensor, ...]) -> Tuple[Optional[Tensor], ...]:
    """The projection backward's gradients, None for ln_weight and ln_bias without LayerNorm."""
    if ln_weight is None:
        return grads[0], None, None, grads[3], grads[4]
    return grads


def _repa_loss_setup(ctx, inputs, output):
    hidden, target, ln_weight, ln_bias, proj_weight, _, kind, src, dst, _ = inputs
    _, z, stats, xa, row_terms, w_folded, folded = output
    ctx.step = (kind, src, dst)
    ctx.save_for_backward(hidden, target, ln_weight, ln_bias, proj_weight, z, stats, xa, row_terms, w_folded, folded)


def _repa_loss_backward(ctx, grad_loss, *unused_grads):
    hidden, target, ln_weight, ln_bias, proj_weight, z, stats, xa, row_terms, w_folded, folded = ctx.saved_tensors
    grads = _layer_norm_grads_or_none(ln_weight, torch.ops.repa_fast.triton_projection_backward(
        None, z, target, row_terms, grad_loss, hidden, stats, xa, ln_weight, ln_bias, proj_weight, w_folded, folded,
        *ctx.step))
    return grads[0], None, grads[1], grads[2], grads[3], grads[4], None, None, None, None


_repa_loss_op.register_autograd(_repa_loss_backward, setup_context=_repa_loss_setup)


@torch.library.custom_op("repa_fast::triton_aligned_projection", mutates_args=())
def _aligned_projection_op(hidden: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], proj_weight: Tensor,
                           proj_bias: Tensor, resample_kind: str, resample_src: List[int], resample_dst: List[int],
                           ln_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(z fp32, z - bf fp32 (what the backward reads), stats, xa, w_folded, folded). The forward
    GEMM multiplies as `projection_operands` (xa and Wf in fp32), the backward ones as
    `operand_class` (fp16 tiles cast from them for 16-bit activations)."""
    step = _decode_step(resample_kind, resample_src, resample_dst)
    stats, xa, w_folded, folded = _forward_common(hidden, ln_weight, ln_bias, proj_weight, proj_bias, step, ln_eps,
                                                  torch.float32)
    x, x_stats = _projected_rows(hidden, stats, xa)
    z_free, _ = _projection_forward(x, x_stats, w_folded, folded, None, torch.float32,
                                    projection_operands(hidden.dtype))
    return z_free + folded[0], z_free, stats, xa, w_folded, folded


@_aligned_projection_op.register_fake
def _aligned_projection_fake(hidden, ln_weight, ln_bias, proj_weight, proj_bias, resample_kind, resample_src,
                             resample_dst, ln_eps):
    (stats, xa, w_folded, folded), aligned = _fake_common(hidden, proj_weight, resample_kind, resample_dst,
                                                          torch.float32)
    z = hidden.new_empty(hidden.shape[0], aligned, proj_weight.shape[0], dtype=torch.float32)
    return z, torch.empty_like(z), stats, xa, w_folded, folded


def _aligned_projection_setup(ctx, inputs, output):
    hidden, ln_weight, ln_bias, proj_weight, _, kind, src, dst, _ = inputs
    _, z_free, stats, xa, w_folded, folded = output
    ctx.step = (kind, src, dst)
    ctx.save_for_backward(hidden, ln_weight, ln_bias, proj_weight, z_free, stats, xa, w_folded, folded)


def _aligned_projection_backward(ctx, grad_z, *unused_grads):
    hidden, ln_weight, ln_bias, proj_weight, z_free, stats, xa, w_folded, folded = ctx.saved_tensors
    grads = _layer_norm_grads_or_none(ln_weight, torch.ops.repa_fast.triton_projection_backward(
        grad_z, z_free, None, None, None, hidden, stats, xa, ln_weight, ln_bias, proj_weight, w_folded, folded,
        *ctx.step))
    return grads[0], grads[1], grads[2], grads[3], grads[4], None, None, None, None


_aligned_projection_op.register_autograd(_aligned_projection_backward, setup_context=_aligned_projection_setup)


@torch.library.custom_op("repa_fast::triton_projection_backward", mutates_args=())
def _projection_backward_op(grad_z: Optional[Tensor], z: Tensor, target: Optional[Tensor],
                            row_terms: Optional[Tensor], grad_loss: Optional[Tensor], hidden: Tensor, stats: Tensor,
                            xa: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], proj_weight: Tensor,
                            w_folded: Tensor,
                            folded: Tensor, resample_kind: str, resample_src: List[int],
                            resample_dst: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (hidden, ln_weight, ln_bias, proj_weight, proj_bias) from grad_z, or from the
    cosine loss's row terms scaled by grad_loss when grad_z is None; without LayerNorm the
    ln_weight and ln_bias gradients are empty."""
    step = _decode_step(resample_kind, resample_src, resample_dst)
    fp16 = operand_class(hidden.dtype) == "fp16"  # only fp16 operands need dL/dz rescaled
    if grad_z is None:
        alpha, beta = row_terms[1:3] * grad_loss
        bound = row_terms[3] * grad_loss.abs() if fp16 else None
    else:
        alpha = beta = None
        bound = grad_z.abs().amax(dim=-1).reshape(-1) if fp16 else None
    return _projection_backward(grad_z, z, target, alpha, beta, hidden, stats, xa, ln_weight, ln_bias, proj_weight,
                                w_folded, folded, step, bound)


@_projection_backward_op.register_fake
def _projection_backward_fake(grad_z, z, target, row_terms, grad_loss, hidden, stats, xa, ln_weight, ln_bias,
                              proj_weight, w_folded, folded, resample_kind, resample_src, resample_dst):
    if ln_weight is None:
        grad_ln_weight, grad_ln_bias = proj_weight.new_empty(0), proj_weight.new_empty(0)
    else:
        grad_ln_weight, grad_ln_bias = ln_weight.new_empty(ln_weight.shape), ln_bias.new_empty(ln_bias.shape)
    return (torch.empty_like(hidden), grad_ln_weight, grad_ln_bias, proj_weight.new_empty(proj_weight.shape),
            proj_weight.new_empty(proj_weight.shape[0]))


@torch.library.custom_op("repa_fast::triton_cosine_alignment", mutates_args=())
def _cosine_alignment_op(z: Tensor, t: Tensor, t_affine: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(loss, row_terms (4, B*N): cos, alpha, beta, bound)."""
    row_terms = _cosine_rows(z, t, t_affine)
    return -row_terms[0].mean(), row_terms


@_cosine_alignment_op.register_fake
def _cosine_alignment_fake(z, t, t_affine):
    return z.new_empty((), dtype=torch.float32), z.new_empty(4, z.shape[0] * z.shape[1], dtype=torch.float32)


@torch.library.custom_op("repa_fast::triton_cosine_alignment_backward", mutates_args=())
def _cosine_alignment_backward_op(z: Tensor, t: Tensor, t_affine: Optional[Tensor], row_terms: Tensor,
                                  grad_loss: Tensor) -> Tensor:
    alpha, beta = row_terms[1:3] * grad_loss
    return _cosine_grad(z, t, t_affine, alpha, beta)


@_cosine_alignment_backward_op.register_fake
def _cosine_alignment_backward_fake(z, t, t_affine, row_terms, grad_loss):
    return z.new_empty(z.shape)


def _cosine_alignment_setup(ctx, inputs, output):
    ctx.has_affine = inputs[2] is not None
    ctx.save_for_backward(inputs[0], inputs[1], output[1], *inputs[2:] if ctx.has_affine else ())


def _cosine_alignment_backward(ctx, grad_loss, unused_grad):
    z, t, row_terms, *affine = ctx.saved_tensors
    t_affine = affine[0] if ctx.has_affine else None
    return torch.ops.repa_fast.triton_cosine_alignment_backward(z, t, t_affine, row_terms, grad_loss), None, None


_cosine_alignment_op.register_autograd(_cosine_alignment_backward, setup_context=_cosine_alignment_setup)


# =============================================================================================
# public functions (the backend interface of repa_fast/backends.py)
# =============================================================================================

def _check_dtype(name: str, x: Tensor) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"the triton backend takes float32, float16 or bfloat16 {name}, got {x.dtype}; "
                        "use backend='torch' for float64")


def _projector_params(hidden: Tensor, params: Tuple[Optional[Tensor], ...]) -> Tuple[Optional[Tensor], ...]:
    """The projector parameters (ln_weight, ln_bias, proj_weight, proj_bias; the first two both
    None without LayerNorm) in one dtype: theirs when they share fp32 or the hidden dtype, else
    fp32 (the cast is differentiable)."""
    _check_dtype("hidden", hidden)
    dtypes = {p.dtype for p in params if p is not None}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, hidden.dtype):
        return tuple(None if p is None else p.float() for p in params)
    return params


def _contiguous_without_ln(hidden: Tensor, ln_weight: Optional[Tensor]) -> Tensor:
    """Without LayerNorm the rows are an MLP's activations, contiguous already: any other layout
    is copied once (differentiably), so the kernels see no feature map read in place there."""
    return hidden.contiguous() if ln_weight is None else hidden


def repa_loss(hidden: Tensor, target: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
              proj_weight: Tensor, proj_bias: Tensor, plan: AlignmentPlan, ln_eps: float) -> Tensor:
    """-mean cos(align(LayerNorm(hidden) @ W^T + b), align(target)), fp32 scalar; hidden (B, S, D)
    may be any strided view; ln_weight = ln_bias = None: no LayerNorm (an MLP head's last Linear).
    The target is aligned (torch) and kept in its dtype when it is the hidden's, else cast to
    fp32 (exactly: never to a narrower dtype)."""
    params = _projector_params(hidden, (ln_weight, ln_bias, proj_weight, proj_bias))
    _check_dtype("target", target)
    t = resample_tokens(target.detach(), plan.b)
    t = t if t.dtype == hidden.dtype else t.float()
    return _repa_loss_op(_contiguous_without_ln(hidden, ln_weight), t, *params, *_encode_step(plan.a), float(ln_eps))[0]


def aligned_projection(hidden: Tensor, target: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                       proj_weight: Tensor, proj_bias: Tensor, plan: AlignmentPlan,
                       ln_eps: float) -> Tuple[Tensor, Tensor]:
    """(z, t): z = align(LayerNorm(hidden) @ W^T + b), (B, N', E) **fp32**, differentiable w.r.t.
    hidden and the parameters (ln_weight = ln_bias = None: no LayerNorm); t = align(target),
    detached, in the target's dtype (the target itself when it is not resampled)."""
    params = _projector_params(hidden, (ln_weight, ln_bias, proj_weight, proj_bias))
    z = _aligned_projection_op(_contiguous_without_ln(hidden, ln_weight), *params, *_encode_step(plan.a),
                               float(ln_eps))[0]
    return z, resample_tokens(target.detach(), plan.b)


def cosine_alignment_loss(z: Tensor, t: Tensor, t_affine: Optional[Tensor] = None) -> Tensor:
    """-mean over rows of cos(z, t); z, t (B, N, E) in fp32/fp16/bf16 (may differ); fp32 scalar.
    With `t_affine` ((2, B, E) shift, scale: zscore.target_zscore), t' = (t - shift) * scale in
    place of t, formed as the kernels load t."""
    _check_dtype("projected", z)
    _check_dtype("target", t)
    return _cosine_alignment_op(z, t.detach(), t_affine)[0]


# =============================================================================================
# ahead-of-time compile specs (tests/aot_compile.py)
# =============================================================================================

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_FLOAT_ARGS = {"eps", "inv_rows"}


def _spec(fn, pointers: Dict[str, str], constexprs: Dict[str, object], num_warps: int, num_stages: int = 3,
          tensor_cores: bool = False, unit: Tuple[str, ...] = (), divisible: Tuple[str, ...] = (),
          tag: str = "") -> Dict[str, object]:
    """A spec in `fn`'s argument order, specialised as the JIT specialises a launch on contiguous
    model-sized tensors: `unit` strides are the constant 1, every pointer and the `divisible` ints
    are multiples of 16 (`attrs`, in triton.compiler.ASTSource's form). Other scalars: fp32 for
    the float ones, i32."""
    signature, attrs = {}, {}
    constexprs = dict(constexprs, **{name: 1 for name in unit})
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr or name in unit:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name) or ("fp32" if name in _FLOAT_ARGS else "i32")
        if name in pointers or name in divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    unknown = (set(pointers) | set(unit) | set(divisible)) - set(signature)
    assert not unknown, f"{fn.__name__}: no arguments {unknown}"
    return {"name": f"{fn.__name__}[{tag}]", "fn": fn, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "num_warps": num_warps, "num_stages": num_stages, "tensor_cores": tensor_cores}


def _operand_cases() -> Iterator[Tuple[torch.dtype, str]]:
    """(activation dtype, operand class) of the GEMMs: fp32 with and without TF32."""
    yield torch.float32, "ieee"
    yield torch.float32, "tf32"
    yield torch.float16, "fp16"
    yield torch.bfloat16, "fp16"


def _param_dtypes(act: torch.dtype) -> Tuple[torch.dtype, ...]:
    return (torch.float32,) if act == torch.float32 else (torch.float32, act)


def _short(dtype: torch.dtype) -> str:
    return _PTR[dtype][1:]


# Strides and sizes as a contiguous model-sized launch has them (Flux: D 3072, E 1536).
_TOKEN_STRIDES = ("stride_xb", "stride_xs", "stride_xn", "stride_tb", "stride_tn", "stride_zb", "stride_zn",
                  "stride_dzb", "stride_dzn", "stride_ob", "stride_os", "stride_on", "stride_we")
_UNIT_STRIDES = ("stride_xd", "stride_te", "stride_ze", "stride_dze", "stride_od", "stride_wd")


# U-REPA's UNet feature maps (B, D, H, W) are read in place as (B, H W, D) rows, and the hidden
# gradient (torch.empty_like) has their layout: the token strides of X and Out are 1, their
# feature strides H W (a multiple of 16 at the sizes UNets use).
_FEATURE_MAP_TOKEN_STRIDES = ("stride_xs", "stride_xn", "stride_os", "stride_on")
_FEATURE_MAP_FEATURE_STRIDES = ("stride_xd", "stride_od")


def _contiguous(fn, feature_map: bool = False) -> Dict[str, Tuple[str, ...]]:
    names = set(fn.arg_names)
    unit, divisible = _UNIT_STRIDES, _TOKEN_STRIDES + ("D", "E", "rows_per_split")
    if feature_map:
        unit = tuple(n for n in unit if n not in _FEATURE_MAP_FEATURE_STRIDES) + _FEATURE_MAP_TOKEN_STRIDES
        divisible = tuple(n for n in divisible if n not in _FEATURE_MAP_TOKEN_STRIDES) + _FEATURE_MAP_FEATURE_STRIDES
    return {"unit": tuple(n for n in unit if n in names), "divisible": tuple(n for n in divisible if n in names)}


def aot_specs() -> Iterator[Dict[str, object]]:
    """Every kernel configuration the launchers above can pick (dtypes, modes, tiles)."""
    f32 = "*fp32"
    rows, block_d, warps = ROW_BLOCK
    row_blocks = {"BLOCK_ROWS": rows, "BLOCK_D": block_d}
    for act in ACTIVATION_DTYPES:
        a, o, tag = _PTR[act], _PTR[operand_dtype(act)], _short(act)
        for feature_map in (False, True):  # the hidden rows: contiguous, or a UNet feature map in place
            layout = f"{tag},feature_map" if feature_map else tag
            yield _spec(_ln_stats_kernel, {"X": a, "Mean": f32, "Rstd": f32}, row_blocks, warps, tag=layout,
                        **_contiguous(_ln_stats_kernel, feature_map))
            for out in sorted({o, f32}):  # repa_loss's operand dtype, aligned_projection's fp32
                yield _spec(_resample_normalized_kernel, {"X": a, "Mean": f32, "Rstd": f32, "TapIndex": "*i64",
                                                          "TapWeight": f32, "Out": out}, row_blocks, warps,
                            tag=f"{layout}->{out[1:]}", **_contiguous(_resample_normalized_kernel, feature_map))
            for layer_norm in (True, False) if not feature_map else (True,):  # see _contiguous_without_ln
                yield _spec(_ln_backward_rows_kernel, {"GradXhat": f32, "AdjIndex": "*i64", "AdjWeight": f32,
                                                       "X": a, "Mean": f32, "Rstd": f32, "DX": a},
                            dict(row_blocks, LAYER_NORM=layer_norm), warps if layer_norm else ADJOINT_ONLY_WARPS,
                            tag=f"{layout},layer_norm={layer_norm}",
                            **_contiguous(_ln_backward_rows_kernel, feature_map))
            # fp16 operands' dW scales: max |xhat| of the hidden rows, or (below) of the resampled ones
            if act != torch.float32:
                yield _spec(_row_abs_max_kernel, {"X": a, "Mean": f32, "Rstd": f32, "Out": f32}, row_blocks, warps,
                            tag=layout, **_contiguous(_row_abs_max_kernel, feature_map))
        if act != torch.float32:
            for x in sorted({o, f32} - {a}):
                yield _spec(_row_abs_max_kernel, {"X": x, "Mean": f32, "Rstd": f32, "Out": f32}, row_blocks, warps,
                            tag=f"{tag},resampled={x[1:]}", **_contiguous(_row_abs_max_kernel))
        for param in _param_dtypes(act):
            p = _PTR[param]
            for out in sorted({o, f32}):
                yield _spec(_fold_params_kernel, {"W": p, "Gamma": p, "Beta": p, "Bias": p, "WFolded": out,
                                                  "Folded": f32},
                            {"BLOCK_E": rows, "BLOCK_D": block_d}, warps, tag=f"{_short(param)}->{out[1:]}",
                            **_contiguous(_fold_params_kernel))
    yield _spec(_cosine_finish_kernel, {"RowSums": f32, "RowTerms": f32}, {"BLOCK": FINISH_BLOCK}, 4)
    for z_dtype in ACTIVATION_DTYPES:
        for t_dtype in ACTIVATION_DTYPES:
            z, t = _PTR[z_dtype], _PTR[t_dtype]
            tag = f"z={_short(z_dtype)},t={_short(t_dtype)}"
            blocks = {"BLOCK_ROWS": rows, "BLOCK_E": block_d}
            for t_affine in (False, True):  # cosine_alignment_loss with iREPA's target z-score
                affine = {"Shift": f32, "Scale": f32}
                flags = dict(blocks, T_AFFINE=t_affine)
                tagged = f"{tag},t_affine={t_affine}"
                yield _spec(_cosine_rows_kernel, {"Z": z, "T": t, "RowTerms": f32, **affine}, flags, warps,
                            tag=tagged, **_contiguous(_cosine_rows_kernel))
                yield _spec(_cosine_grad_kernel, {"Z": z, "T": t, "Alpha": f32, "Beta": f32, "DZ": z, **affine},
                            flags, warps, tag=tagged, **_contiguous(_cosine_grad_kernel))

    for act, operands in _operand_cases():
        # a: hidden and target; o: repa_loss's operand buffers (Wf, resampled rows, its z).
        # aligned_projection keeps Wf and the resampled rows in fp32. The GEMMs read as rows X the
        # hidden itself (a) or, when it is resampled, the resampled rows.
        a, o = _PTR[act], _PTR[operand_dtype(act)]
        base = f"{_short(act)},{operands}"
        fwd_operands = projection_operands(act) if act != torch.float32 else operands

        def gemm(kind, ops=operands, feature_map=False):
            config = gemm_config(kind, ops, feature_map)
            return dict(num_warps=config.num_warps, num_stages=config.num_stages, tensor_cores=ops != "ieee"), \
                {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k, "OPERANDS": ops}
        # forward: repa_loss (z in the operand dtype, row sums) / aligned_projection (z fp32)
        targets = sorted({a, f32})  # repa_loss's target: the hidden dtype, else fp32
        forwards = [(ops, x, w, row_sums, z, t) for ops, w, rows_x, cases in
                    [(operands, o, {a, o}, [(True, o, t) for t in targets]),
                     (fwd_operands, f32, {a, f32}, [(False, f32, f32)])]
                    for x in sorted(rows_x) for row_sums, z, t in cases]
        for ops, x, w, row_sums, z, t in forwards:
            options, blocks = gemm("fwd", ops)
            yield _spec(_projection_fwd_kernel, {"X": x, "Mean": f32, "Rstd": f32, "WFolded": w, "Folded": f32,
                                                 "T": t, "Z": z, "RowSums": f32},
                        dict(blocks, ROW_SUMS=row_sums, GROUP_M=GROUP_M), **options,
                        tag=f"{_short(act)},{ops},x={x[1:]},w={w[1:]},t={t[1:]},row_sums={row_sums}",
                        **_contiguous(_projection_fwd_kernel))
        # U-REPA (aligned_projection: Wf and z fp32, no row sums) on a feature map read in place, not resampled
        options, blocks = gemm("fwd", fwd_operands, feature_map=True)
        yield _spec(_projection_fwd_kernel, {"X": a, "Mean": f32, "Rstd": f32, "WFolded": f32, "Folded": f32,
                                             "T": f32, "Z": f32, "RowSums": f32},
                    dict(blocks, ROW_SUMS=False, GROUP_M=GROUP_M), **options,
                    tag=f"{_short(act)},{fwd_operands},x={a[1:]},w=fp32,t=fp32,row_sums=False,feature_map",
                    **_contiguous(_projection_fwd_kernel, feature_map=True))
        # backward: dL/dz from the cosine terms (repa_loss: z in the operand dtype, t in the hidden
        # dtype or fp32) or handed in (fp32, aligned_projection's z, Wf and resampled rows fp32)
        for from_cosine, t in [(True, t) for t in targets] + [(False, f32)]:
            dz_ptrs = ({"DZ": o, "Z": o, "T": t, "Alpha": f32, "Beta": f32} if from_cosine else
                       {"DZ": f32, "Z": f32, "T": f32, "Alpha": f32, "Beta": f32})
            w = o if from_cosine else f32
            # (fuse_ln, in place, rows X, Out, label): fused, the hidden rows, also U-REPA's feature
            # maps in place (dL/dz handed in); the resampled rows (X unused, dL/dxhat fp32); no
            # LayerNorm and not resampled: dL/dh straight into the (contiguous) hidden gradient, the
            # resampled rows' configuration for fp32 activations
            cases = ([(True, False, a, a, "")] + ([] if from_cosine else [(True, True, a, a, ",feature_map")])
                     + [(False, False, w, f32, "")]
                     + ([(False, False, a, a, ",no_layer_norm")] if (a, a) != (w, f32) else []))
            for fuse_ln, in_place, x, out, label in cases:
                options, blocks = gemm("dx", feature_map=in_place)
                yield _spec(_projection_dx_kernel,
                            dict(dz_ptrs, DzScale=f32, WFolded=w, Folded=f32, X=x, Mean=f32, Rstd=f32, Out=out),
                            dict(blocks, DZ_FROM_COSINE=from_cosine, FUSE_LN=fuse_ln, GROUP_M=GROUP_M), **options,
                            tag=f"{base},t={t[1:]},from_cosine={from_cosine},fuse_ln={fuse_ln}{label}",
                            **_contiguous(_projection_dx_kernel, in_place))
            options, blocks = gemm("dw")
            feature_map = [] if from_cosine else [(a, True)]
            for x, in_place in [(x, False) for x in sorted({a, w})] + feature_map:
                layer_norms = (True,) if in_place else (True, False)  # see _contiguous_without_ln
                for param, layer_norm in [(param, ln) for param in _param_dtypes(act) for ln in layer_norms]:
                    p = _PTR[param]
                    yield _spec(_projection_dw_kernel,
                                dict(dz_ptrs, DzScale=f32, XScale=f32, GScale=f32, Folded=f32, X=x, Mean=f32,
                                     Rstd=f32, W=p, Gamma=p, Beta_ln=p, DW=p, Db=f32, DGammaPart=f32, GPart=f32,
                                     DbPart=f32),
                                dict(blocks, DZ_FROM_COSINE=from_cosine, LAYER_NORM=layer_norm), **options,
                                tag=f"{base},x={x[1:]},param={_short(param)},t={t[1:]},from_cosine={from_cosine},"
                                    f"layer_norm={layer_norm}" + (",feature_map" if in_place else ""),
                                **_contiguous(_projection_dw_kernel, in_place))
    for param in ACTIVATION_DTYPES:
        yield _spec(_weight_t_vec_kernel, {"W": _PTR[param], "V": f32, "Out": f32},
                    {"BLOCK_E": VEC_BLOCK[0], "BLOCK_D": VEC_BLOCK[1]}, VEC_BLOCK[2], tag=_short(param),
                    **_contiguous(_weight_t_vec_kernel))
    reduce_cases = {(param, GEMM_CONFIGS["dw", operands]) for act, operands in _operand_cases()
                    for param in _param_dtypes(act)}
    for param, config in sorted(reduce_cases, key=str):
        p = _PTR[param]
        yield _spec(_dw_split_reduce_kernel, {"GPart": f32, "DbPart": f32, "W": p, "Gamma": p, "Beta_ln": p,
                                              "DW": p, "Db": f32, "DGammaPart": f32},
                    {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n}, config.num_warps,
                    tag=f"param={_short(param)},{config.block_m}x{config.block_n}",
                    **_contiguous(_dw_split_reduce_kernel))


__all__ = ["repa_loss", "aligned_projection", "cosine_alignment_loss", "aot_specs"]
