"""repa-fast: the Python package, the Triton kernels (shipped as repa_fast.kernels) and, when CUDA
is present or asked for, the CUDA extension built from csrc/."""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def load_module(name: str, path: Path):
    """A standard-library-only module of this tree, loaded without importing the package (torch)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The supported range (README "Supported stacks"): torch 2.11 and its triton 3.6 to the newest.
stacks = load_module("repa_fast_stacks", HERE / "repa_fast" / "stacks.py")
test_extras = ["pytest", "pytest-benchmark", "hypothesis"]
extras = {
    "triton": [stacks.requirement("triton", stacks.MIN_TRITON)],
    "diffusers": ["diffusers", "transformers", "safetensors"],
    "bench": ["matplotlib"],
}
extras["test"] = test_extras + extras["triton"] + extras["diffusers"] + ["accelerate"]  # the README's accelerate loop runs in tests/test_readme.py


def cuda_extension_args() -> dict:
    """ext_modules and cmdclass of the CUDA extension (csrc/, torch.utils.cpp_extension, ninja), or {}.

    csrc/build.py decides: REPA_FAST_BUILD_CUDA=1 builds, =0 skips, unset builds when CUDA is
    available. Without torch importable here (pip's build isolation) the package installs without
    the extension, and says so.
    """
    build = load_module("repa_fast_csrc_build", HERE / "csrc" / "build.py")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        torch = cpp_extension = None
    decision = build.decide(
        os.environ,
        torch_version=torch.__version__ if torch else None,
        torch_cuda=torch.version.cuda if torch else None,
        cuda_available=bool(torch) and torch.cuda.is_available(),
        cuda_home=cpp_extension.CUDA_HOME if cpp_extension else None,
    )
    if decision.error:
        raise SystemExit(f"repa-fast: {decision.message}")
    print(f"repa-fast: {decision.message}", file=sys.stderr)
    if not decision.build:
        return {}
    os.environ["TORCH_CUDA_ARCH_LIST"] = build.arch_list(os.environ)
    extension = cpp_extension.CUDAExtension(
        build.EXTENSION,
        sources=[f"csrc/{source}" for source in build.SOURCES],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="repa-fast",
    version="0.1.0",
    description="Fused REPA / U-REPA representation-alignment losses for diffusion training",
    python_requires=">=3.11",
    packages=["repa_fast", "repa_fast.integrations", "repa_fast.cli", "repa_fast.kernels"],
    package_dir={"repa_fast": "repa_fast", "repa_fast.kernels": "kernels"},
    install_requires=[stacks.requirement("torch", stacks.MIN_TORCH), "numpy"],
    extras_require=extras,
    entry_points={"console_scripts": ["repa-fast=repa_fast.cli:main"]},
    **cuda_extension_args(),
)
