"""Backend registry and dispatch (DESIGN.md §2 "Backends").

A backend is a module exposing, with the same signatures as `repa_fast.reference`:
`repa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, ln_eps)`,
`urepa_loss(...)` (same arguments), `cosine_alignment_loss(z, t, t_affine=None)`,
`manifold_loss(z, t, t_affine=None)` and `target_zscore(target, alpha)`.
Inputs arrive validated, as (B, N, C) token views, targets detached. `ln_weight` and `ln_bias`
may both be None: no LayerNorm, the projection is the Linear alone (an MLP head's last layer).
`target_zscore` gives iREPA's z-score of a (B, N, E) target over its tokens as a per-(sample,
channel) affine map, (2, B, E) = (shift, scale), fp32 (float64 for float64 targets); the two
losses given it as `t_affine` use t' = (t - shift) * scale in place of t (the z-score commutes
with the token resampling, so t may be the resampled target).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": "repa_fast.reference", "triton": "repa_fast.kernels.backend", "cuda": "repa_fast.cuda_backend"}
_loaded: Dict[str, Tuple[Optional[ModuleType], str]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says what is missing."""


def _load(name: str) -> Tuple[Optional[ModuleType], str]:
    """Import a backend once; remember why it failed so every later call can say it."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            reason = getattr(module, "unavailable_reason", lambda: "")()
            _loaded[name] = (None, reason) if reason else (module, "")
        except ImportError as err:
            _loaded[name] = (None, f"importing {_MODULES[name]} failed: {err}")
    return _loaded[name]


def triton_interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_not(name: str, device: torch.device) -> str:
    """Empty when backend `name` can run on tensors of `device`, else the reason."""
    module, reason = _load(name)
    if module is None:
        return reason
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreter_active()):
        return (f"the triton backend needs CUDA tensors (got {device}); on CPU it runs only under the "
                "Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    return ""


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Backends that can run on `device` (default: CUDA when present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [name for name in BACKENDS if not _why_not(name, device)]


def check_backend(backend, *, name: str = "backend") -> Optional[str]:
    """A known backend name, "auto" or None (whether it can run is decided per call, from the
    tensors' device)."""
    if backend is not None and backend not in BACKENDS + ("auto",):
        raise ValueError(f"{name} must be one of {', '.join(BACKENDS)}, 'auto' or None, got {backend!r}")
    return backend


@torch.compiler.assume_constant_result
def _pick(backend: Optional[str], device_type: str) -> str:
    """The backend name for these arguments. Under torch.compile it runs once at trace time (it
    imports modules and reads the environment, which dynamo cannot trace) and its answer is
    baked into the graph."""
    if backend is None:
        backend = check_backend(os.environ.get("REPA_FAST_BACKEND", "").strip().lower() or "auto",
                                name="REPA_FAST_BACKEND")
    check_backend(backend)
    device = torch.device(device_type)
    if backend == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
        return next(n for n in order if not _why_not(n, device))
    reason = _why_not(backend, device)
    if reason:
        raise BackendUnavailableError(f"backend {backend!r} cannot run: {reason}")
    return backend


def backend_name(backend: Optional[str], device: torch.device | str) -> str:
    """The name of the backend that `backend` (None, "auto" or a name) resolves to on `device`."""
    return _pick(backend, torch.device(device).type)


def resolve_backend(backend: Optional[str], device: torch.device) -> ModuleType:
    """`backend=None` means REPA_FAST_BACKEND if set, else auto: CUDA tensors -> triton, then
    cuda, then torch; CPU tensors -> torch. A named backend that cannot run is an error."""
    return _loaded[_pick(backend, device.type)][0]
