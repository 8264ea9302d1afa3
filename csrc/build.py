"""How csrc/ is built: shared by setup.py (ahead of time, with torch.utils.cpp_extension and ninja)
and by repa_fast.cuda_backend (just in time, with torch.utils.cpp_extension.load), and checked by
tests/test_cuda_build.py.

Standard library only: setup.py may run where torch cannot be imported (pip's build isolation),
and must then still install the package, without the extension, and say why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Optional

CSRC = Path(__file__).resolve().parent
ENV = "REPA_FAST_BUILD_CUDA"
EXTENSION = "repa_fast._cuda"  # what setup.py builds: a library of ops (torch.ops.load_library), no Python module
JIT_NAME = "repa_fast_cuda"    # torch.utils.cpp_extension.load's name, i.e. its cache directory
SOURCES = ("ops.cpp", "cuda_stream.cpp", "layer_norm.cu", "resample.cu", "cosine.cu", "manifold.cu", "zscore.cu")
KERNEL_SOURCES = tuple(s for s in SOURCES if s.endswith(".cu"))
# ops.cpp with CPU stand-ins for the kernels: the whole backend on a machine without a GPU (tests only).
HOST_EMULATION_SOURCES = ("ops.cpp", "host_launchers.cpp")
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
# sm_80 and sm_90 machine code, plus sm_90 PTX so that newer GPUs can JIT it.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


class Decision(NamedTuple):
    """Whether setup.py builds the extension, the line it prints, and whether that line is an error."""

    build: bool
    message: str
    error: bool = False


def arch_list(env: Mapping[str, str]) -> str:
    """TORCH_CUDA_ARCH_LIST when set, else sm_80 and sm_90."""
    return env.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST


def _missing(torch_version: Optional[str], torch_cuda: Optional[str], cuda_home: Optional[str]) -> str:
    """What the build needs and does not have, or ""."""
    if torch_version is None:
        return ("torch is not importable where setup.py runs (pip's build isolation: install with "
                "--no-build-isolation)")
    if torch_cuda is None:
        return f"torch {torch_version} is a CPU build (torch.version.cuda is None)"
    if cuda_home is None:
        return "no CUDA toolkit was found (set CUDA_HOME to the directory holding bin/nvcc)"
    return ""


def decide(env: Mapping[str, str], *, torch_version: Optional[str], torch_cuda: Optional[str],
           cuda_available: bool, cuda_home: Optional[str]) -> Decision:
    """REPA_FAST_BUILD_CUDA=1 builds (or fails saying what is missing), =0 skips; unset, the
    extension is built when CUDA is available (a CUDA torch, a visible device and a toolkit)."""
    asked = env.get(ENV, "").strip()
    later = "the cuda backend JIT-builds it at first use when it can"
    if asked not in ("", "0", "1"):
        return Decision(False, f"{ENV} must be 0 or 1, got {asked!r}", error=True)
    if asked == "0":
        return Decision(False, f"{ENV}=0: installing without the CUDA extension ({later})")
    missing = _missing(torch_version, torch_cuda, cuda_home)
    if asked == "1":
        if missing:
            return Decision(False, f"{ENV}=1 but the CUDA extension cannot be built: {missing}", error=True)
        return Decision(True, f"{ENV}=1: building the CUDA extension for TORCH_CUDA_ARCH_LIST={arch_list(env)}")
    if missing:
        return Decision(False, f"installing without the CUDA extension: {missing} ({later})")
    if not cuda_available:
        return Decision(False, f"installing without the CUDA extension: no CUDA device is visible (set {ENV}=1 "
                               f"to build it anyway; {later})")
    return Decision(True, f"CUDA is available: building the CUDA extension for TORCH_CUDA_ARCH_LIST={arch_list(env)}")
