"""U-REPA manifold loss (DESIGN.md §1) in Triton, and the fused U-REPA head.

    L = mean over (b, i, j) of (<zn_bi, zn_bj> - <tn_bi, tn_bj>)^2,   zn = F.normalize(z), tn = F.normalize(t)

Nothing of size B x N x N is ever allocated. Two forms, the cheaper picked per call with
`repa_fast.reference.use_gram_form`:

* direct (N up to ~5E/3): per sample, tiles D_IJ = Zn_I Zn_J^T - Tn_I Tn_J^T = (S_I D_J^T +
  D_I S_J^T) / 2 built in registers from the rows S = Zn + Tn and D = Zn - Tn, which the row pass
  forms in fp32 and rounds once: D keeps its relative precision as z -> t, where products of
  rounded Zn and Tn rows erred by the rounding itself (fused head, fp16 operands, noise 0.001:
  2e-1 against torch's 1.4e-4; now 4e-4, as the Gram form). Squared and reduced; without a
  gradient only tiles J >= I run, off-diagonal ones counted twice. With a gradient every tile of
  a chunk of rows runs and stores D in the operand type into a scratch of (B, rows, N), rows < N
  and at most SCRATCH_ELEMENTS in all (a bounded slab, never B x N x N); a second GEMM D @ Zn then
  gives g = (4 / (B N^2)) D Zn (fp32, a g slab of the chunk's rows) and per feature tile the
  partial sums of <zn, g>; a row pass applies the normalisation's backward
  dz = (g - zn <zn, g>) / ||z||, written in the input's dtype (as in the Gram form).
* Gram (N well above E): with S = Zn + Tn and D = Zn - Tn, formed from the normalised rows in
  fp32 at load time and rounded once, Zn Zn^T - Tn Tn^T = (S D^T + D S^T) / 2 and the sum is
  (<S^T S, D^T D> + <S^T D, D^T S>) / 2. The textbook ||Zn^T Zn||^2 - 2 ||Tn^T Zn||^2 +
  ||Tn^T Tn||^2 cancels large terms when Zn ~ Tn or the rows share a direction (measured: fp32
  loss errors 2e-5 to 1e-1, fp16 above 1); this form has nothing to cancel. One program per pair
  of feature tiles (a, b), b >= a, runs one GEMM [S_a | D_a]^T [S_b | D_b] = [[SS, SD], [DS, DD]]
  over the N tokens (fp32 accumulator); tile (b, a) has the same loss summand and transposed
  blocks. The gradient w.r.t. Zn, 4 (Zn Zn^T - Tn Tn^T) Zn / (B N^2) = [S | D] M / (B N^2) with
  M = [D^T S + D^T D; S^T S + S^T D] = 2 [D^T Zn; S^T Zn] (2E x E, written by the same programs),
  is one GEMM over K = 2E; g (fp32) goes through a row-chunk scratch, then a row pass applies the
  normalisation's backward. M is stored rounded, less its rank-one part along the rows' mean,
  R = 2N [d_mean; s_mean] z_mean^T (column means from a pre-pass): when the rows share a direction
  R dominates M and its rounding swamped the gradient (fp16: 3e-3 at pairwise cos 0.92, 1e-1 at
  0.997); [S | D] R goes back in fp32 from the unrounded rows (then 4e-4 and 6e-4). |M - R| <= 4N:
  it is stored times a power of two <= M_RANGE / N, which keeps fp16 entries below 32768 and the
  typical ones clear of fp16's subnormals (unscaled, they cost up to 3e-2 of the gradient as
  Zn -> Tn).

Precision. fp32 activations: fp32 throughout (TF32 only where torch's matmul precision allows).
16-bit activations: tensor-core operands are 16-bit with fp32 accumulation. Every operand is a
rounded result — normalised rows, S and D, the D scratch, M — and fp16, for bf16 activations
too: those values lie in [-2, 2] (M is scaled into range), where fp16 has 3 more mantissa bits than bf16
(bf16 operands gave 4-7e-3 gradient errors on aligned inputs, growing as alignment improves;
fp16 ones 5-8e-4). The fused head keeps the projection z in fp32: its manifold gradient (SDXL
U-REPA: median 1.2e-9) lies below fp16's smallest subnormal and would flush to zero. So no raw
value is rounded to fp16 and nothing can overflow.

iREPA's z-score of the target (`manifold_loss`'s t_affine, zscore.py) is formed in fp32 by the
row pass as it loads t; the direct form reads only what the row pass wrote, the Gram form's
kernels read the target itself, so there the row pass also writes t' (fp32) and that form runs
in fp32 (fp32 operands).

The loss ends the graph, so the gradient is computed in the forward pass and backward only
scales it. Row norms are computed once (one row pass that also yields the cosine alignment term
of U-REPA and, when asked, its gradient). Every reduction goes through per-program partials
summed in a fixed order, no atomics: the same inputs give bitwise the same loss and gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from repa_fast.reference import use_gram_form

from .projection import (ACTIVATION_DTYPES, _affine_rows, _num_sms, _target_tile, aligned_projection, operand_class,
                         operand_dtype)


EPS = 1e-12                    # F.normalize's eps
SCRATCH_ELEMENTS = 2 ** 24     # bound of the D slab (direct form) and of each form's g slab
M_RANGE = 2 ** 13              # Gram form: M is stored times a power of two <= M_RANGE / N (entries < 4 M_RANGE)


# ---------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _normalized(z_ptrs, t_ptrs, mask, inv_nz, inv_nt):
    """(zn, tn) of a (tokens, features) tile of raw rows, fp32. Their sums and differences are
    formed in fp32 and rounded once, by the callers: no cancellation left for rounding to magnify."""
    zn = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32) * inv_nz[:, None]
    tn = tl.load(t_ptrs, mask=mask, other=0.0).to(tl.float32) * inv_nt[:, None]
    return zn, tn


@triton.jit
def _row_stats_kernel(
    Z, T,                     # (B, N, E) inputs, any strides
    SHIFT, SCALE,             # (B, E) fp32: t' = (t - shift) * scale is the target (T_AFFINE)
    NZ, NT, COS,              # (B, N) fp32 out: max(||z||, eps), max(||t'||, eps), <zn, tn>
    ZN,                       # (B, N, E) out, operand type: zn (WRITE_ZN)
    SUM, DIFF,                # (B, N, E) out, operand type: zn + tn, zn - tn, each rounded once (WRITE_SUM_DIFF)
    GA,                       # (B, N, E) out, z's dtype: d(-mean cos)/dz (WRITE_ALIGN_GRAD)
    TA,                       # (B, N, E) out, fp32: t' for the Gram form's kernels (WRITE_TARGET)
    N, E, align_scale,        # align_scale = -1 / (B N)
    stride_zb, stride_zn, stride_ze, stride_tb, stride_tn, stride_te,
    BLOCK_ROWS: tl.constexpr, BLOCK_E: tl.constexpr, EPS: tl.constexpr,
    WRITE_ZN: tl.constexpr, WRITE_SUM_DIFF: tl.constexpr, WRITE_ALIGN_GRAD: tl.constexpr,
    T_AFFINE: tl.constexpr, WRITE_TARGET: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < N
    z_rows = Z + b * stride_zb + rows[:, None] * stride_zn
    t_rows = T + b * stride_tb + rows[:, None] * stride_tn
    zz = tl.zeros((BLOCK_ROWS,), tl.float32)
    tt = tl.zeros((BLOCK_ROWS,), tl.float32)
    zt = tl.zeros((BLOCK_ROWS,), tl.float32)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        mask = row_ok[:, None] & (es < E)[None, :]
        z = tl.load(z_rows + es[None, :] * stride_ze, mask=mask, other=0.0).to(tl.float32)
        t = _target_tile(t_rows + es[None, :] * stride_te, mask, SHIFT, SCALE, b * E + es[None, :],
                         (es < E)[None, :], T_AFFINE)
        zz += tl.sum(z * z, 1)
        tt += tl.sum(t * t, 1)
        zt += tl.sum(z * t, 1)
    nz = tl.maximum(tl.sqrt(zz), EPS)
    nt = tl.maximum(tl.sqrt(tt), EPS)
    cos = zt / nz / nt
    tl.store(NZ + b * N + rows, nz, mask=row_ok)
    tl.store(NT + b * N + rows, nt, mask=row_ok)
    tl.store(COS + b * N + rows, cos, mask=row_ok)
    if WRITE_ZN or WRITE_SUM_DIFF or WRITE_ALIGN_GRAD or WRITE_TARGET:
        out_rows = b * N * E + rows[:, None] * E
        # F.normalize's backward: the radial part only flows where the norm was not clamped.
        radial_cos = tl.where(nz > EPS, cos, 0.0)
        for e0 in range(0, E, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            mask = row_ok[:, None] & (es < E)[None, :]
            out = out_rows + es[None, :]
            zn = tl.load(z_rows + es[None, :] * stride_ze, mask=mask, other=0.0).to(tl.float32) * (1.0 / nz)[:, None]
            t = _target_tile(t_rows + es[None, :] * stride_te, mask, SHIFT, SCALE, b * E + es[None, :],
                             (es < E)[None, :], T_AFFINE)
            tn = t * (1.0 / nt)[:, None]
            if WRITE_ZN:
                tl.store(ZN + out, zn.to(ZN.dtype.element_ty), mask=mask)
            if WRITE_SUM_DIFF:
                tl.store(SUM + out, (zn + tn).to(SUM.dtype.element_ty), mask=mask)
                tl.store(DIFF + out, (zn - tn).to(DIFF.dtype.element_ty), mask=mask)
            if WRITE_ALIGN_GRAD:
                ga = (tn - zn * radial_cos[:, None]) * (align_scale / nz)[:, None]
                tl.store(GA + out, ga.to(GA.dtype.element_ty), mask=mask)
            if WRITE_TARGET:
                tl.store(TA + out, t.to(TA.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_cross_products(acc, X, Y, rows, row_ok, cols, col_ok, E,
                               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + X[rows] @ Y[cols]^T over the E features of contiguous rows (X, Y at their sample)."""
    for k0 in range(0, E, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = (ks < E)[None, :]
        x = tl.load(X + rows[:, None] * E + ks[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        y = tl.load(Y + cols[:, None] * E + ks[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _direct_tiles_kernel(
    SUM, DIFF,                # (B, N, E) operand type, contiguous: S = Zn + Tn, D = Zn - Tn (the row pass)
    D,                        # (B, chunk_rows, N) operand-type scratch: D tiles of this row chunk (WITH_GRAD)
    LOSS_PART,                # (B, n_loss_parts) fp32: one weighted sum of D^2 per program
    N, E, row_start, row_stop, loss_offset, n_loss_parts,
    stride_db, stride_dn,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, WITH_GRAD: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK)
    tile_i = pid // n_col_tiles
    tile_j = pid % n_col_tiles
    if not WITH_GRAD:
        # Loss only: D is symmetric, the tiles below the diagonal are their mirrors.
        if tile_j < tile_i:
            return
    rows = row_start + tile_i * BLOCK + tl.arange(0, BLOCK)
    cols = tile_j * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < row_stop
    col_ok = cols < N
    # D_IJ = Zn_I Zn_J^T - Tn_I Tn_J^T = (S_I D_J^T + D_I S_J^T) / 2: the products of the rounded
    # rows are as exact relative to D as the rows are, however close Zn is to Tn.
    sum_rows = SUM + b * N * E
    diff_rows = DIFF + b * N * E
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    acc = _accumulate_cross_products(acc, sum_rows, diff_rows, rows, row_ok, cols, col_ok, E, BLOCK_K, PRECISION)
    acc = _accumulate_cross_products(acc, diff_rows, sum_rows, rows, row_ok, cols, col_ok, E, BLOCK_K, PRECISION)
    d = acc * 0.5

    weight = 1.0
    if not WITH_GRAD:
        weight = tl.where(tile_j > tile_i, 2.0, 1.0)
    tl.store(LOSS_PART + b * n_loss_parts + loss_offset + pid, tl.sum(tl.sum(d * d, 1), 0) * weight)
    if WITH_GRAD:
        d_ptrs = D + b * stride_db + (rows - row_start)[:, None] * stride_dn + cols[None, :]
        tl.store(d_ptrs, d.to(D.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _chunk_tile(E, row_start, row_stop, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's sample, rows of the chunk [row_start, row_stop) and features, with masks:
    grid (row tiles x feature tiles, B)."""
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    n_e_tiles = tl.cdiv(E, BLOCK_E)
    rows = row_start + (pid // n_e_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    es = (pid % n_e_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    return b, rows, rows < row_stop, es, es < E


@triton.jit
def _store_g_rows(G, S_PART, g, z_rows, inv_nz, b, rows, row_ok, row_start, es, e_ok, N, E,
                  stride_ze, stride_gb, stride_gn, BLOCK_E: tl.constexpr):
    """g (fp32) into the chunk's slab, and its share of <zn_i, g_i> per feature tile: the
    normalisation's backward (_finish_kernel) needs the whole row's sum. z_rows: (BLOCK_M, 1)."""
    tile_e = tl.program_id(0) % tl.cdiv(E, BLOCK_E)
    mask = row_ok[:, None] & e_ok[None, :]
    z = tl.load(z_rows + es[None, :] * stride_ze, mask=mask, other=0.0)
    tl.store(S_PART + (b * tl.cdiv(E, BLOCK_E) + tile_e) * N + rows, tl.sum(z.to(tl.float32) * g, 1) * inv_nz,
             mask=row_ok)
    tl.store(G + b * stride_gb + (rows - row_start)[:, None] * stride_gn + es[None, :], g, mask=mask)


@triton.jit
def _store_input_gradient(OUT, g, s, Z, NZ, b, rows, row_ok, es, e_ok, N, E,
                          stride_zb, stride_zn, stride_ze, EPS: tl.constexpr):
    """OUT[b, rows, es] = F.normalize's backward of g: (g - zn <zn, g>) / ||z|| where the norm
    was not clamped, g / eps where it was; s = <zn, g> over the whole row."""
    mask = row_ok[:, None] & e_ok[None, :]
    nz = tl.load(NZ + b * N + rows, mask=row_ok, other=1.0)
    z = tl.load(Z + b * stride_zb + rows[:, None] * stride_zn + es[None, :] * stride_ze, mask=mask, other=0.0)
    radial_s = tl.where(nz > EPS, s / nz, 0.0)
    dz = (g - z.to(tl.float32) * radial_s[:, None]) / nz[:, None]
    tl.store(OUT + b * N * E + rows[:, None] * E + es[None, :], dz.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _sum_row_partials(S_PART, b, rows, row_ok, N, n_parts):
    """sum over p of S_PART[b, p, rows], in order."""
    s = tl.zeros(rows.shape, tl.float32)
    for p in range(0, n_parts):
        s += tl.load(S_PART + (b * n_parts + p) * N + rows, mask=row_ok, other=0.0)
    return s


@triton.jit
def _accumulate_rows_times(acc, x_rows, stride_xk, row_ok, w_cols, stride_wk, col_ok, K,
                           BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + X[rows, :K] @ W[:K, cols]; x_rows (BLOCK_M, 1) and w_cols (1, BLOCK_N) point at
    element 0 along K."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _direct_grad_kernel(
    D,                        # (B, chunk_rows, N) operand type: D rows of this chunk
    ZN,                       # (B, N, E) operand type, contiguous: zn
    Z,                        # (B, N, E) input, any strides
    NZ,                       # (B, N) fp32 clamped norms of z rows
    G,                        # (B, chunk_rows, E) fp32 out: g rows of this chunk
    S_PART,                   # (B, n_e_tiles, N) fp32 out: per feature tile, <zn_i, g_i>
    N, E, row_start, row_stop, scale,     # scale = 4 / (B N^2)
    stride_db, stride_dn, stride_zb, stride_zn, stride_ze, stride_gb, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    b, rows, row_ok, es, e_ok = _chunk_tile(E, row_start, row_stop, BLOCK_M, BLOCK_E)
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    acc = _accumulate_rows_times(acc, D + b * stride_db + (rows - row_start)[:, None] * stride_dn, 1, row_ok,
                                 ZN + b * N * E + es[None, :], E, e_ok, N, BLOCK_K, PRECISION)
    inv_nz = 1.0 / tl.load(NZ + b * N + rows, mask=row_ok, other=1.0)
    _store_g_rows(G, S_PART, acc * scale, Z + b * stride_zb + rows[:, None] * stride_zn, inv_nz, b, rows, row_ok,
                  row_start, es, e_ok, N, E, stride_ze, stride_gb, stride_gn, BLOCK_E)


@triton.jit
def _column_means_kernel(
    Z, T,                     # (B, N, E) inputs, any strides
    NZ, NT,                   # (B, N) fp32 clamped row norms
    MEAN_PART,                # (B, n_parts, 2, E) fp32 out: this part's rows' sums of s and d, over N
    N, E, rows_per_part,      # rows_per_part: a multiple of BLOCK_ROWS
    stride_zb, stride_zn, stride_ze, stride_tb, stride_tn, stride_te,
    BLOCK_ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    part = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = es < E
    s_sum = tl.zeros((BLOCK_ROWS, BLOCK_E), tl.float32)
    d_sum = tl.zeros((BLOCK_ROWS, BLOCK_E), tl.float32)
    for r0 in range(part * rows_per_part, tl.minimum(part * rows_per_part + rows_per_part, N), BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < N
        zn, tn = _normalized(Z + b * stride_zb + rows[:, None] * stride_zn + es[None, :] * stride_ze,
                             T + b * stride_tb + rows[:, None] * stride_tn + es[None, :] * stride_te,
                             row_ok[:, None] & e_ok[None, :],
                             1.0 / tl.load(NZ + b * N + rows, mask=row_ok, other=1.0),
                             1.0 / tl.load(NT + b * N + rows, mask=row_ok, other=1.0))
        s_sum += zn + tn
        d_sum += zn - tn
    out = MEAN_PART + (b * tl.num_programs(0) + part) * 2 * E + es
    tl.store(out, tl.sum(s_sum, 0) / N, mask=e_ok)
    tl.store(out + E, tl.sum(d_sum, 0) / N, mask=e_ok)


@triton.jit
def _gram_kernel(
    Z, T,                     # (B, N, E) inputs, any strides
    NZ, NT,                   # (B, N) fp32 clamped row norms
    MEANS,                    # (B, 2, E) fp32: column means of S and of D
    M,                        # (B, 2E, E) operand type out: m_scale ([D^T S + D^T D; S^T S + S^T D] - R)
    LOSS_PART,                # (B, n_tiles^2) fp32: per program, its tile pair's share of the sum
    N, E, m_scale,
    stride_zb, stride_zn, stride_ze, stride_tb, stride_tn, stride_te,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(E, BLOCK)
    tile_a = pid // n_tiles
    tile_b = pid % n_tiles
    # S^T S and D^T D are symmetric, S^T D = (D^T S)^T: tile (b, a) has tile (a, b)'s loss
    # summand and transposed blocks, so only tiles b >= a run and they write both halves of M.
    if tile_b < tile_a:
        return
    operand = M.dtype.element_ty
    # One GEMM [S_a | D_a]^T [S_b | D_b] gives the four blocks [[SS, SD], [DS, DD]]: each side
    # reads its features twice (the second time from cache), adding tn, then subtracting it.
    lanes = tl.arange(0, 2 * BLOCK)
    sign = tl.where(lanes < BLOCK, 1.0, -1.0)
    ea = tile_a * BLOCK + lanes % BLOCK
    eb = tile_b * BLOCK + lanes % BLOCK
    ea_ok = ea < E
    eb_ok = eb < E
    z_sample = Z + b * stride_zb
    t_sample = T + b * stride_tb
    acc = tl.zeros((2 * BLOCK, 2 * BLOCK), tl.float32)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        inv_nz = 1.0 / tl.load(NZ + b * N + ks, mask=k_ok, other=1.0)
        inv_nt = 1.0 / tl.load(NT + b * N + ks, mask=k_ok, other=1.0)
        zn_a, tn_a = _normalized(z_sample + ks[:, None] * stride_zn + ea[None, :] * stride_ze,
                                 t_sample + ks[:, None] * stride_tn + ea[None, :] * stride_te,
                                 k_ok[:, None] & ea_ok[None, :], inv_nz, inv_nt)
        zn_b, tn_b = _normalized(z_sample + ks[:, None] * stride_zn + eb[None, :] * stride_ze,
                                 t_sample + ks[:, None] * stride_tn + eb[None, :] * stride_te,
                                 k_ok[:, None] & eb_ok[None, :], inv_nz, inv_nt)
        x_a = (zn_a + tn_a * sign[None, :]).to(operand)
        x_b = (zn_b + tn_b * sign[None, :]).to(operand)
        acc = tl.dot(tl.trans(x_a), x_b, acc, input_precision=PRECISION)
    # quadrants[r, c, i, j] = acc[i BLOCK + r, j BLOCK + c]; split takes the last axis.
    quadrants = tl.permute(tl.reshape(acc, (2, BLOCK, 2, BLOCK)), (1, 3, 0, 2))
    s_cols, d_cols = tl.split(quadrants)
    ss, ds = tl.split(s_cols)
    sd, dd = tl.split(d_cols)
    weight = tl.where(tile_b > tile_a, 1.0, 0.5)      # (<S^T S, D^T D> + <S^T D, D^T S>) / 2
    tl.store(LOSS_PART + b * n_tiles * n_tiles + pid, tl.sum(tl.sum(ss * dd + sd * ds, 1), 0) * weight)

    # M = 2 [D^T Zn; S^T Zn] minus R = 2N [d_mean; s_mean] z_mean^T, its part along the rows'
    # mean: when the rows share a direction that part dominates and its rounding would swamp
    # the gradient; the rest is rounded, R goes back in fp32 in _gram_grad_kernel.
    ra = tile_a * BLOCK + tl.arange(0, BLOCK)
    rb = tile_b * BLOCK + tl.arange(0, BLOCK)
    ra_ok = ra < E
    rb_ok = rb < E
    means = MEANS + b * 2 * E
    s_mean_a = tl.load(means + ra, mask=ra_ok, other=0.0)
    d_mean_a = tl.load(means + E + ra, mask=ra_ok, other=0.0)
    s_mean_b = tl.load(means + rb, mask=rb_ok, other=0.0)
    d_mean_b = tl.load(means + E + rb, mask=rb_ok, other=0.0)
    z_mean_2n_a = (s_mean_a + d_mean_a) * N          # 2N z_mean, z_mean = (s_mean + d_mean) / 2
    z_mean_2n_b = (s_mean_b + d_mean_b) * N
    m_sample = M + b * 2 * E * E
    mask = ra_ok[:, None] & rb_ok[None, :]
    m_ab = m_sample + ra[:, None] * E + rb[None, :]
    tl.store(m_ab, ((ds + dd - d_mean_a[:, None] * z_mean_2n_b[None, :]) * m_scale).to(operand), mask=mask)
    tl.store(m_ab + E * E, ((ss + sd - s_mean_a[:, None] * z_mean_2n_b[None, :]) * m_scale).to(operand), mask=mask)
    if tile_b > tile_a:
        m_ba = m_sample + rb[None, :] * E + ra[:, None]       # block (b, a), transposed
        tl.store(m_ba, ((sd + dd - z_mean_2n_a[:, None] * d_mean_b[None, :]) * m_scale).to(operand), mask=mask)
        tl.store(m_ba + E * E, ((ss + ds - z_mean_2n_a[:, None] * s_mean_b[None, :]) * m_scale).to(operand),
                 mask=mask)


@triton.jit
def _gram_grad_kernel(
    Z, T,                     # (B, N, E) inputs, any strides
    NZ, NT,                   # (B, N) fp32 clamped row norms
    MEANS,                    # (B, 2, E) fp32: column means of S and of D
    M,                        # (B, 2E, E) operand type: m_scale (M - R), see _gram_kernel
    G,                        # (B, chunk_rows, E) fp32 out: g rows of this chunk
    S_PART,                   # (B, n_e_tiles, N) fp32 out: per feature tile, <zn_i, g_i>
    N, E, row_start, row_stop, m_scale, scale,      # scale = 1 / (B N^2)
    stride_zb, stride_zn, stride_ze, stride_tb, stride_tn, stride_te, stride_gb, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    b, rows, row_ok, es, e_ok = _chunk_tile(E, row_start, row_stop, BLOCK_M, BLOCK_E)
    operand = M.dtype.element_ty
    inv_nz = 1.0 / tl.load(NZ + b * N + rows, mask=row_ok, other=1.0)
    inv_nt = 1.0 / tl.load(NT + b * N + rows, mask=row_ok, other=1.0)
    z_rows = Z + b * stride_zb + rows[:, None] * stride_zn
    t_rows = T + b * stride_tb + rows[:, None] * stride_tn
    means = MEANS + b * 2 * E
    m_cols = M + b * 2 * E * E + es[None, :]
    # g = [S | D] (M - R) + [S | D] R: each step's S and D columns meet the matching rows of M's
    # top and bottom halves; [S | D] R = 2N (S d_mean + D s_mean) z_mean^T, from the unrounded rows.
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    along_mean = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, E, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < E
        zn, tn = _normalized(z_rows + ks[None, :] * stride_ze, t_rows + ks[None, :] * stride_te,
                             row_ok[:, None] & k_ok[None, :], inv_nz, inv_nt)
        s = zn + tn
        d = zn - tn
        s_mean = tl.load(means + ks, mask=k_ok, other=0.0)
        d_mean = tl.load(means + E + ks, mask=k_ok, other=0.0)
        along_mean += tl.sum(s * d_mean[None, :] + d * s_mean[None, :], 1)
        m_mask = k_ok[:, None] & e_ok[None, :]
        acc = tl.dot(s.to(operand), tl.load(m_cols + ks[:, None] * E, mask=m_mask, other=0.0), acc,
                     input_precision=PRECISION)
        acc = tl.dot(d.to(operand), tl.load(m_cols + (E + ks)[:, None] * E, mask=m_mask, other=0.0), acc,
                     input_precision=PRECISION)
    z_mean_2n = (tl.load(means + es, mask=e_ok, other=0.0) + tl.load(means + E + es, mask=e_ok, other=0.0)) * N
    g = (acc / m_scale + along_mean[:, None] * z_mean_2n[None, :]) * scale
    _store_g_rows(G, S_PART, g, z_rows, inv_nz, b, rows, row_ok, row_start, es, e_ok, N, E, stride_ze, stride_gb,
                  stride_gn, BLOCK_E)


@triton.jit
def _finish_kernel(
    G,                        # (B, chunk_rows, E) fp32: g rows of this chunk
    Z,                        # (B, N, E) input, any strides
    NZ,                       # (B, N) fp32 clamped norms of z rows
    S_PART,                   # (B, n_s_parts, N) fp32 partials of <zn_i, g_i>
    OUT,                      # (B, N, E) contiguous, input gradient
    N, E, row_start, row_stop, n_s_parts,
    stride_gb, stride_gn, stride_zb, stride_zn, stride_ze,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, EPS: tl.constexpr,
):
    b, rows, row_ok, es, e_ok = _chunk_tile(E, row_start, row_stop, BLOCK_M, BLOCK_E)
    g = tl.load(G + b * stride_gb + (rows - row_start)[:, None] * stride_gn + es[None, :],
                mask=row_ok[:, None] & e_ok[None, :], other=0.0)
    s = _sum_row_partials(S_PART, b, rows, row_ok, N, n_s_parts)
    _store_input_gradient(OUT, g, s, Z, NZ, b, rows, row_ok, es, e_ok, N, E, stride_zb, stride_zn, stride_ze, EPS)


# ---------------------------------------------------------------------------------------------
# configurations and launchers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    """A tile GEMM configuration: BLOCK (output tile side), BLOCK_K (reduction step)."""

    block: int
    block_k: int
    num_warps: int
    num_stages: int


# Per operand size, from large to small: the first whose grid fills the GPU is taken, else the
# last. TILES: the direct form's kernels; fp32 keeps 64-wide tiles (128-wide ones spill, with or
# without TF32); the 16-bit 64-wide one takes BLOCK_K 32 (64 left an 8-byte stack at the 128
# registers triton 3.8 gives it on sm_80). GRAM_TILES: BLOCK features a side, a (2 BLOCK)^2 accumulator. GRAM_GRAD_TILES,
# per (operand size, z's size): z and t both feed each step, hence a shorter BLOCK_K, to stay in
# an A100's shared memory; with a fp32 z (the fused head) the 128-wide tile takes BLOCK_K 16 (32
# reaches 255 registers and a 16-32 byte stack on sm_80 with triton 3.6).
TILES = {2: (Tile(128, 64, 8, 3), Tile(64, 32, 4, 3)), 4: (Tile(64, 32, 4, 3),)}
GRAM_TILES = {2: (Tile(64, 32, 8, 3), Tile(32, 32, 4, 3)), 4: (Tile(32, 16, 4, 3),)}
GRAM_GRAD_TILES = {(2, 2): (Tile(128, 32, 8, 3), Tile(64, 32, 4, 3)),
                   (2, 4): (Tile(128, 16, 8, 3), Tile(64, 32, 4, 3)),
                   (4, 4): (Tile(32, 32, 4, 3),)}
# Streaming kernels (no tl.dot): one stage, no software pipelining (launchers and specs read these).
ROW_BLOCK = dict(BLOCK_ROWS=16, BLOCK_E=128, num_warps=4, num_stages=1)     # _row_stats_kernel
# ... with iREPA's affine target (T_AFFINE): over 4 warps the fp32 variant writing zn, S and D
# met a 128-register cap with an 8-byte stack on triton 3.7.1 sm_80; 8 warps halve each thread's tile.
AFFINE_ROW_BLOCK = dict(ROW_BLOCK, num_warps=8)


def row_block(t_affine: bool) -> dict:
    return AFFINE_ROW_BLOCK if t_affine else ROW_BLOCK

FINISH_BLOCK = dict(BLOCK_M=32, BLOCK_E=128, num_warps=4, num_stages=1)     # _finish_kernel
MEANS_BLOCK = dict(rows_per_part=512, BLOCK_ROWS=16, BLOCK_E=128, num_warps=4, num_stages=1)    # _column_means_kernel


def pick_tile(tiles: Tuple[Tile, ...], device: torch.device, programs) -> Tile:
    """The largest of `tiles` for which `programs(tile.block)` fills every multiprocessor, else the smallest."""
    return next((tile for tile in tiles if programs(tile.block) >= _num_sms(device)), tiles[-1])


def dot_precision(operand: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 tiles use TF32 only when torch's matmul precision allows it
    (DESIGN.md §5), as the projection's GEMMs do; 16-bit operands ignore it."""
    return "ieee" if operand_class(operand) == "ieee" else "tf32"


def row_chunks(tokens: int, max_rows: int, block: int) -> List[Tuple[int, int]]:
    """[start, stop) row ranges of at most `max_rows` rows, as few and as even as possible, in
    whole tiles where that fits."""
    max_rows = max(1, min(max_rows, tokens))
    rows = triton.cdiv(tokens, triton.cdiv(tokens, max_rows))
    if block < rows and triton.cdiv(rows, block) * block <= max_rows:
        rows = triton.cdiv(rows, block) * block
    return [(start, min(start + rows, tokens)) for start in range(0, tokens, rows)]


def _row_stats(z, t, t_affine, operand: torch.dtype, write_zn: bool, write_sum_diff: bool, write_align_grad: bool,
               write_target: bool):
    """Row norms and cosines; zn, the rows S = Zn + Tn and D = Zn - Tn (operand type), the
    alignment gradient and the target t' through `t_affine` (fp32) where asked (else None)."""
    batch, tokens, dim = z.shape
    nz, nt, cos = torch.empty((3, batch, tokens), device=z.device, dtype=torch.float32).unbind(0)
    zn = torch.empty((batch, tokens, dim), device=z.device, dtype=operand) if write_zn else None
    sum_rows, diff_rows = (torch.empty((2, batch, tokens, dim), device=z.device, dtype=operand).unbind(0)
                           if write_sum_diff else (None, None))
    ga = torch.empty_like(z, memory_format=torch.contiguous_format) if write_align_grad else None
    ta = torch.empty((batch, tokens, dim), device=z.device, dtype=torch.float32) if write_target else None
    block = row_block(t_affine is not None)
    grid = (triton.cdiv(tokens, block["BLOCK_ROWS"]), batch)
    _row_stats_kernel[grid](z, t, *_affine_rows(t_affine), nz, nt, cos, zn, sum_rows, diff_rows, ga, ta, tokens, dim,
                            -1.0 / (batch * tokens), *z.stride(), *t.stride(), EPS=EPS, WRITE_ZN=write_zn,
                            WRITE_SUM_DIFF=write_sum_diff, WRITE_ALIGN_GRAD=write_align_grad,
                            T_AFFINE=t_affine is not None, WRITE_TARGET=write_target, **block)
    return nz, nt, cos, zn, sum_rows, diff_rows, ga, ta


def _finish(g, z, nz, s_parts, grad_out, start: int, stop: int):
    """grad_out rows [start, stop) = the normalisation's backward of the chunk's g slab."""
    batch, tokens, dim = z.shape
    grid = (triton.cdiv(stop - start, FINISH_BLOCK["BLOCK_M"]) * triton.cdiv(dim, FINISH_BLOCK["BLOCK_E"]), batch)
    _finish_kernel[grid](g, z, nz, s_parts, grad_out, tokens, dim, start, stop, s_parts.shape[1], *g.stride()[:2],
                         *z.stride(), EPS=EPS, **FINISH_BLOCK)


def _direct_sum(z, nz, zn, sum_rows, diff_rows, operand: torch.dtype, grad_out):
    """Sum over (b, i, j) of D_ij^2 from the rows S and D; with `grad_out`, also writes the input
    gradient into it (through zn)."""
    batch, tokens, dim = z.shape
    with_grad = grad_out is not None
    tile = pick_tile(TILES[operand.itemsize], z.device,
                     lambda block: batch * triton.cdiv(tokens, block) ** 2 // (1 if with_grad else 2))
    n_tiles = triton.cdiv(tokens, tile.block)
    precision = dot_precision(operand)
    common = dict(BLOCK=tile.block, BLOCK_K=tile.block_k, PRECISION=precision, num_warps=tile.num_warps,
                  num_stages=tile.num_stages)
    if not with_grad:
        parts = torch.zeros((batch, n_tiles * n_tiles), device=z.device, dtype=torch.float32)
        _direct_tiles_kernel[(n_tiles * n_tiles, batch)](
            sum_rows, diff_rows, None, parts, tokens, dim, 0, tokens, 0, parts.shape[1], 0, 0, WITH_GRAD=False,
            **common)
        return parts.sum(dtype=torch.float64)

    # The D slab (rows x N) and the g slab (rows x E) hold fewer rows than N and at most
    # SCRATCH_ELEMENTS values each: never B x N x N.
    chunks = row_chunks(tokens, min(tokens - 1, SCRATCH_ELEMENTS // (batch * max(tokens, dim))), tile.block)
    rows = chunks[0][1] - chunks[0][0]
    slab = torch.empty((batch, rows, tokens), device=z.device, dtype=operand)
    programs = [triton.cdiv(stop - start, tile.block) * n_tiles for start, stop in chunks]
    parts = torch.empty((batch, sum(programs)), device=z.device, dtype=torch.float32)
    grad_tile = pick_tile(TILES[operand.itemsize], z.device,
                          lambda block: batch * triton.cdiv(rows, block) * triton.cdiv(dim, block))
    g = torch.empty((batch, rows, dim), device=z.device, dtype=torch.float32)
    s_parts = torch.empty((batch, triton.cdiv(dim, grad_tile.block), tokens), device=z.device, dtype=torch.float32)
    offset = 0
    for (start, stop), count in zip(chunks, programs):
        _direct_tiles_kernel[(count, batch)](
            sum_rows, diff_rows, slab, parts, tokens, dim, start, stop, offset, parts.shape[1], *slab.stride()[:2],
            WITH_GRAD=True, **common)
        grid = (triton.cdiv(stop - start, grad_tile.block) * triton.cdiv(dim, grad_tile.block), batch)
        _direct_grad_kernel[grid](
            slab, zn, z, nz, g, s_parts, tokens, dim, start, stop, 4.0 / (batch * tokens * tokens),
            *slab.stride()[:2], *z.stride(), *g.stride()[:2], BLOCK_M=grad_tile.block, BLOCK_E=grad_tile.block,
            BLOCK_K=grad_tile.block_k, PRECISION=precision, num_warps=grad_tile.num_warps,
            num_stages=grad_tile.num_stages)
        _finish(g, z, nz, s_parts, grad_out, start, stop)
        offset += count
    return parts.sum(dtype=torch.float64)


def gram_m_scale(tokens: int) -> float:
    """The power of two M - R is stored times: <= M_RANGE / N, so |entries| <= 4 M_RANGE."""
    return 2.0 ** math.floor(math.log2(M_RANGE / tokens))


def _column_means(z, t, nz, nt):
    """(B, 2, E) fp32: the column means of S = Zn + Tn and D = Zn - Tn, from the sums of parts of
    rows_per_part rows (a grid that grows with N), added in order."""
    batch, tokens, dim = z.shape
    rows_per_part = MEANS_BLOCK["rows_per_part"]
    n_parts = triton.cdiv(tokens, rows_per_part)
    parts = torch.empty((batch, n_parts, 2, dim), device=z.device, dtype=torch.float32)
    _column_means_kernel[(n_parts, triton.cdiv(dim, MEANS_BLOCK["BLOCK_E"]), batch)](
        z, t, nz, nt, parts, tokens, dim, rows_per_part, *z.stride(), *t.stride(), BLOCK_ROWS=MEANS_BLOCK["BLOCK_ROWS"],
        BLOCK_E=MEANS_BLOCK["BLOCK_E"], num_warps=MEANS_BLOCK["num_warps"],
        num_stages=MEANS_BLOCK["num_stages"])
    return parts.sum(1)


def _gram_sum(z, t, nz, nt, operand: torch.dtype, grad_out):
    """As `_direct_sum`, through the E x E blocks of S = Zn + Tn and D = Zn - Tn."""
    batch, tokens, dim = z.shape
    tile = pick_tile(GRAM_TILES[operand.itemsize], z.device, lambda block: batch * triton.cdiv(dim, block) ** 2 // 2)
    n_tiles = triton.cdiv(dim, tile.block)
    precision = dot_precision(operand)
    m_scale = gram_m_scale(tokens)
    means = _column_means(z, t, nz, nt)
    # M is written even without a gradient (2 E^2 per sample, small next to the inputs when
    # this form is picked): one compiled variant less.
    m = torch.empty((batch, 2 * dim, dim), device=z.device, dtype=operand)
    parts = torch.zeros((batch, n_tiles * n_tiles), device=z.device, dtype=torch.float32)
    _gram_kernel[(n_tiles * n_tiles, batch)](
        z, t, nz, nt, means, m, parts, tokens, dim, m_scale, *z.stride(), *t.stride(), BLOCK=tile.block,
        BLOCK_K=tile.block_k, PRECISION=precision, num_warps=tile.num_warps, num_stages=tile.num_stages)
    if grad_out is not None:
        max_rows = SCRATCH_ELEMENTS // (batch * dim)
        grad_tile = pick_tile(GRAM_GRAD_TILES[operand.itemsize, z.element_size()], z.device,
                              lambda block: batch * triton.cdiv(min(max_rows, tokens), block) * triton.cdiv(dim, block))
        n_e_tiles = triton.cdiv(dim, grad_tile.block)
        chunks = row_chunks(tokens, max_rows, grad_tile.block)
        g = torch.empty((batch, chunks[0][1] - chunks[0][0], dim), device=z.device, dtype=torch.float32)
        s_parts = torch.empty((batch, n_e_tiles, tokens), device=z.device, dtype=torch.float32)
        for start, stop in chunks:
            _gram_grad_kernel[(triton.cdiv(stop - start, grad_tile.block) * n_e_tiles, batch)](
                z, t, nz, nt, means, m, g, s_parts, tokens, dim, start, stop, m_scale, 1.0 / (batch * tokens * tokens),
                *z.stride(), *t.stride(), *g.stride()[:2], BLOCK_M=grad_tile.block, BLOCK_E=grad_tile.block,
                BLOCK_K=grad_tile.block_k, PRECISION=precision, num_warps=grad_tile.num_warps,
                num_stages=grad_tile.num_stages)
            _finish(g, z, nz, s_parts, grad_out, start, stop)
    return parts.sum(dtype=torch.float64)


def half_operands(activations: torch.dtype, target: torch.dtype) -> bool:
    """16-bit activations (the promoted dtype of the two is fp16 or bf16): fp16 operands."""
    return torch.promote_types(activations, target) in (torch.float16, torch.bfloat16)


def _check_dtypes(z: torch.Tensor, t: torch.Tensor):
    if torch.promote_types(z.dtype, t.dtype) not in ACTIVATION_DTYPES:
        raise TypeError(f"the triton backend computes in float32, float16 or bfloat16; got projected {z.dtype} and "
                        f"target {t.dtype} (use backend='torch' for float64)")


def _losses_and_grads(z, t, with_grad: bool, with_align: bool, half: bool, t_affine=None):
    """One row pass (norms computed once, shared by both losses), then the cheaper form.
    `half` (16-bit activations: t 16-bit, z 16-bit or the fused head's fp32 projection): fp16
    operands, raw inputs read in their own dtype; else (or with a fp32 t) everything in fp32.
    `t_affine` (or None): the target is t' = (t - shift) * scale, formed by the row pass. The
    Gram form's kernels read the target as it is, so there the row pass writes t' for them, and
    in fp32: everything runs in fp32 then (a 16-bit t' rounds away the variation of a target whose
    mean is far above its std). Returns (alignment loss, manifold loss, alignment gradient,
    manifold gradient); the alignment loss is None without `with_align`, the gradients are empty
    tensors where not asked for, else in z's dtype."""
    _check_dtypes(z, t)
    z_dtype = z.dtype
    batch, tokens, dim = z.shape
    gram = use_gram_form(tokens, dim)
    half = half and t.dtype != torch.float32 and not (gram and t_affine is not None)
    if not half:
        z, t = z.float(), t.float()
    operand = torch.float16 if half else torch.float32
    nz, nt, cos, zn, sum_rows, diff_rows, align_grad, t_written = _row_stats(
        z, t, t_affine, operand, write_zn=not gram and with_grad, write_sum_diff=not gram,
        write_align_grad=with_grad and with_align, write_target=gram and t_affine is not None)
    grad = torch.empty_like(z, memory_format=torch.contiguous_format) if with_grad else None
    if gram:
        total = _gram_sum(z, t if t_written is None else t_written, nz, nt, operand, grad)
    else:
        total = _direct_sum(z, nz, zn, sum_rows, diff_rows, operand, grad)
    align = (-cos.sum(dtype=torch.float64) / (batch * tokens)).float() if with_align else None
    as_input = lambda g: z.new_empty((0,), dtype=z_dtype) if g is None else g.to(z_dtype)
    return align, (total / (batch * tokens * tokens)).float(), as_input(align_grad), as_input(grad)


# ---------------------------------------------------------------------------------------------
# torch.library ops: the gradients are made in the forward pass, backward scales them
# ---------------------------------------------------------------------------------------------

def _grad_shape(z: torch.Tensor, with_grad: bool) -> torch.Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format) if with_grad else z.new_empty((0,))


@torch.library.custom_op("repa_fast::triton_manifold_loss", mutates_args=())
def _manifold_op(z: torch.Tensor, t: torch.Tensor, with_grad: bool, half: bool,
                 t_affine: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    _, manifold, _, grad = _losses_and_grads(z, t, with_grad, with_align=False, half=half, t_affine=t_affine)
    return manifold, grad


@_manifold_op.register_fake
def _(z, t, with_grad, half, t_affine=None):
    return z.new_empty((), dtype=torch.float32), _grad_shape(z, with_grad)


def _save_grads(ctx, inputs, output):
    ctx.save_for_backward(*output[len(output) // 2:])


def _manifold_backward(ctx, grad_loss, _):
    (grad,) = ctx.saved_tensors
    return grad * grad_loss, None, None, None, None


_manifold_op.register_autograd(_manifold_backward, setup_context=_save_grads)


@torch.library.custom_op("repa_fast::triton_urepa_losses", mutates_args=())
def _urepa_op(z: torch.Tensor, t: torch.Tensor, with_grad: bool, half: bool) \
        -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _losses_and_grads(z, t, with_grad, with_align=True, half=half)


@_urepa_op.register_fake
def _(z, t, with_grad, half):
    loss = z.new_empty((), dtype=torch.float32)
    return loss, loss.clone(), _grad_shape(z, with_grad), _grad_shape(z, with_grad)


def _urepa_backward(ctx, grad_align, grad_manifold, _, __):
    align_grad, manifold_grad = ctx.saved_tensors
    return align_grad * grad_align + manifold_grad * grad_manifold, None, None, None


_urepa_op.register_autograd(_urepa_backward, setup_context=_save_grads)


# ---------------------------------------------------------------------------------------------
# public functions (the triton backend's interface, see repa_fast/backends.py)
# ---------------------------------------------------------------------------------------------

def _wants_grad(z: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and z.requires_grad


def manifold_loss(projected: torch.Tensor, target: torch.Tensor,
                  t_affine: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean over (b, i, j) of (<zn_bi, zn_bj> - <tn_bi, tn_bj>)^2 for (B, N, E) inputs; fp32.
    With `t_affine` ((2, B, E) shift, scale: zscore.target_zscore), of t' = (t - shift) * scale."""
    half = half_operands(projected.dtype, target.dtype)
    return _manifold_op(projected, target, _wants_grad(projected), half, t_affine)[0]


def urepa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps):
    """(cosine alignment loss, manifold loss) of one projection, normalised once; ln_weight =
    ln_bias = None: no LayerNorm (the mlp head's last Linear, `aligned_projection`). The projection
    comes back in fp32 and stays so (its gradient is far below fp16's range); with 16-bit
    activations both losses use fp16 tensor-core operands formed from it."""
    z, t = aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps)
    align, manifold, _, _ = _urepa_op(z, t, _wants_grad(z), half_operands(hidden.dtype, t.dtype))
    return align, manifold


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (tests/aot_compile.py): every configuration the launchers pick
# ---------------------------------------------------------------------------------------------

# (z, t) dtypes as the launchers pass them: fp32 throughout, one 16-bit dtype (manifold_loss),
# or the fused head's fp32 projection with a 16-bit target. The operand type follows t.
INPUT_DTYPES = ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                (torch.float32, torch.float16), (torch.float32, torch.bfloat16))
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FLOAT_SCALARS = {"align_scale", "scale", "m_scale"}
_SIZES = {"N", "E"}
# Pointer arguments by what they hold: z's dtype, t's, the operand type; any other is fp32.
_POINTER_ROLES = {"Z": "z", "GA": "z", "OUT": "z", "T": "t", "ZN": "operand", "SUM": "operand", "DIFF": "operand",
                  "D": "operand", "M": "operand"}
# (WRITE_ZN, WRITE_SUM_DIFF) as _losses_and_grads asks: Gram form; direct form, without and with gradient.
_ROW_PASS_WRITES = ((False, False), (False, True), (True, True))


def _spec(name, fn, dtypes, constexprs, num_warps, num_stages, tensor_cores):
    """Signature from the kernel's argument names: upper case = pointer (typed by its role in
    `dtypes`, a dict z/t/operand -> dtype, else fp32) except the sizes N, E; the rest i32 or fp32
    scalars. Feature strides are 1, as the JIT specialises them for contiguous rows."""
    constexprs = dict(constexprs, **{arg: 1 for arg in fn.arg_names if arg.startswith("stride_") and arg.endswith("e")})
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.isupper() and arg not in _SIZES:
            signature[arg] = "*" + _TRITON_DTYPES[dtypes.get(_POINTER_ROLES.get(arg), torch.float32)]
        else:
            signature[arg] = "fp32" if arg in _FLOAT_SCALARS else "i32"
    # What the JIT knows of aligned contiguous inputs with E % 16 == 0: 16-divisible pointers,
    # row strides and E (without it loads are not vectorised and not pipelined).
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
             if signature[arg] != "constexpr" and (signature[arg].startswith("*") or arg.startswith("stride_") or arg == "E")}
    types = ",".join(f"{role}={_TRITON_DTYPES[dtype]}" for role, dtype in dtypes.items())
    label = ",".join(f"{k}={v}" for k, v in constexprs.items() if k != "EPS" and not k.startswith("stride_"))
    return {"name": f"{name}[{types},{label}]", "fn": fn, "signature": signature,
            "constexprs": constexprs, "attrs": attrs, "num_warps": num_warps, "num_stages": num_stages,
            "tensor_cores": tensor_cores}


def aot_specs() -> List[dict]:
    specs = []
    for z_dtype, t_dtype in INPUT_DTYPES:
        operand = operand_dtype(t_dtype)
        dtypes = dict(z=z_dtype, t=t_dtype, operand=operand)
        for write_zn, write_sum_diff in _ROW_PASS_WRITES:
            # manifold_loss with iREPA's target z-score; the Gram form's row pass then also
            # writes t', and runs in fp32 (_losses_and_grads)
            for t_affine in (False, True) if write_sum_diff or operand == torch.float32 else (False,):
                block = row_block(t_affine)
                for write_align_grad in (False, True):
                    specs.append(_spec("manifold_row_stats", _row_stats_kernel, dtypes,
                                       dict(BLOCK_ROWS=block["BLOCK_ROWS"], BLOCK_E=block["BLOCK_E"], EPS=EPS,
                                            WRITE_ZN=write_zn, WRITE_SUM_DIFF=write_sum_diff,
                                            WRITE_ALIGN_GRAD=write_align_grad, T_AFFINE=t_affine,
                                            WRITE_TARGET=t_affine and not write_sum_diff),
                                       block["num_warps"], block["num_stages"], False))
        specs.append(_spec("manifold_column_means", _column_means_kernel, dtypes,
                           dict(BLOCK_ROWS=MEANS_BLOCK["BLOCK_ROWS"], BLOCK_E=MEANS_BLOCK["BLOCK_E"]),
                           MEANS_BLOCK["num_warps"], MEANS_BLOCK["num_stages"], False))
        specs.append(_spec("manifold_finish", _finish_kernel, dict(z=z_dtype),
                           dict(BLOCK_M=FINISH_BLOCK["BLOCK_M"], BLOCK_E=FINISH_BLOCK["BLOCK_E"], EPS=EPS),
                           FINISH_BLOCK["num_warps"], FINISH_BLOCK["num_stages"], False))
        for precision in (("ieee", "tf32") if operand == torch.float32 else ("tf32",)):
            tensor_cores = precision != "ieee"
            for tile in TILES[operand.itemsize]:
                gemm = dict(BLOCK_K=tile.block_k, PRECISION=precision)
                for with_grad in (False, True):
                    specs.append(_spec("manifold_direct_tiles", _direct_tiles_kernel, dict(operand=operand),
                                       dict(BLOCK=tile.block, WITH_GRAD=with_grad, **gemm),
                                       tile.num_warps, tile.num_stages, tensor_cores))
                specs.append(_spec("manifold_direct_grad", _direct_grad_kernel, dict(z=z_dtype, operand=operand),
                                   dict(BLOCK_M=tile.block, BLOCK_E=tile.block, **gemm),
                                   tile.num_warps, tile.num_stages, tensor_cores))
            for tile in GRAM_TILES[operand.itemsize]:
                specs.append(_spec("manifold_gram", _gram_kernel, dtypes,
                                   dict(BLOCK=tile.block, BLOCK_K=tile.block_k, PRECISION=precision),
                                   tile.num_warps, tile.num_stages, tensor_cores))
            for tile in GRAM_GRAD_TILES[operand.itemsize, z_dtype.itemsize]:
                specs.append(_spec("manifold_gram_grad", _gram_grad_kernel, dtypes,
                                   dict(BLOCK_M=tile.block, BLOCK_E=tile.block, BLOCK_K=tile.block_k,
                                        PRECISION=precision),
                                   tile.num_warps, tile.num_stages, tensor_cores))
    # Kernels that do not read both inputs repeat across INPUT_DTYPES: one spec per name.
    return list({spec["name"]: spec for spec in specs}.values())
