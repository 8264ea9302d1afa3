"""U-REPA manifold loss (DESIGN.md §1) in Triton, and the fused U-REPA head.

    L = mean over (b, i, j) of (<zn_bi, zn_bj> - <tn_bi, tn_bj>)^2,   zn = F.normalize(z), tn = F.normalize(t)

Nothing of size B x N x N is ever allocated. Two forms, the cheaper picked per call with
`repa_fast.reference.use_gram_form`:

* direct (N up to ~5E/3): per sample, tiles D_IJ = Zn_I Zn_J^T - Tn_I Tn_J^T built in registers
  from the raw inputs (the T product accumulates onto the rescaled Z product, one tile), the row
  norms applied in the epilogue; squared and reduced. Without a gradient only tiles J >= I run,
  off-diagonal ones counted twice. With a gradient every tile of a chunk of rows runs, stores
  D in the compute dtype into a scratch of (B, rows, N), rows < N and at most SCRATCH_ELEMENTS
  in all (a bounded slab, never B x N x N), and the per-row sums s_i = sum_j D_ij <zn_i, zn_j>; a second GEMM D @ Zn then gives
  g = (4 / (B N^2)) D Zn and, in its epilogue, the gradient through the normalisation
  dz = (g - zn <zn, g>) / ||z||, written in the input dtype.
* Gram (N well above E): ||Zn^T Zn||^2 - 2 ||Tn^T Zn||^2 + ||Tn^T Tn||^2 from E x E tile GEMMs with
  fp32 accumulation (symmetric products only on tiles J >= I); Zn^T Zn / N and -Tn^T Zn / N are
  kept as M = [A; -C^T] (B, 2E, E) and g = (4 / (B N)) [Zn | Tn] M is one GEMM over K = 2E whose
  row scales go to the epilogue. g (fp32) goes through a row-chunk scratch, then a row pass
  applies the normalisation's backward.

The loss ends the graph, so the gradient is computed in the forward pass and backward only
scales it. Row norms are computed once (one row pass that also yields the cosine alignment term
of U-REPA and, when asked, its gradient). Every reduction goes through per-program partials
summed in a fixed order: the same inputs give bitwise the same loss and gradients.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from repa_fast.reference import use_gram_form

from .projection import aligned_projection


EPS = 1e-12                    # F.normalize's eps
SCRATCH_ELEMENTS = 2 ** 24     # bound of the D slab (direct form) and of the g slab (Gram form)


# ---------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_stats_kernel(
    Z, T,                     # (B, N, E) inputs, any strides
    NZ, NT, COS,              # (B, N) fp32 out: max(||z||, eps), max(||t||, eps), <zn, tn>
    ZN,                       # (B, N, E) out, compute dtype: zn (WRITE_ZN)
    GA,                       # (B, N, E) out, compute dtype: d(-mean cos)/dz (WRITE_ALIGN_GRAD)
    N, E, align_scale,        # align_scale = -1 / (B N)
    stride_zb, stride_zn, stride_ze, stride_tb, stride_tn, stride_te,
    BLOCK_ROWS: tl.constexpr, BLOCK_E: tl.constexpr, EPS: tl.constexpr,
    WRITE_ZN: tl.constexpr, WRITE_ALIGN_GRAD: tl.constexpr,
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
        t = tl.load(t_rows + es[None, :] * stride_te, mask=mask, other=0.0).to(tl.float32)
        zz += tl.sum(z * z, 1)
        tt += tl.sum(t * t, 1)
        zt += tl.sum(z * t, 1)
    nz = tl.maximum(tl.sqrt(zz), EPS)
    nt = tl.maximum(tl.sqrt(tt), EPS)
    cos = zt / nz / nt
    tl.store(NZ + b * N + rows, nz, mask=row_ok)
    tl.store(NT + b * N + rows, nt, mask=row_ok)
    tl.store(COS + b * N + rows, cos, mask=row_ok)
    if WRITE_ZN or WRITE_ALIGN_GRAD:
        out_rows = b * N * E + rows[:, None] * E
        # F.normalize's backward: the radial part only flows where the norm was not clamped.
        radial_cos = tl.where(nz > EPS, cos, 0.0)
        for e0 in range(0, E, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            mask = row_ok[:, None] & (es < E)[None, :]
            zn = tl.load(z_rows + es[None, :] * stride_ze, mask=mask, other=0.0).to(tl.float32) / nz[:, None]
            if WRITE_ZN:
                tl.store(ZN + out_rows + es[None, :], zn.to(ZN.dtype.element_ty), mask=mask)
            if WRITE_ALIGN_GRAD:
                tn = tl.load(t_rows + es[None, :] * stride_te, mask=mask, other=0.0).to(tl.float32) / nt[:, None]
                ga = (tn - zn * radial_cos[:, None]) * (align_scale / nz)[:, None]
                tl.store(GA + out_rows + es[None, :], ga.to(GA.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_pair_products(acc, X, stride_n, stride_e, rows, row_ok, cols, col_ok, E,
                              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + X[rows] @ X[cols]^T over the E features (X already offset to its sample)."""
    for k0 in range(0, E, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = (ks < E)[None, :]
        xi = tl.load(X + rows[:, None] * stride_n + ks[None, :] * stride_e, mask=row_ok[:, None] & k_ok, other=0.0)
        xj = tl.load(X + cols[:, None] * stride_n + ks[None, :] * stride_e, mask=col_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(xi, tl.trans(xj), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _direct_tiles_kernel(
    Z, T,                     # (B, N, E) inputs, any strides
    NZ, NT,                   # (B, N) fp32 clamped row norms
    D,                        # (B, chunk_rows, N) compute dtype scratch: D tiles of this row chunk (WITH_GRAD)
    S_PART,                   # (B, n_col_tiles, N) fp32: per column tile, sum_j D_ij <zn_i, zn_j> (WITH_GRAD)
    LOSS_PART,                # (B, n_loss_parts) fp32: one weighted sum of D^2 per program
    N, E, row_start, row_stop, loss_offset, n_loss_parts,
    stride_zb, stride_zn, stride_ze, stride_tb, stride_tn, stride_te, stride_db, stride_dn,
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
    nz_i = tl.load(NZ + b * N + rows, mask=row_ok, other=1.0)
    nz_j = tl.load(NZ + b * N + cols, mask=col_ok, other=1.0)
    nt_i = tl.load(NT + b * N + rows, mask=row_ok, other=1.0)
    nt_j = tl.load(NT + b * N + cols, mask=col_ok, other=1.0)

    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    acc = _accumulate_pair_products(acc, Z + b * stride_zb, stride_zn, stride_ze, rows, row_ok, cols, col_ok, E,
                                    BLOCK_K, PRECISION)
    szz = acc / (nz_i[:, None] * nz_j[None, :])                      # <zn_i, zn_j>
    # One tile for both products: rescale the Z product into T's raw scale, accumulate T T^T onto
    # it, rescale back: D = Szz - Stt.
    acc = -szz * (nt_i[:, None] * nt_j[None, :])
    acc = _accumulate_pair_products(acc, T + b * stride_tb, stride_tn, stride_te, rows, row_ok, cols, col_ok, E,
                                    BLOCK_K, PRECISION)
    d = -acc / (nt_i[:, None] * nt_j[None, :])

    weight = 1.0
    if not WITH_GRAD:
        weight = tl.where(tile_j > tile_i, 2.0, 1.0)
    tl.store(LOSS_PART + b * n_loss_parts + loss_offset + pid, tl.sum(tl.sum(d * d, 1), 0) * weight)
    if WITH_GRAD:
        tl.store(S_PART + (b * n_col_tiles + tile_j) * N + rows, tl.sum(d * szz, 1), mask=row_ok)
        d_ptrs = D + b * stride_db + (rows - row_start)[:, None] * stride_dn + cols[None, :]
        tl.store(d_ptrs, d.to(D.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


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
    D,                        # (B, chunk_rows, N) compute dtype: D rows of this chunk
    ZN,                       # (B, N, E) compute dtype, contiguous: zn
    Z,                        # (B, N, E) input, any strides
    NZ,                       # (B, N) fp32 clamped norms of z rows
    S_PART,                   # (B, n_s_parts, N) fp32 partials of sum_j D_ij <zn_i, zn_j>
    OUT,                      # (B, N, E) contiguous, input gradient
    N, E, row_start, row_stop, n_s_parts, scale,     # scale = 4 / (B N^2)
    stride_db, stride_dn, stride_zb, stride_zn, stride_ze,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    EPS: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    n_e_tiles = tl.cdiv(E, BLOCK_E)
    rows = row_start + (pid // n_e_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    es = (pid % n_e_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < row_stop
    e_ok = es < E
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    acc = _accumulate_rows_times(acc, D + b * stride_db + (rows - row_start)[:, None] * stride_dn, 1, row_ok,
                                 ZN + b * N * E + es[None, :], E, e_ok, N, BLOCK_K, PRECISION)
    s = _sum_row_partials(S_PART, b, rows, row_ok, N, n_s_parts)
    _store_input_gradient(OUT, acc * scale, s * scale, Z, NZ, b, rows, row_ok, es, e_ok, N, E,
                          stride_zb, stride_zn, stride_ze, EPS)


@triton.jit
def _gram_kernel(
    X, Y,                     # (B, N, E) inputs, any strides: the product is Xn^T Yn (E x E)
    NX, NY,                   # (B, N) fp32 clamped row norms of X and Y
    M,                        # (B, 2E, E) compute dtype: rows m_row_start.. get m_scale * Xn^T Yn (STORE)
    LOSS_PART,                # (B, n_loss_parts) fp32: loss_weight * sum of squares, one per program
    N, E, loss_offset, n_loss_parts, m_row_start, m_scale, loss_weight,
    stride_xb, stride_xn, stride_xe, stride_yb, stride_yn, stride_ye,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, SYMMETRIC: tl.constexpr, STORE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(E, BLOCK)
    tile_a = pid // n_tiles
    tile_b = pid % n_tiles
    if SYMMETRIC:
        if tile_b < tile_a:
            return
    ea = tile_a * BLOCK + tl.arange(0, BLOCK)
    eb = tile_b * BLOCK + tl.arange(0, BLOCK)
    ea_ok = ea < E
    eb_ok = eb < E
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        # Both row normalisations folded into the X operand: x_k / (||x_k|| ||y_k||).
        w = 1.0 / (tl.load(NX + b * N + ks, mask=k_ok, other=1.0) * tl.load(NY + b * N + ks, mask=k_ok, other=1.0))
        x = tl.load(X + b * stride_xb + ks[:, None] * stride_xn + ea[None, :] * stride_xe,
                    mask=k_ok[:, None] & ea_ok[None, :], other=0.0)
        y = tl.load(Y + b * stride_yb + ks[:, None] * stride_yn + eb[None, :] * stride_ye,
                    mask=k_ok[:, None] & eb_ok[None, :], other=0.0)
        xw = (x.to(tl.float32) * w[:, None]).to(y.dtype)
        acc = tl.dot(tl.trans(xw), y, acc, input_precision=PRECISION)
    weight = loss_weight
    if SYMMETRIC:
        weight = tl.where(tile_b > tile_a, 2.0 * loss_weight, loss_weight)
    tl.store(LOSS_PART + b * n_loss_parts + loss_offset + pid, tl.sum(tl.sum(acc * acc, 1), 0) * weight)
    if STORE:
        m = (acc * m_scale).to(M.dtype.element_ty)
        m_sample = M + b * 2 * E * E + m_row_start * E
        mask = ea_ok[:, None] & eb_ok[None, :]
        tl.store(m_sample + ea[:, None] * E + eb[None, :], m, mask=mask)
        if SYMMETRIC:
            if tile_b > tile_a:
                tl.store(m_sample + eb[None, :] * E + ea[:, None], m, mask=mask)


@triton.jit
def _gram_grad_kernel(
    Z, T,                     # (B, N, E) inputs, any strides
    NZ, NT,                   # (B, N) fp32 clamped row norms
    M,                        # (B, 2E, E) compute dtype: [Zn^T Zn / N; -Tn^T Zn / N]
    G,                        # (B, chunk_rows, E) fp32 out: g rows of this chunk
    S_PART,                   # (B, n_e_tiles, N) fp32 out: per feature tile, <zn_i, g_i>
    N, E, row_start, row_stop, scale,               # scale = 4 / (B N)
    stride_zb, stride_zn, stride_ze, stride_tb, stride_tn, stride_te, stride_gb, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    n_e_tiles = tl.cdiv(E, BLOCK_E)
    tile_e = pid % n_e_tiles
    rows = row_start + (pid // n_e_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    es = tile_e * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < row_stop
    e_ok = es < E
    nz = tl.load(NZ + b * N + rows, mask=row_ok, other=1.0)
    nt = tl.load(NT + b * N + rows, mask=row_ok, other=1.0)
    m_cols = M + b * 2 * E * E + es[None, :]
    # g = [Zn | Tn] M over K = 2E; the row scales 1/||z||, 1/||t|| act on the accumulator: the
    # Z half is brought to T's scale before the T half accumulates onto it.
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    acc = _accumulate_rows_times(acc, Z + b * stride_zb + rows[:, None] * stride_zn, stride_ze, row_ok,
                                 m_cols, E, e_ok, E, BLOCK_K, PRECISION)
    acc = acc * (nt / nz)[:, None]
    acc = _accumulate_rows_times(acc, T + b * stride_tb + rows[:, None] * stride_tn, stride_te, row_ok,
                                 m_cols + E * E, E, e_ok, E, BLOCK_K, PRECISION)
    g = acc * (scale / nt)[:, None]
    mask = row_ok[:, None] & e_ok[None, :]
    z = tl.load(Z + b * stride_zb + rows[:, None] * stride_zn + es[None, :] * stride_ze, mask=mask, other=0.0)
    tl.store(S_PART + (b * n_e_tiles + tile_e) * N + rows, tl.sum(z.to(tl.float32) * g, 1) / nz, mask=row_ok)
    tl.store(G + b * stride_gb + (rows - row_start)[:, None] * stride_gn + es[None, :], g, mask=mask)


@triton.jit
def _gram_finish_kernel(
    G,                        # (B, chunk_rows, E) fp32: g rows of this chunk
    Z,                        # (B, N, E) input, any strides
    NZ,                       # (B, N) fp32 clamped norms of z rows
    S_PART,                   # (B, n_s_parts, N) fp32 partials of <zn_i, g_i>
    OUT,                      # (B, N, E) contiguous, input gradient
    N, E, row_start, row_stop, n_s_parts,
    stride_gb, stride_gn, stride_zb, stride_zn, stride_ze,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, EPS: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    n_e_tiles = tl.cdiv(E, BLOCK_E)
    rows = row_start + (pid // n_e_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    es = (pid % n_e_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < row_stop
    e_ok = es < E
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


# Per element size, from large to small: the first whose grid fills the GPU is taken, else the
# last. fp32 keeps 64-wide tiles (128-wide ones spill, with or without TF32).
TILES = {2: (Tile(128, 64, 8, 3), Tile(64, 64, 4, 3)), 4: (Tile(64, 32, 4, 3),)}
ROW_BLOCK = dict(BLOCK_ROWS=16, BLOCK_E=128, num_warps=4)     # _row_stats_kernel
FINISH_BLOCK = dict(BLOCK_M=32, BLOCK_E=128, num_warps=4)     # _gram_finish_kernel
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def pick_tile(dtype: torch.dtype, device: torch.device, programs) -> Tile:
    """The largest tile for which `programs(tile.block)` fills every multiprocessor, else the smallest."""
    tiles = TILES[dtype.itemsize]
    return next((tile for tile in tiles if programs(tile.block) >= _multiprocessors(device)), tiles[-1])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 tiles use TF32 only when torch's matmul precision allows it (DESIGN.md §5)."""
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def row_chunks(tokens: int, max_rows: int, block: int) -> List[Tuple[int, int]]:
    """[start, stop) row ranges of at most `max_rows` rows, as few and as even as possible, in
    whole tiles where that fits."""
    max_rows = max(1, min(max_rows, tokens))
    rows = triton.cdiv(tokens, triton.cdiv(tokens, max_rows))
    if block < rows and triton.cdiv(rows, block) * block <= max_rows:
        rows = triton.cdiv(rows, block) * block
    return [(start, min(start + rows, tokens)) for start in range(0, tokens, rows)]


def _row_stats(z, t, write_zn: bool, write_align_grad: bool):
    batch, tokens, dim = z.shape
    nz, nt, cos = torch.empty((3, batch, tokens), device=z.device, dtype=torch.float32).unbind(0)
    zn = torch.empty_like(z, memory_format=torch.contiguous_format) if write_zn else None
    ga = torch.empty_like(z, memory_format=torch.contiguous_format) if write_align_grad else None
    grid = (triton.cdiv(tokens, ROW_BLOCK["BLOCK_ROWS"]), batch)
    _row_stats_kernel[grid](z, t, nz, nt, cos, zn, ga, tokens, dim, -1.0 / (batch * tokens), *z.stride(), *t.stride(),
                            EPS=EPS, WRITE_ZN=write_zn, WRITE_ALIGN_GRAD=write_align_grad, **ROW_BLOCK)
    return nz, nt, cos, zn, ga


def _direct_sum(z, t, nz, nt, zn, grad_out):
    """Sum over (b, i, j) of D_ij^2; with `grad_out`, also writes the input gradient into it."""
    batch, tokens, dim = z.shape
    with_grad = grad_out is not None
    tile = pick_tile(z.dtype, z.device, lambda block: batch * triton.cdiv(tokens, block) ** 2 // (1 if with_grad else 2))
    n_tiles = triton.cdiv(tokens, tile.block)
    precision = dot_precision(z.dtype)
    common = dict(BLOCK=tile.block, BLOCK_K=tile.block_k, PRECISION=precision, num_warps=tile.num_warps,
                  num_stages=tile.num_stages)
    if not with_grad:
        parts = torch.zeros((batch, n_tiles * n_tiles), device=z.device, dtype=torch.float32)
        _direct_tiles_kernel[(n_tiles * n_tiles, batch)](
            z, t, nz, nt, None, None, parts, tokens, dim, 0, tokens, 0, parts.shape[1], *z.stride(), *t.stride(), 0, 0,
            WITH_GRAD=False, **common)
        return parts.sum(dtype=torch.float64)

    # The D slab holds fewer rows than N (and at most SCRATCH_ELEMENTS): never B x N x N.
    chunks = row_chunks(tokens, min(tokens - 1, SCRATCH_ELEMENTS // (batch * tokens)), tile.block)
    rows = chunks[0][1] - chunks[0][0]
    slab = torch.empty((batch, rows, tokens), device=z.device, dtype=z.dtype)
    s_parts = torch.empty((batch, n_tiles, tokens), device=z.device, dtype=torch.float32)
    programs = [triton.cdiv(stop - start, tile.block) * n_tiles for start, stop in chunks]
    parts = torch.empty((batch, sum(programs)), device=z.device, dtype=torch.float32)
    grad_tile = pick_tile(z.dtype, z.device, lambda block: batch * triton.cdiv(rows, block) * triton.cdiv(dim, block))
    offset = 0
    for (start, stop), count in zip(chunks, programs):
        _direct_tiles_kernel[(count, batch)](
            z, t, nz, nt, slab, s_parts, parts, tokens, dim, start, stop, offset, parts.shape[1],
            *z.stride(), *t.stride(), *slab.stride()[:2], WITH_GRAD=True, **common)
        grid = (triton.cdiv(stop - start, grad_tile.block) * triton.cdiv(dim, grad_tile.block), batch)
        _direct_grad_kernel[grid](
            slab, zn, z, nz, s_parts, grad_out, tokens, dim, start, stop, n_tiles, 4.0 / (batch * tokens * tokens),
            *slab.stride()[:2], *z.stride(), BLOCK_M=grad_tile.block, BLOCK_E=grad_tile.block,
            BLOCK_K=grad_tile.block_k, PRECISION=precision, EPS=EPS, num_warps=grad_tile.num_warps,
            num_stages=grad_tile.num_stages)
        offset += count
    return parts.sum(dtype=torch.float64)


# The Gram form's three products Xn^T Yn: (X, Y, symmetric, loss weight, half of M receiving
# sign * product / N or None). M = [Zn^T Zn; -Tn^T Zn] / N is stored even without a gradient
# (2 E^2 per sample, small next to the inputs when this form is picked): one compiled variant less.
GRAM_PRODUCTS = (("z", "z", True, 1.0, 0, 1.0), ("t", "z", False, -2.0, 1, -1.0), ("t", "t", True, 1.0, None, 1.0))


def _gram_sum(z, t, nz, nt, grad_out):
    """As `_direct_sum`, through the E x E products."""
    batch, tokens, dim = z.shape
    with_grad = grad_out is not None
    tile = pick_tile(z.dtype, z.device, lambda block: batch * triton.cdiv(dim, block) ** 2)
    n_tiles = triton.cdiv(dim, tile.block)
    precision = dot_precision(z.dtype)
    inputs = {"z": (z, nz), "t": (t, nt)}
    m = torch.empty((batch, 2 * dim, dim), device=z.device, dtype=z.dtype)
    parts = torch.zeros((batch, len(GRAM_PRODUCTS) * n_tiles * n_tiles), device=z.device, dtype=torch.float32)
    for index, (x_name, y_name, symmetric, weight, m_half, sign) in enumerate(GRAM_PRODUCTS):
        (x, n_x), (y, n_y) = inputs[x_name], inputs[y_name]
        store = m_half is not None
        _gram_kernel[(n_tiles * n_tiles, batch)](
            x, y, n_x, n_y, m if store else None, parts, tokens, dim, index * n_tiles * n_tiles, parts.shape[1],
            (m_half or 0) * dim, sign / tokens, weight, *x.stride(), *y.stride(),
            BLOCK=tile.block, BLOCK_K=tile.block_k, SYMMETRIC=symmetric, STORE=store, PRECISION=precision,
            num_warps=tile.num_warps, num_stages=tile.num_stages)
    if with_grad:
        max_rows = SCRATCH_ELEMENTS // (batch * dim)
        grad_tile = pick_tile(z.dtype, z.device,
                              lambda block: batch * triton.cdiv(min(max_rows, tokens), block) * triton.cdiv(dim, block))
        n_e_tiles = triton.cdiv(dim, grad_tile.block)
        chunks = row_chunks(tokens, max_rows, grad_tile.block)
        g = torch.empty((batch, chunks[0][1] - chunks[0][0], dim), device=z.device, dtype=torch.float32)
        s_parts = torch.empty((batch, n_e_tiles, tokens), device=z.device, dtype=torch.float32)
        for start, stop in chunks:
            _gram_grad_kernel[(triton.cdiv(stop - start, grad_tile.block) * n_e_tiles, batch)](
                z, t, nz, nt, m, g, s_parts, tokens, dim, start, stop, 4.0 / (batch * tokens),
                *z.stride(), *t.stride(), *g.stride()[:2], BLOCK_M=grad_tile.block, BLOCK_E=grad_tile.block,
                BLOCK_K=grad_tile.block_k, PRECISION=precision, num_warps=grad_tile.num_warps,
                num_stages=grad_tile.num_stages)
            grid = (triton.cdiv(stop - start, FINISH_BLOCK["BLOCK_M"]) * triton.cdiv(dim, FINISH_BLOCK["BLOCK_E"]), batch)
            _gram_finish_kernel[grid](g, z, nz, s_parts, grad_out, tokens, dim, start, stop, n_e_tiles,
                                      *g.stride()[:2], *z.stride(), EPS=EPS, **FINISH_BLOCK)
    return parts.sum(dtype=torch.float64)


def _check_dtypes(z: torch.Tensor, t: torch.Tensor) -> torch.dtype:
    dtype = torch.promote_types(z.dtype, t.dtype)
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"the triton backend computes in float32, float16 or bfloat16; got projected {z.dtype} and "
                        f"target {t.dtype} (use backend='torch' for float64)")
    return dtype


def _losses_and_grads(z, t, with_grad: bool, with_align: bool):
    """One row pass (norms computed once, shared by both losses), then the cheaper form.
    Returns (alignment loss, manifold loss, alignment gradient, manifold gradient); the gradients
    are empty tensors where not asked for."""
    dtype = _check_dtypes(z, t)
    z_dtype = z.dtype
    z, t = z.to(dtype), t.to(dtype)
    batch, tokens, dim = z.shape
    gram = use_gram_form(tokens, dim)
    nz, nt, cos, zn, align_grad = _row_stats(z, t, write_zn=with_grad and not gram,
                                             write_align_grad=with_grad and with_align)
    grad = torch.empty_like(z, memory_format=torch.contiguous_format) if with_grad else None
    total = _gram_sum(z, t, nz, nt, grad) if gram else _direct_sum(z, t, nz, nt, zn, grad)
    as_input = lambda g: z.new_empty((0,), dtype=z_dtype) if g is None else g.to(z_dtype)
    return (-cos.sum(dtype=torch.float64) / (batch * tokens)).float(), (total / (batch * tokens * tokens)).float(), \
        as_input(align_grad), as_input(grad)


# ---------------------------------------------------------------------------------------------
# torch.library ops: the gradients are made in the forward pass, backward scales them
# ---------------------------------------------------------------------------------------------

def _grad_shape(z: torch.Tensor, with_grad: bool) -> torch.Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format) if with_grad else z.new_empty((0,))


@torch.library.custom_op("repa_fast::triton_manifold_loss", mutates_args=())
def _manifold_op(z: torch.Tensor, t: torch.Tensor, with_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    _, manifold, _, grad = _losses_and_grads(z, t, with_grad, with_align=False)
    return manifold, grad


@_manifold_op.register_fake
def _(z, t, with_grad):
    return z.new_empty((), dtype=torch.float32), _grad_shape(z, with_grad)


def _save_grads(ctx, inputs, output):
    ctx.save_for_backward(*output[len(output) // 2:])


def _manifold_backward(ctx, grad_loss, _):
    (grad,) = ctx.saved_tensors
    return grad * grad_loss, None, None


_manifold_op.register_autograd(_manifold_backward, setup_context=_save_grads)


@torch.library.custom_op("repa_fast::triton_urepa_losses", mutates_args=())
def _urepa_op(z: torch.Tensor, t: torch.Tensor, with_grad: bool) \
        -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _losses_and_grads(z, t, with_grad, with_align=True)


@_urepa_op.register_fake
def _(z, t, with_grad):
    loss = z.new_empty((), dtype=torch.float32)
    return loss, loss.clone(), _grad_shape(z, with_grad), _grad_shape(z, with_grad)


def _urepa_backward(ctx, grad_align, grad_manifold, _, __):
    align_grad, manifold_grad = ctx.saved_tensors
    return align_grad * grad_align + manifold_grad * grad_manifold, None, None


_urepa_op.register_autograd(_urepa_backward, setup_context=_save_grads)


# ---------------------------------------------------------------------------------------------
# public functions (the triton backend's interface, see repa_fast/backends.py)
# ---------------------------------------------------------------------------------------------

def _wants_grad(z: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and z.requires_grad


def manifold_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over (b, i, j) of (<zn_bi, zn_bj> - <tn_bi, tn_bj>)^2 for (B, N, E) inputs; fp32."""
    return _manifold_op(projected, target, _wants_grad(projected))[0]


def urepa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps):
    """(cosine alignment loss, manifold loss) of one projection, normalised once. The projection
    comes back in fp32; both losses run in the activations' dtype (tensor cores for bf16/fp16)."""
    z, t = aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps)
    z = z.to(torch.promote_types(hidden.dtype, t.dtype))
    align, manifold, _, _ = _urepa_op(z, t, _wants_grad(z))
    return align, manifold


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (tests/aot_compile.py): every configuration the launchers pick
# ---------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FLOAT_SCALARS = {"align_scale", "scale", "m_scale", "loss_weight"}
_FP32_POINTERS = {"NZ", "NT", "COS", "NX", "NY", "S_PART", "LOSS_PART", "G"}
_SIZES = {"N", "E"}


def _spec(name, fn, dtype, constexprs, num_warps, num_stages, tensor_cores):
    """Signature from the kernel's argument names: upper case = pointer (fp32 for the row
    statistics, partials and g, else the compute dtype) except the sizes N, E; the rest i32 or
    fp32 scalars. Feature strides are 1, as the JIT specialises them for contiguous rows."""
    constexprs = dict(constexprs, **{arg: 1 for arg in fn.arg_names if arg.startswith("stride_") and arg.endswith("e")})
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.isupper() and arg not in _SIZES:
            signature[arg] = "*fp32" if arg in _FP32_POINTERS else "*" + _TRITON_DTYPES[dtype]
        else:
            signature[arg] = "fp32" if arg in _FLOAT_SCALARS else "i32"
    # What the JIT knows of aligned contiguous inputs with E % 16 == 0: 16-divisible pointers,
    # row strides and E (without it loads are not vectorised and not pipelined).
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
             if signature[arg] != "constexpr" and (signature[arg].startswith("*") or arg.startswith("stride_") or arg == "E")}
    label = ",".join(f"{k}={v}" for k, v in constexprs.items() if k != "EPS" and not k.startswith("stride_"))
    return {"name": f"{name}[{_TRITON_DTYPES[dtype]},{label}]", "fn": fn, "signature": signature,
            "constexprs": constexprs, "attrs": attrs, "num_warps": num_warps, "num_stages": num_stages,
            "tensor_cores": tensor_cores}


def aot_specs() -> List[dict]:
    specs = []
    for dtype in COMPUTE_DTYPES:
        for write_zn in (False, True):
            for write_align_grad in (False, True):
                specs.append(_spec("manifold_row_stats", _row_stats_kernel, dtype,
                                   dict(BLOCK_ROWS=ROW_BLOCK["BLOCK_ROWS"], BLOCK_E=ROW_BLOCK["BLOCK_E"], EPS=EPS,
                                        WRITE_ZN=write_zn, WRITE_ALIGN_GRAD=write_align_grad),
                                   ROW_BLOCK["num_warps"], 1, False))
        specs.append(_spec("manifold_gram_finish", _gram_finish_kernel, dtype,
                           dict(BLOCK_M=FINISH_BLOCK["BLOCK_M"], BLOCK_E=FINISH_BLOCK["BLOCK_E"], EPS=EPS),
                           FINISH_BLOCK["num_warps"], 1, False))
        for precision in (("ieee", "tf32") if dtype == torch.float32 else ("tf32",)):
            tensor_cores = precision != "ieee"
            for tile in TILES[dtype.itemsize]:
                gemm = dict(BLOCK_K=tile.block_k, PRECISION=precision)
                for with_grad in (False, True):
                    specs.append(_spec("manifold_direct_tiles", _direct_tiles_kernel, dtype,
                                       dict(BLOCK=tile.block, WITH_GRAD=with_grad, **gemm),
                                       tile.num_warps, tile.num_stages, tensor_cores))
                for symmetric, store in sorted({(sym, half is not None) for _, _, sym, _, half, _ in GRAM_PRODUCTS}):
                    specs.append(_spec("manifold_gram", _gram_kernel, dtype,
                                       dict(BLOCK=tile.block, SYMMETRIC=symmetric, STORE=store, **gemm),
                                       tile.num_warps, tile.num_stages, tensor_cores))
                for name, fn, extra in (("manifold_direct_grad", _direct_grad_kernel, dict(EPS=EPS)),
                                        ("manifold_gram_grad", _gram_grad_kernel, {})):
                    specs.append(_spec(name, fn, dtype, dict(BLOCK_M=tile.block, BLOCK_E=tile.block, **gemm, **extra),
                                       tile.num_warps, tile.num_stages, tensor_cores))
    return specs
