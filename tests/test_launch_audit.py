"""Launch audit at real sizes, without a GPU: every Triton launch the triton backend makes for each
DESIGN.md §5 case and each `models` preset case (repa_fast/cli/bench_cases.py), forward and
backward, is intercepted (never executed) on meta tensors and checked:

- grid x <= 2^31 - 1, y and z <= 65535 (CUDA's limits);
- no offset the kernel forms in int32 arithmetic reaches 2^31 (INT32_OFFSETS: per kernel, the
  int32 products read off its source, evaluated for the launch's argument values);
- the launched configuration is one of the kernel file's `aot_specs()`, so that
  tests/test_triton_aot.py's shared-memory, spill and compile checks cover what really runs;
- no allocation of B x N x N elements or more (N the aligned token count), inputs and their
  gradients aside.

The ops' bodies run on meta tensors in place of their fake implementations, so the launchers
compute every grid and allocate (nothing) exactly as on a GPU, with an H100's SM count
(projection._INTERPRETER_SMS).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from repa_fast import backends  # noqa: E402
from repa_fast.cli import bench_cases  # noqa: E402
from repa_fast.kernels import manifold, projection  # noqa: E402

KERNEL_MODULES = (projection, manifold)
INT32 = 2 ** 31
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
# bf16: the fp16-operand configurations (fp16 activations launch the same ones); fp32: the exact
# (ieee) ones, with the smallest tiles and so the largest grids.
DTYPES = (torch.bfloat16, torch.float32)


def _cases() -> List[bench_cases.Case]:
    cases = bench_cases.PRESETS["design"]() + bench_cases.PRESETS["models"]()
    return list({case.name: case for case in cases}.values())


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
                            ("e * stride", lambda a: a.E * max(a.stride_ze, a.stride_te))],
    "_cosine_grad_kernel": [("rows", lambda a: _rows(a, a.BLOCK_ROWS)),
                            ("e * stride", lambda a: a.E * max(a.stride_ze, a.stride_te))],
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
    # manifold.py (the sample offset b is int64 in every kernel)
    "_row_stats_kernel": [("rows * stride_*n", lambda a: a.N * max(a.stride_zn, a.stride_tn)),
                          ("es * stride_*e", lambda a: a.E * max(a.stride_ze, a.stride_te)),
                          ("rows * E + es", lambda a: a.N * a.E)],
    "_direct_tiles_kernel": [("rows * stride_*n", lambda a: a.N * max(a.stride_zn, a.stride_tn)),
                             ("ks * stride_*e", lambda a: a.E * max(a.stride_ze, a.stride_te)),
                             ("(rows - row_start) * stride_dn + cols", lambda a: a.N * a.stride_dn + a.N),
                             ("loss_offset + pid", lambda a: a.n_loss_parts)],
    "_direct_grad_kernel": [("(rows - row_start) * stride_dn + ks", lambda a: a.N * a.stride_dn + a.N),
                            ("ks * E + es, rows * E + es", lambda a: a.N * a.E),
                            ("rows * stride_zn + es * stride_ze", lambda a: a.N * a.stride_zn + a.E * a.stride_ze)],
    "_column_means_kernel": [("rows * stride_*n + es * stride_*e",
                              lambda a: a.N * max(a.stride_zn, a.stride_tn) + a.E * max(a.stride_ze, a.stride_te))],
    "_gram_kernel": [("ks * stride_*n + e * stride_*e",
                      lambda a: a.N * max(a.stride_zn, a.stride_tn) + a.E * max(a.stride_ze, a.stride_te)),
                     ("E * E + ra * E + rb", lambda a: 2 * a.E * a.E)],
    "_gram_grad_kernel": [("rows * stride_*n + ks * stride_*e",
                           lambda a: a.N * max(a.stride_zn, a.stride_tn) + a.E * max(a.stride_ze, a.stride_te)),
                          ("(E + ks) * E + es", lambda a: 2 * a.E * a.E),
                          ("(rows - row_start) * stride_gn + es", lambda a: a.N * a.stride_gn + a.E)],
    "_gram_finish_kernel": [("(rows - row_start) * stride_gn + es", lambda a: a.N * a.stride_gn + a.E),
                            ("rows * E + es", lambda a: a.N * a.E),
                            ("rows * stride_zn + es * stride_ze", lambda a: a.N * a.stride_zn + a.E * a.stride_ze)],
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


@dataclass
class Recorder(TorchDispatchMode):
    """Every Triton launch (kept, never run) and the shape of every tensor an op produces."""

    launches: List[Launch] = field(default_factory=list)
    allocations: List[Tuple[int, ...]] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.allocations.append(tuple(t.shape))
        return out

    def launcher(self, kernel):
        def run(*args, grid, warmup, num_warps=4, num_stages=3, **kwargs):
            assert not callable(grid), f"{kernel.__name__}: the audit takes tuple grids only"
            bound = dict(zip(kernel.arg_names, args), **kwargs)
            self.launches.append(Launch(kernel, tuple(grid), bound, kwargs, num_warps, num_stages))
        return run


def _kernels():
    return {id(v): v for module in KERNEL_MODULES for v in vars(module).values()
            if hasattr(v, "arg_names") and hasattr(v, "run")}.values()


@pytest.fixture(scope="module")
def audit():
    """{(case name, dtype): Recorder} for every case, on meta tensors."""
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        recorder_slot = {}
        for kernel in _kernels():
            patch.setattr(kernel, "run", lambda *a, _k=kernel, **kw: recorder_slot["now"].launcher(_k)(*a, **kw))
        for module in KERNEL_MODULES:  # run the ops' bodies on meta tensors, not their fakes
            for op in {id(v): v for v in vars(module).values() if isinstance(v, CustomOpDef)}.values():
                patch.setattr(op, "_abstract_fn", op._init_fn)
        original = backends._why_not
        patch.setattr(backends, "_why_not",  # meta tensors stand in for CUDA ones
                      lambda name, device: original(name, torch.device("cuda") if device.type == "meta" else device))
        meta = torch.device("meta")
        for case in _cases():
            for dtype in DTYPES:
                workload = bench_cases.make_workload(case, "triton", meta, dtype)
                recorder_slot["now"] = recorder = Recorder()
                with recorder:
                    workload.run()
                results[case, dtype] = recorder
    return results


CASE_IDS = [case.name for case in _cases()]


def _recorders(audit, name):
    return [(dtype, rec) for (case, dtype), rec in audit.items() if case.name == name]


# ---------------------------------------------------------------- checks

@pytest.mark.parametrize("name", CASE_IDS)
def test_grids_within_cuda_limits(audit, name):
    bad = []
    for dtype, rec in _recorders(audit, name):
        assert rec.launches, f"{name} {dtype}: no Triton launch was intercepted"
        for launch in rec.launches:
            grid = launch.grid + (1,) * (3 - len(launch.grid))
            if any(not 1 <= g <= limit for g, limit in zip(grid, GRID_LIMITS)):
                bad.append(f"{launch.name} {dtype}: grid {grid}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", CASE_IDS)
def test_int32_offsets_stay_below_2_31(audit, name):
    bad = []
    for dtype, rec in _recorders(audit, name):
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
    for (case, dtype), rec in audit.items():
        for launch in rec.launches:
            nearest = min((_differences(spec, launch) for spec in specs if spec["kernel"] == launch.name),
                          key=len, default=["no spec at all"])
            if nearest:
                missing.add(f"{launch.name} ({case.op}, {str(dtype)[6:]}): " + ", ".join(nearest))
    assert not missing, "launched, but no aot_specs() entry; nearest spec differs in:\n" + "\n".join(sorted(missing))


def _input_shapes(case: bench_cases.Case) -> set:
    """Shapes of the inputs and of their token views: their gradients and casts are unavoidable."""
    hidden = (case.batch, case.tokens, case.dim)
    shapes = {hidden, (case.batch, case.target_tokens, case.target_dim), (case.target_dim, case.dim)}
    if case.feature_map:
        side = math.isqrt(case.tokens)
        shapes.add((case.batch, case.dim, side, side))
    return shapes


@pytest.mark.parametrize("name", CASE_IDS)
def test_no_allocation_of_b_n_n(audit, name):
    case = next(c for c in _cases() if c.name == name)
    tokens = min(case.tokens, case.target_tokens)
    limit = case.batch * tokens * tokens
    exempt = _input_shapes(case)
    for dtype, rec in _recorders(audit, name):
        big = [shape for shape in rec.allocations if math.prod(shape) >= limit and shape not in exempt]
        assert not big, f"{name} {dtype}: allocations of >= B*N*N = {limit} elements: {sorted(set(big))}"
