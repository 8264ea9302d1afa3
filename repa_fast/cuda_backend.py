"""The `cuda` backend: the losses computed by the CUDA C++ kernels of csrc/ (the backend interface
is described in repa_fast/backends.py).

The extension is a library of ops, torch.ops.repa_fast.cuda_* (csrc/ops.cpp): LayerNorm, the
token resampling, the projection GEMM (cuBLAS through ATen), the row-wise cosine and the manifold
loss (the Gram form through cuBLAS where it is cheaper; else the direct form, in a tiled
tensor-core kernel for half-precision activations or in chunks through cuBLAS). setup.py builds it
ahead of time (repa_fast/_cuda*.so); without that, it is built just in time, once, by
torch.utils.cpp_extension.load (cached in torch's extension directory). When neither works,
`unavailable_reason()` says why, one warning quotes the compiler's first error, and the other
backends keep working.

This module holds what torch.compile and autograd see: Python custom ops around the projection and
the target resampling (they take the alignment plan as ints and turn it into gather taps with
repa_fast.alignment.resample_taps, out of the compiler's sight), fake implementations of every op,
and the autograd formulas. The losses end the graph, so the manifold gradient is computed in the
forward pass. float64 inputs go to the torch backend: the kernels take float32, float16, bfloat16.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from .alignment import AlignmentPlan, Resample, resample_taps

PREBUILT = "repa_fast._cuda"  # csrc/build.py's EXTENSION: what setup.py builds
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_KINDS = ("linear", "bilinear", "mean")
_reason: Optional[str] = None
_library: Optional[str] = None


# ---------------------------------------------------------------- building and loading

def _build_description():
    """csrc/build.py (sources, flags, names), or None where csrc/ is not shipped (a wheel)."""
    path = _CSRC / "build.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("repa_fast_csrc_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prebuilt_library() -> Optional[str]:
    """The library setup.py built, unless csrc/ holds sources edited since (then JIT-build)."""
    spec = importlib.util.find_spec(PREBUILT)
    if spec is None or not spec.origin:
        return None
    build = _build_description()
    if build is None:
        return spec.origin
    built = Path(spec.origin).stat().st_mtime
    sources = [_CSRC / s for s in build.SOURCES] + list(_CSRC.glob("*.h")) + list(_CSRC.glob("*.cuh"))
    return None if any(p.stat().st_mtime > built for p in sources) else spec.origin


def _jit_build() -> str:
    """Build csrc/ with torch.utils.cpp_extension.load (ninja; cached, so only the first call of a
    given source tree compiles) and load it; returns the library's path."""
    build = _build_description()
    if build is None:
        raise RuntimeError(f"its sources ({_CSRC}) are not part of this install: reinstall with "
                           "REPA_FAST_BUILD_CUDA=1 to build it ahead of time")
    from torch.utils import cpp_extension
    return cpp_extension.load(name=build.JIT_NAME, sources=[str(_CSRC / s) for s in build.SOURCES],
                              extra_cflags=build.CXX_FLAGS, extra_cuda_cflags=build.NVCC_FLAGS,
                              is_python_module=False, verbose=False)


# gcc/clang "file.cpp:12:5: error: ..." / "...: fatal error: ...", nvcc "file.cu(12): error: ...".
_DIAGNOSTIC = re.compile(r"(:\d+(:\d+)?:|\(\d+\):)\s*(fatal\s+)?error\b", re.IGNORECASE)
_ERROR_WORD = re.compile(r"\b(fatal|error)\b\s*:", re.IGNORECASE)


def first_compiler_error(log: str) -> str:
    """The line of a build log that says what broke first: a compiler diagnostic, else the first
    "error:"/"fatal:" line, else the log's first line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for pattern in (_DIAGNOSTIC, _ERROR_WORD):
        for line in lines:
            if pattern.search(line):
                return line
    return lines[0] if lines else "unknown error"


def _load() -> str:
    """Load the extension (prebuilt, else JIT-built); "" when the backend can run, else why not."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return _load_extension()


