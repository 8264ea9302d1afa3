"""Token alignment (DESIGN.md §1): which side is resampled, from which grid to which.

The plan is pure shape logic shared by every backend; `resample_tokens` applies a plan step
with `F.interpolate` (the reference), and `resample_taps` turns a step into the explicit
gather indices and weights the fused kernels use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Grid = Tuple[int, int]

# "grid": each side resampled on its own grid when both have one (the geometrically right rule);
# "sequence": SimpleTuner 4.10.1's rule exactly, which never sees a grid: a side is resampled
# bilinearly only when its count and the target count are both perfect squares, else linearly
# over the flat sequence.
TOKEN_ALIGNMENTS = ("grid", "sequence")


@dataclass(frozen=True)
class Resample:
    """One side's resampling: `kind` is "bilinear" (src/dst are (h, w) grids), "linear"
    (src/dst are (n,) sequences) or "mean" (src is (n,), dst is (1,))."""

    kind: str
    src: Tuple[int, ...]
    dst: Tuple[int, ...]

    @property
    def src_tokens(self) -> int:
        return math.prod(self.src)

    @property
    def dst_tokens(self) -> int:
        return math.prod(self.dst)


@dataclass(frozen=True)
class AlignmentPlan:
    """How to bring side `a` (hidden / projected) and side `b` (target) to one token count."""

    a: Optional[Resample]
    b: Optional[Resample]
    tokens: int


def square_grid(n: int) -> Optional[Grid]:
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def check_token_alignment(token_alignment) -> str:
    if token_alignment not in TOKEN_ALIGNMENTS:
        raise ValueError(f"token_alignment must be one of {', '.join(map(repr, TOKEN_ALIGNMENTS))}, "
                         f"got {token_alignment!r}")
    return token_alignment


def plan_alignment(n_a: int, n_b: int, a_grid: Optional[Grid] = None, b_grid: Optional[Grid] = None,
                   spatial_align: bool = True, token_alignment: str = "grid") -> AlignmentPlan:
    """Resample both sides to the smaller one.

    Sides differ when their token counts differ, or when both grids are known and differ.
    With `spatial_align=False` differing sides are mean-pooled to one token. Otherwise, when both
    sides have a grid (given, or square by count) both go to the grid with fewer tokens (ties go
    to `b`'s grid: the encoder's layout is the reference) with bilinear resampling; else both go
    to the smaller count by linear resampling over the flat sequence.

    `token_alignment="sequence"` drops the given grids first (SimpleTuner's rule: only counts
    matter, so equal counts are never resampled and a non-square side is resampled as a sequence);
    with no grids given the two rules are the same.
    """
    if check_token_alignment(token_alignment) == "sequence":
        a_grid = b_grid = None
    grids_differ = a_grid is not None and b_grid is not None and tuple(a_grid) != tuple(b_grid)
    if n_a == n_b and not grids_differ:
        return AlignmentPlan(None, None, n_a)
    if not spatial_align:
        return AlignmentPlan(Resample("mean", (n_a,), (1,)), Resample("mean", (n_b,), (1,)), 1)
    grid_a = tuple(a_grid) if a_grid is not None else square_grid(n_a)
    grid_b = tuple(b_grid) if b_grid is not None else square_grid(n_b)
    if grid_a is not None and grid_b is not None:
        target = grid_b if n_b <= n_a else grid_a
        step = lambda grid: None if grid == target else Resample("bilinear", grid, target)
        return AlignmentPlan(step(grid_a), step(grid_b), math.prod(target))
    n = min(n_a, n_b)
    step = lambda count: None if count == n else Resample("linear", (count,), (n,))
    return AlignmentPlan(step(n_a), step(n_b), n)


def resample_tokens(x: torch.Tensor, step: Optional[Resample]) -> torch.Tensor:
    """Apply one plan step to tokens `x` (B, N, C) -> (B, N', C) with `F.interpolate`."""
    if step is None:
        return x
    if step.kind == "mean":
        return x.mean(dim=1, keepdim=True)
    channels_first = x.transpose(1, 2)  # (B, C, N)
    if step.kind == "linear":
        out = F.interpolate(channels_first, size=step.dst[0], mode="linear", align_corners=False)
    else:
        out = F.interpolate(channels_first.reshape(x.shape[0], x.shape[2], *step.src), size=step.dst,
                            mode="bilinear", align_corners=False).flatten(2)
    return out.transpose(1, 2)


def _linear_taps(src: int, dst: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's align_corners=False source positions: per output index the two input
    indices and their weights (float64), as `upsample_linear1d` computes them."""
    pos = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).clamp_min(0.0)
    lo = pos.floor().long().clamp_max(src - 1)
    hi = (lo + 1).clamp_max(src - 1)
    frac = pos - lo
    return torch.stack([lo, hi], 1), torch.stack([1.0 - frac, frac], 1)


def resample_taps(step: Resample) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather form of a step: `index` (dst_tokens, K) int64 into the flat source tokens and
    `weight` (dst_tokens, K) float32 — K = 2 ("linear"), 4 ("bilinear") or the source count
    ("mean", one row of 1/n) — so that `out[n] = sum_k weight[n, k] * x[index[n, k]]`. Weights of
    each row sum to one."""
    if step.kind == "mean":
        count = step.src_tokens
        return torch.arange(count).view(1, count), torch.full((1, count), 1.0 / count)
    if step.kind == "linear":
        index, weight = _linear_taps(step.src[0], step.dst[0])
        return index, weight.float()
    (h_src, w_src), (h_dst, w_dst) = step.src, step.dst
    row_index, row_weight = _linear_taps(h_src, h_dst)
    col_index, col_weight = _linear_taps(w_src, w_dst)
    # (h_dst, w_dst, 2, 2) outer products of the row and column taps, flattened to K = 4.
    index = row_index[:, None, :, None] * w_src + col_index[None, :, None, :]
    weight = row_weight[:, None, :, None] * col_weight[None, :, None, :]
    return index.reshape(h_dst * w_dst, 4), weight.reshape(h_dst * w_dst, 4).float()
