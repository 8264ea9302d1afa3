"""Launch audit at real sizes, without a GPU: every launch the triton and cuda backends make for
each DESIGN.md §5 case and each `models` preset case (repa_fast/cli/bench_cases.py), forward and
backward, is intercepted (never executed) on meta tensors and checked:

- grid x <= 2^31 - 1, y and z <= 65535 (CUDA's limits);
- no offset the kernel forms in int32 arithmetic reaches 2^31 (INT32_OFFSETS: per kernel, the
  int32 products read off its source, evaluated for the launch's argument values);
- the launched configuration is one of the kernel file's `aot_specs()`, so that
  tests/test_triton_aot.py's shared-memory, spill and compile checks cover what really runs;
- no allocation of B x N x N elements or more (N the aligned token count) that runs over the
  tokens twice (_similarity_sized).

Triton: the ops' bodies run on meta tensors in place of their fake implementations, so the
launchers compute every grid and allocate (nothing) exactly as on a GPU, with an H100's SM count
(projection._INTERPRETER_SMS). CUDA: its kernels are launched from C++, so the audit records the
repa_fast::cuda_* ops the backend calls (their fakes run) and derives each op's kernel launches and
its largest internal buffer from csrc's launchers (CUDA_LAUNCHES, which cites them); the library
loaded is csrc/ops.cpp's host-emulation build (tests/test_cuda_backend.py), same op definitions.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from repa_fast import backends, cuda_backend  # noqa: E402
from repa_fast.cli import bench_cases  # noqa: E402
from repa_fast.kernels import manifold, projection, zscore  # noqa: E402

KERNEL_MODULES = (projection, manifold, zscore)
INT32 = 2 ** 31
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
# bf16: the fp16-operand configurations (fp16 activations launch the same ones); fp32: the exact
# (ieee) ones, with the smallest tiles and so the largest grids.
DTYPES = (torch.bfloat16, torch.float32)
BACKENDS = ("triton", "cuda")


def _cases() -> List[bench_cases.Case]:
    cases = bench_cases.PRESETS["design"]() + bench_cases.PRESETS["models"]() + _mlp_cases() + \
        [case for case in bench_cases.PRESETS["projectors"]() if case.projector == "irepa"]
    return list({case.name: case for case in cases}.values())


def _mlp_cases() -> List[bench_cases.Case]:
    """The mlp head (its last Linear fused without LayerNorm): the `projectors` preset's SiT-XL
    case, and U-REPA through the same head."""
    repa = [case for case in bench_cases.PRESETS["projectors"]() if case.projector == "mlp"]
    return repa + [dataclasses.replace(case, name="u" + case.name, op="urepa") for case in repa]


# ---------------------------------------------------------------- int32 offsets, per kernel
# Each entry: (the int32 expression in the kernel, its largest value for a launch `a`: the
# launch's arguments and constexprs by name, plus `grid`). Program ids, tl.arange and loop
# counters are int32, and so are the integer arguments below 2^31; offsets cast to int64 first
# (`_row_offsets`, `b = program_id(...).to(tl.int64)`, `.to(tl.int64) * ...`) are not listed.

def _rows(a, block):
    """pid * BLOCK + arange: the largest row (or column) index a program forms."""
    return a.grid[0] * block


def _tiled(a):
    """Flat row index of a grouped-tile GEMM (`_tile_ids`): below cdiv(M, BLOCK_M) * BLOCK_M."""
    return math.ceil(a.M / a.BLOCK_M) * a.BLOCK_M


INT32_OFFSETS: Dict[str, List[Tuple[str, Callable]]] = {
    # projection.py
    "_ln_stats_kernel": [("rows", lambda a: _rows(a, a.BLOCK_ROWS)), ("cols * stride_xd", lambda a: a.D * a.stride_xd)],
    "_row_abs_max_kernel": [("rows", lambda a: _rows(a, a.BLOCK_ROWS)), ("cols * stride_xd", lambda a: a.D * a.stride_xd)],
    "_fold_params_kernel": [("e * stride_we + d * stride_wd", lambda a: a.E * a.stride_we + a.D * a.stride_wd),
                            ("e * D + d", lambda a: a.E * a.D)],
    "_resample_normalized_kernel": [("rows", lambda a: _rows(a, a.BLOCK_ROWS)), ("token * K + k", lambda a: a.N * a.K),
                                    ("batch * S + src", lambda a: a.M_out // a.N * a.S),
                                    ("src * stride_xs", lambda a: a.S * a.stride_xs),
                                    ("cols * stride_xd", lambda a: a.D * a.stride_xd)],
    "_projection_fwd_kernel": [("rows", _tiled), ("e * D + k", lambda a: a.E * a.D),
                               ("e * stride_te", lambda a: a.E * a.stride_te),
                               ("k * stride_xd", lambda a: a.D * a.stride_xd), ("2 * M + rows", lambda a: 3 * a.M)],
    "_cosine_finish_kernel": [("part * 3 * M + 2 * M + rows", lambda a: a.PARTS * 3 * a.M)],
    "_cosine_rows_kernel": [("rows", lambda a: _rows(a, a.BLOCK_ROWS)), ("3 * M + rows", lambda a: 4 * a.M),
                            ("e * stride", lambda a: a.E * max(a.stride_ze, a.stride_te)),
                            ("affine_offs + e", lambda a: a.M // a.N * a.E + a.E)],
    "_cosine_grad_kernel": [("rows", lambda a: _rows(a, a.BLOCK_ROWS)),
                            ("e * stride", lambda a: a.E * max(a.stride_ze, a.stride_te)),
                            ("rows // N * E + e", lambda a: a.M // a.N * a.E + a.E)],
    "_projection_dw_kernel": [("rows", lambda a: a.M + a.BLOCK_K),
                              ("e * stride_*e", lambda a: a.E * max(a.stride_dze, a.stride_ze, a.stride_te)),
                              ("d * stride_xd", lambda a: a.D * a.stride_xd), ("e * D + d", lambda a: a.E * a.D),
                              ("e * stride_we + d * stride_wd", lambda a: a.E * a.stride_we + a.D * a.stride_wd)],
    "_dw_split_reduce_kernel": [("split * E * D + e * D + d", lambda a: a.SPLITS * a.E * a.D),
                                ("e * stride_we + d * stride_wd", lambda a: a.E * a.stride_we + a.D * a.stride_wd)],
    "_weight_t_vec_kernel": [("e * stride_we + d * stride_wd", lambda a: a.E * a.stride_we + a.D * a.stride_wd)],
    "_projection_dx_kernel": [("rows", _tiled), ("k * D + d", lambda a: a.E * a.D),
                              ("k * stride_*e", lambda a: a.E * max(a.stride_dze, a.stride_ze, a.stride_te)),
                              ("d * stride_xd, d * stride_od", lambda a: a.D * max(a.stride_xd, a.stride_od))],
    "_ln_backward_rows_kernel": [("rows", lambda a: _rows(a, a.BLOCK_ROWS)), ("token * K + k", lambda a: a.S * a.K),
                                 ("(batch * N + dst) * D + d", lambda a: a.M // a.S * a.N * a.D),
                                 ("d * stride_xd, d * stride_od", lambda a: a.D * max(a.stride_xd, a.stride_od))],
    # zscore.py (the target's offsets are int64)
    "_zscore_stats_kernel": [("n0 + arange", lambda a: a.N + a.BLOCK_N), ("B * E + b * E + es", lambda a: 2 * a.B * a.E)],
    # manifold.py (the sample offset b is int64 in every kernel)
    "_row_stats_kernel": [("rows * stride_*n", lambda a: a.N * max(a.stride_zn, a.stride_tn)),
                          ("es * stride_*e", lambda a: a.E * max(a.stride_ze, a.stride_te)),
                          ("rows * E + es", lambda a: a.N * a.E)],
    # The operand-type copies SUM, DIFF and ZN are contiguous (B, N, E); D and G are row-chunk slabs.
    "_direct_tiles_kernel": [("rows * E + ks, cols * E + ks (S, D rows; rows, cols < N + BLOCK)",
                              lambda a: (a.N + a.BLOCK) * a.E + a.E),
                             ("(rows - row_start) * stride_dn + cols", lambda a: a.N * a.stride_dn + a.N),
                             ("loss_offset + pid", lambda a: a.n_loss_parts)],
    "_direct_grad_kernel": [("(rows - row_start) * stride_dn + ks", lambda a: a.N * a.stride_dn + a.N),
                            ("ks * E + es (zn rows; ks < N + BLOCK_K)", lambda a: (a.N + a.BLOCK_K) * a.E + a.E),
                            ("rows * stride_zn + es * stride_ze", lambda a: a.N * a.stride_zn + a.E * a.stride_ze),
                            ("(rows - row_start) * stride_gn + es", lambda a: a.N * a.stride_gn + a.E)],
    "_finish_kernel": [("(rows - row_start) * stride_gn + es", lambda a: a.N * a.stride_gn + a.E),
                       ("rows * stride_zn + es * stride_ze", lambda a: a.N * a.stride_zn + a.E * a.stride_ze),
                       ("rows * E + es", lambda a: a.N * a.E)],
    "_column_means_kernel": [("rows * stride_*n + es * stride_*e",
                              lambda a: a.N * max(a.stride_zn, a.stride_tn) + a.E * max(a.stride_ze, a.stride_te))],
    "_gram_kernel": [("ks * stride_*n + e * stride_*e",
                      lambda a: a.N * max(a.stride_zn, a.stride_tn) + a.E * max(a.stride_ze, a.stride_te)),
                     ("E * E + ra * E + rb", lambda a: 2 * a.E * a.E)],
    "_gram_grad_kernel": [("rows * stride_*n + ks * stride_*e",
                           lambda a: a.N * max(a.stride_zn, a.stride_tn) + a.E * max(a.stride_ze, a.stride_te)),
                          ("(E + ks) * E + es", lambda a: 2 * a.E * a.E),
                          ("(rows - row_start) * stride_gn + es", lambda a: a.N * a.stride_gn + a.E)],
}


# ---------------------------------------------------------------- interception

@dataclass
class Launch:
    kernel: object
    grid: Tuple[int, ...]
    args: Dict[str, object]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return self.kernel.__name__


class Recorder(TorchDispatchMode):
    """Every Triton launch (kept, never run), every repa_fast::cuda_* op call, and the shape of
    every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.launches: List[Launch] = []
        self.cuda_ops: List[Tuple[str, tuple]] = []
        self.allocations: List[Tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.name().split("::")
        if namespace == "repa_fast" and name.startswith("cuda_"):
            self.cuda_ops.append((name, args))
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.allocations.append(tuple(t.shape))
        return out

    def launch(self, kernel, *args, grid, warmup, num_warps=4, num_stages=3, **constexprs):
        """Stands in for `kernel.run` (what `kernel[grid](...)` calls): Triton's defaults for
        num_warps and num_stages."""
        assert not callable(grid), f"{kernel.__name__}: the audit takes tuple grids only"
        bound = dict(zip(kernel.arg_names, args), **constexprs)
        self.launches.append(Launch(kernel, tuple(grid), bound, constexprs, num_warps, num_stages))


def _kernels():
    return {id(v): v for module in KERNEL_MODULES for v in vars(module).values()
            if hasattr(v, "arg_names") and hasattr(v, "run")}.values()


@pytest.fixture(scope="module")
def audit():
    """{(case, dtype, backend): Recorder} for every case, on meta tensors."""
    from test_cuda_backend import build_host_emulation
    cuda_backend.load_library(build_host_emulation())
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(backends._loaded, "cuda", (cuda_backend, ""))
        current = {}
        for kernel in _kernels():
            patch.setattr(kernel, "run", lambda *a, _k=kernel, **kw: current["recorder"].launch(_k, *a, **kw))
        for module in KERNEL_MODULES:  # run the ops' bodies on meta tensors, not their fakes
            for op in {id(v): v for v in vars(module).values() if isinstance(v, CustomOpDef)}.values():
                patch.setattr(op, "_abstract_fn", op._init_fn)
        original = backends._why_not
        patch.setattr(backends, "_why_not",  # meta tensors stand in for CUDA ones
                      lambda name, device: original(name, torch.device("cuda") if device.type == "meta" else device))
        meta = torch.device("meta")
        for case in _cases():
            for dtype in DTYPES:
                for backend in BACKENDS:
                    workload = bench_cases.make_workload(case, backend, meta, dtype)
                    current["recorder"] = recorder = Recorder()
                    with recorder:
                        workload.run()
                    results[case, dtype, backend] = recorder
    return results


CASE_IDS = [case.name for case in _cases()]
CUDA_CASE_IDS = [case.name for case in _cases() ]


def _recorders(audit, name, backend):
    return [(dtype, rec) for (case, dtype, b), rec in audit.items() if case.name == name and b == backend]


# ---------------------------------------------------------------- checks

def _grid_errors(kernel: str, grid: Tuple[int, ...]) -> List[str]:
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return [f"{kernel}: grid {grid}"] if any(not 1 <= g <= limit for g, limit in zip(grid, GRID_LIMITS)) else []


@pytest.mark.parametrize("name", CASE_IDS)
def test_triton_grids_within_cuda_limits(audit, name):
    bad = []
    for dtype, rec in _recorders(audit, name, "triton"):
        assert rec.launches, f"{name} {dtype}: no Triton launch was intercepted"
        bad += [f"{dtype}: {e}" for launch in rec.launches for e in _grid_errors(launch.name, launch.grid)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", CASE_IDS)
def test_triton_int32_offsets_stay_below_2_31(audit, name):
    bad = []
    for dtype, rec in _recorders(audit, name, "triton"):
        for launch in rec.launches:
            assert launch.name in INT32_OFFSETS, f"{launch.name}: add its int32 offsets to INT32_OFFSETS"
            values = SimpleNamespace(grid=launch.grid, **launch.args)
            for expression, largest in INT32_OFFSETS[launch.name]:
                if largest(values) >= INT32:
                    bad.append(f"{launch.name} {dtype}: {expression} reaches {largest(values)}")
    assert not bad, "\n".join(bad)


_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64"}


def _differences(spec, launch: Launch) -> List[str]:
    """How `launch` differs from `spec` (empty: it is that configuration). A stride the spec makes
    constexpr 1 matches an argument of value 1 (the JIT specialises it so); None pointers (unused)
    match any type."""
    found = []
    if (spec["kernel"], spec["num_warps"], spec["num_stages"]) != (launch.name, launch.num_warps, launch.num_stages):
        found.append(f"num_warps/num_stages {launch.num_warps}/{launch.num_stages} (spec: "
                     f"{spec['num_warps']}/{spec['num_stages']})")
    found += [f"{name}={launch.args.get(name)!r} (spec: constexpr {value!r})"
              for name, value in spec["constexprs"].items() if launch.args.get(name) != value]
    found += [f"{name} {_POINTER_TYPES[value.dtype]} (spec: {spec['pointers'][name]})"
              for name, value in launch.args.items()
              if isinstance(value, torch.Tensor) and name in spec["pointers"]
              and _POINTER_TYPES[value.dtype] != spec["pointers"][name]]
    return found


@pytest.fixture(scope="module")
def specs():
    """Every kernel file's aot_specs(), listed by tests/aot_compile.py (it needs triton without the
    interpreter, hence a process of its own)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "aot_compile.py"), "--list"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_launched_configuration_is_compiled_ahead_of_time(audit, specs):
    """The AOT test checks compile, spills and shared memory (<= 227 KiB sm_90, 163 KiB sm_80) of
    the specs: each configuration that runs must be one of them."""
    missing = set()
    for (case, dtype, _), rec in audit.items():
        for launch in rec.launches:
            nearest = min((_differences(spec, launch) for spec in specs if spec["kernel"] == launch.name),
                          key=len, default=["no spec at all"])
            if nearest:
                missing.add(f"{launch.name} ({case.op}, {str(dtype)[6:]}): " + ", ".join(nearest))
    assert not missing, "launched, but no aot_specs() entry; nearest spec differs in:\n" + "\n".join(sorted(missing))


def _similarity_sized(case: bench_cases.Case, shape: Tuple[int, ...]) -> bool:
    """A buffer of B x N x N elements or more that runs over tokens twice (two dimensions after the
    batch of at least N that are not a feature width): a similarity matrix or a slab of one as
    large. Token buffers (B, N, E) (an mlp head's hidden layers' too), their transposes and the
    resampling's (B, E, h, w) are not."""
    tokens = min(case.tokens, case.target_tokens)
    widths = {case.dim, case.target_dim} | ({bench_cases.MLP_WIDTH} if case.projector == "mlp" else set())
    token_dims = [d for d in shape[1:] if d >= tokens and d not in widths]
    return math.prod(shape) >= case.batch * tokens * tokens and len(token_dims) >= 2


@pytest.mark.parametrize("backend, name", [(backend, case.name) for case in _cases() for backend in BACKENDS])
def test_no_allocation_of_b_n_n(audit, name, backend):
    case = next(c for c in _cases() if c.name == name)
    for dtype, rec in _recorders(audit, name, backend):
        internal = [buffer for op, args in rec.cuda_ops for _, _, buffer in CUDA_LAUNCHES.get(op, _none)(*args)]
        big = sorted({shape for shape in rec.allocations + internal if _similarity_sized(case, shape)})
        assert not big, f"{name} {dtype}: B x N x N allocations (N = {min(case.tokens, case.target_tokens)}): {big}"


# ---------------------------------------------------------------- the cuda backend's launches
# Per op: [(kernel, grid, largest internal buffer)], as csrc's launchers compute them.
LAYER_NORM_ROWS = 32         # csrc/kernels.h LAYER_NORM_ROWS; layer_norm.cu: blocks_for(B * S, ROWS)
COSINE_ROWS = 8              # cosine.cu: blocks_for(rows, WARPS), 256 threads = 8 warps, a row each
GATHER_THREADS = 256         # resample.cu: grid (dst_rows, batch, blocks_for(channels, THREADS))
ZSCORE_FEATURES = 32         # zscore.cu: grid (blocks_for(E, FEATURES), B)
SHARED_OPTIN = 227 * 1024    # an H100's cudaDevAttrMaxSharedMemoryPerBlockOptin (manifold.cu's budget)


def _cdiv(a, b):
    return -(-a // b)


def _gather(batch, dst_rows, channels):
    return ("gather_rows_kernel", (dst_rows, batch, _cdiv(channels, GATHER_THREADS)), ())


def _direct_smem(block_rows, tokens, with_grad):
    """manifold.cu Tiles<BM>::smem_bytes."""
    bn = 128 if block_rows == 16 else 64
    round_up = lambda n, m: _cdiv(n, m) * m  # noqa: E731
    scratch = round_up(block_rows * (bn + 4) * 4, 128)
    operands = round_up(2 * max((2 * block_rows + 2 * bn) * (32 + 8), 32 * (bn + 8)), 128)
    return scratch + operands + (2 * block_rows * (round_up(tokens, bn) + 8) if with_grad else 0)


def _alignment_terms(z, t, manifold, gram, need_grad, half_precision, t_affine=None):
    """ops.cpp alignment_terms and manifold_terms."""
    batch, tokens, dim = z.shape
    launches = [("cosine_rows_forward_kernel", (_cdiv(batch * tokens, COSINE_ROWS),), ())]
    if manifold and not gram:
        block_rows = next((bm for bm in (64, 32, 16) if half_precision
                           and _direct_smem(bm, tokens, need_grad) <= SHARED_OPTIN - 1024), 0)
        if block_rows:
            launches.append(("manifold_direct_kernel", (_cdiv(tokens, block_rows), batch), ()))
        else:  # chunks of rows through cuBLAS: (B, rows, N) differences, 2^24 values at most, rows < N
            chunk = max(1, min(tokens - 1, 2 ** 24 // (batch * tokens)))
            launches.append(("chunked differences (cuBLAS)", (1,), (batch, chunk, tokens)))
    return launches


def _project(hidden, ln_weight, ln_bias, proj_weight, proj_bias, step, ln_eps, fp32_gemm):
    batch, tokens, dim = hidden.shape
    launches = [("layer_norm_forward_kernel", (_cdiv(batch * tokens, LAYER_NORM_ROWS),), ())]
    launches = launches if ln_weight is not None else []  # ln_weight None: no LayerNorm
    return launches + ([_gather(batch, cuda_backend._decode(step).dst_tokens, dim)] if step else [])


def _project_backward(grad_z, hidden, ln_weight, proj_weight, y, mean, rstd, step, needs):
    batch, tokens, dim = hidden.shape
    if not any(needs[:3]):
        return []
    launches = [("layer_norm_backward_kernel", (_cdiv(batch * tokens, LAYER_NORM_ROWS),), ())]
    launches = launches if ln_weight is not None else []
    return launches + ([_gather(batch, tokens, dim)] if step else [])  # transposed taps: a row per source token


def _none(*args):
    return []


CUDA_LAUNCHES = {
    "cuda_project": _project,
    "cuda_project_backward": _project_backward,
    "cuda_resample_tokens": lambda x, step: [_gather(x.shape[0], cuda_backend._decode(step).dst_tokens, x.shape[2])],
    "cuda_alignment_terms": _alignment_terms,
    "cuda_alignment_terms_backward": lambda z, t, *grads: [
        ("cosine_rows_backward_kernel", (_cdiv(z.shape[0] * z.shape[1], COSINE_ROWS),), ())],
    "cuda_target_zscore": lambda target, alpha: [
        ("target_zscore_kernel", (_cdiv(target.shape[2], ZSCORE_FEATURES), target.shape[0]), ())],
}


@pytest.mark.parametrize("name", CUDA_CASE_IDS)
def test_cuda_grids_within_cuda_limits(audit, name):
    bad = []
    for dtype, rec in _recorders(audit, name, "cuda"):
        ops = {op for op, _ in rec.cuda_ops}
        assert ops, f"{name} {dtype}: the cuda backend called no repa_fast::cuda_* op"
        assert ops <= set(CUDA_LAUNCHES), f"add {sorted(ops - set(CUDA_LAUNCHES))} to CUDA_LAUNCHES"
        bad += [f"{dtype}: {e}" for op, args in rec.cuda_ops for kernel, grid, _ in CUDA_LAUNCHES[op](*args)
                for e in _grid_errors(kernel, grid)]
    assert not bad, "\n".join(bad)