def _load_extension() -> str:
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        try:
            load_library(prebuilt)
            return ""
        except (OSError, RuntimeError):  # e.g. built against another torch: rebuild just in time
            pass
    try:
        load_library(_jit_build())
    except Exception as err:  # noqa: BLE001 - no nvcc, no ninja, a compiler error: the other backends must keep working
        reason = f"the CUDA extension is not built and JIT-building it failed: {first_compiler_error(str(err))}"
        warnings.warn(f"repa_fast: the cuda backend is unavailable: {reason}", RuntimeWarning, stacklevel=3)
        return reason
    return ""


def unavailable_reason() -> str:
    """"" when the backend can run here, else why not (asked once: the answer is cached)."""
    global _reason
    if _reason is None:
        _reason = _load()
    return _reason


def load_library(path: str) -> None:
    """Load a built library of the cuda_* ops and register their fake implementations and
    autograd. Once per process: the ops of two libraries would collide."""
    global _library
    if _library is not None:
        if Path(path).resolve() != Path(_library).resolve():
            raise RuntimeError(f"a repa_fast cuda library is already loaded from {_library}; cannot also load {path}")
        return
    torch.ops.load_library(path)
    torch.library.register_fake("repa_fast::cuda_alignment_terms", _alignment_terms_fake)
    torch.library.register_fake("repa_fast::cuda_alignment_terms_backward", _alignment_terms_backward_fake)
    torch.library.register_fake("repa_fast::cuda_target_zscore", _target_zscore_fake)
    torch.library.register_autograd("repa_fast::cuda_alignment_terms", _alignment_terms_backward,
                                    setup_context=_alignment_terms_setup)
    _library = path


# ---------------------------------------------------------------- alignment plan -> gather taps

def _encode(step: Optional[Resample]) -> List[int]:
    """A plan step as op arguments: [] for none, else [kind, *src, *dst]."""
    return [] if step is None else [_KINDS.index(step.kind), *step.src, *step.dst]


def _decode(code: Sequence[int]) -> Resample:
    sizes = tuple(code[1:])
    return Resample(_KINDS[code[0]], sizes[:len(sizes) // 2], sizes[len(sizes) // 2:])


@functools.lru_cache(maxsize=64)
def _cached_taps(code: Tuple[int, ...], device: torch.device, transposed: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """CSR taps (offsets, index, weight) of a step on `device`: per output token its input tokens
    and weights, or, `transposed`, per input token the output tokens it feeds (the backward)."""
    step = _decode(code)
    index, weight = resample_taps(step)
    rows, taps = index.shape
    index, weight = index.flatten(), weight.flatten()
    if transposed:
        order = torch.argsort(index, stable=True)
        offsets = torch.zeros(step.src_tokens + 1, dtype=torch.int64)
        offsets[1:] = torch.bincount(index, minlength=step.src_tokens).cumsum(0)
        index, weight = order // taps, weight[order]
    else:
        offsets = torch.arange(0, rows * taps + 1, taps)
    return offsets.to(device), index.to(device), weight.to(device)


def _taps(code: Sequence[int], device: torch.device, transposed: bool):
    return _cached_taps(tuple(code), device, transposed) if code else (None, None, None)


# ---------------------------------------------------------------- ops seen by torch.compile and autograd

def _gemm_dtype(activations: torch.dtype) -> torch.dtype:
    """The projection GEMM's operand dtype (csrc/kernels.h gemm_dtype): float16 for both half-precision
    activation dtypes (bfloat16's 7-bit mantissa costs ~1e-2 in the gradients), else float32."""
    return torch.float32 if activations == torch.float32 else torch.float16


@torch.library.custom_op("repa_fast::cuda_project", mutates_args=())
def _project(hidden: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], proj_weight: Tensor,
             proj_bias: Tensor, step: List[int], ln_eps: float,
             fp32_gemm: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(z, y, mean, rstd): z = resample(LayerNorm(hidden)) @ W^T + b in float32 (no LayerNorm when
    ln_weight and ln_bias are None), y the GEMM's input (in _gemm_dtype(hidden.dtype), or float32
    with `fp32_gemm`: float32 operands, TF32 off; empty when it is hidden itself: no LayerNorm, no
    resampling), the LayerNorm statistics (empty without LayerNorm); `step` is the hidden side's
    plan step (_encode)."""
    return torch.ops.repa_fast.cuda_projection_forward(hidden, ln_weight, ln_bias, proj_weight, proj_bias,
                                                       *_taps(step, hidden.device, False), ln_eps, fp32_gemm)


@_project.register_fake
def _(hidden, ln_weight, ln_bias, proj_weight, proj_bias, step, ln_eps, fp32_gemm):
    batch, tokens, dim = hidden.shape
    rows = _decode(step).dst_tokens if step else tokens
    stats = hidden.new_empty(batch * tokens if ln_weight is not None else 0, dtype=torch.float32)
    z = hidden.new_empty(batch, rows, proj_weight.shape[0], dtype=torch.float32)
    y_shape = (batch, rows, dim) if ln_weight is not None or step else (0,)
    y_dtype = torch.float32 if fp32_gemm else _gemm_dtype(hidden.dtype)
    return z, hidden.new_empty(y_shape, dtype=y_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("repa_fast::cuda_project_backward", mutates_args=())
def _project_grads(grad_z: Tensor, hidden: Tensor, ln_weight: Optional[Tensor], proj_weight: Tensor, y: Tensor,
                   mean: Tensor, rstd: Tensor, step: List[int], needs: List[bool]) -> List[Tensor]:
    """The gradients of _project's z w.r.t. (hidden, ln_weight, ln_bias, proj_weight, proj_bias),
    only those flagged in `needs` (never the ln ones without LayerNorm); hidden's in its dtype, the
    parameters' in float32."""
    grads = torch.ops.repa_fast.cuda_projection_backward(grad_z, hidden, ln_weight, proj_weight, y, mean, rstd,
                                                         *_taps(step, hidden.device, True), needs)
    return [grad for grad, need in zip(grads, needs) if need]


@_project_grads.register_fake
def _(grad_z, hidden, ln_weight, proj_weight, y, mean, rstd, step, needs):
    ln_shape = None if ln_weight is None else ln_weight.shape
    params = (ln_shape, ln_shape, proj_weight.shape, proj_weight.shape[:1])
    grads = [torch.empty_like(hidden)] if needs[0] else []
    return grads + [hidden.new_empty(shape, dtype=torch.float32) for shape, need in zip(params, needs[1:]) if need]


def _project_setup(ctx, inputs, output):
    hidden, ln_weight, ln_bias, proj_weight, proj_bias, step, _, _ = inputs
    _, y, mean, rstd = output
    ctx.save_for_backward(hidden, ln_weight, proj_weight, y, mean, rstd)
    ctx.step = step
    ctx.dtypes = tuple(None if x is None else x.dtype for x in (hidden, ln_weight, ln_bias, proj_weight, proj_bias))


def _project_backward(ctx, grad_z, *unused):
    hidden, ln_weight, proj_weight, y, mean, rstd = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = iter(_project_grads(grad_z, hidden, ln_weight, proj_weight, y, mean, rstd, ctx.step, needs))
    return (*(next(grads).to(dtype) if need else None for need, dtype in zip(needs, ctx.dtypes)), None, None, None)


_project.register_autograd(_project_backward, setup_context=_project_setup)


@torch.library.custom_op("repa_fast::cuda_resample_tokens", mutates_args=())
def _resample_tokens(x: Tensor, step: List[int]) -> Tensor:
    """The target side's resampling (targets are frozen: no gradient)."""
    return torch.ops.repa_fast.cuda_gather_rows(x, *_taps(step, x.device, False))


@_resample_tokens.register_fake
def _(x, step):
    return x.new_empty(x.shape[0], _decode(step).dst_tokens, x.shape[2])


# Fake implementations and autograd of the C++ ops, registered by load_library.

def _alignment_terms_fake(z, t, manifold, gram, need_grad, half_precision, t_affine=None):
    batch, tokens, dim = z.shape
    scalar = z.new_empty((), dtype=torch.float32)
    grad_rows = batch if manifold and need_grad else 0
    return scalar, torch.empty_like(scalar), z.new_empty((grad_rows, tokens, dim), dtype=torch.float32)


def _alignment_terms_backward_fake(z, t, manifold_grad, grad_align, grad_manifold, t_affine=None):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _target_zscore_fake(target, alpha):
    return target.new_empty((2, target.shape[0], target.shape[2]), dtype=torch.float32)


def _alignment_terms_setup(ctx, inputs, output):
    z, t, *_, t_affine = inputs
    ctx.has_affine = t_affine is not None
    ctx.save_for_backward(z, t, output[2], *(t_affine,) if ctx.has_affine else ())


def _alignment_terms_backward(ctx, grad_align, grad_manifold, unused):
    z, t, manifold_grad, *affine = ctx.saved_tensors
    zero = z.new_zeros((), dtype=torch.float32)
    grad_z = torch.ops.repa_fast.cuda_alignment_terms_backward(
        z, t, manifold_grad, zero if grad_align is None else grad_align,
        zero if grad_manifold is None else grad_manifold, affine[0] if affine else None)
    return grad_z, None, None, None, None, None, None


# ---------------------------------------------------------------- the backend interface

def _has_float64(*tensors: Optional[Tensor]) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _alignment_terms(z: Tensor, t: Tensor, manifold: bool, activations: torch.dtype,
                     t_affine: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(alignment, manifold) of z and t (with `t_affine`: of t z-scored on load, t read in its
    dtype); half-precision `activations` put the manifold's products on tensor cores."""
    gram = reference.use_gram_form(z.shape[1], z.shape[2])
    half = activations in (torch.float16, torch.bfloat16)
    align, manifold_value, _ = torch.ops.repa_fast.cuda_alignment_terms(z, t, manifold, gram, z.requires_grad, half,
                                                                        t_affine)
    return align, manifold_value


def _aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan: AlignmentPlan,
                        ln_eps: float, fp32_gemm: bool) -> Tuple[Tensor, Tensor]:
    z = _project(hidden, ln_weight, ln_bias, proj_weight, proj_bias, _encode(plan.a), ln_eps, fp32_gemm)[0]
    return z, (target if plan.b is None else _resample_tokens(target, _encode(plan.b)))


def repa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan: AlignmentPlan,
              ln_eps: float) -> Tensor:
    if _has_float64(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias):
        return reference.repa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps)
    z, t = _aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps, False)
    return _alignment_terms(z, t, False, hidden.dtype)[0]


def urepa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan: AlignmentPlan,
               ln_eps: float) -> Tuple[Tensor, Tensor]:
    if _has_float64(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias):
        return reference.urepa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps)
    # float32 projection operands: the manifold term amplifies an fp16 GEMM's error of z as z -> t
    z, t = _aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps, True)
    return _alignment_terms(z, t, True, hidden.dtype)


def target_zscore(target: Tensor, alpha: float) -> Tensor:
    """iREPA's z-score of a (B, N, E) target as (2, B, E) (shift, scale), float32 from one pass
    over it (float64 targets: the torch backend's, in float64)."""
    if _has_float64(target):
        return reference.target_zscore(target, alpha)
    return torch.ops.repa_fast.cuda_target_zscore(target.detach(), float(alpha))


def cosine_alignment_loss(projected: Tensor, target: Tensor, t_affine: Optional[Tensor] = None) -> Tensor:
    if _has_float64(projected, target, t_affine):
        return reference.cosine_alignment_loss(projected, target, t_affine)
    return _alignment_terms(projected, target, False, projected.dtype, t_affine)[0]


def manifold_loss(projected: Tensor, target: Tensor, t_affine: Optional[Tensor] = None) -> Tensor:
    if _has_float64(projected, target, t_affine):
        return reference.manifold_loss(projected, target, t_affine)
    return _alignment_terms(projected, target, True, projected.dtype, t_affine)[1]
