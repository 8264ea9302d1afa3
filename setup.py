"""repa-fast: the Python package, the Triton kernels (shipped as repa_fast.kernels) and, when CUDA
is present or asked for, the CUDA extension built from csrc/."""
from setuptools import setup

test_extras = ["pytest", "pytest-benchmark", "hypothesis"]
extras = {
    "triton": ["triton"],
    "diffusers": ["diffusers", "transformers", "safetensors"],
    "bench": ["matplotlib"],
}
extras["test"] = test_extras + extras["triton"] + extras["diffusers"]

setup(
    name="repa-fast",
    version="0.1.0",
    description="Fused REPA / U-REPA representation-alignment losses for diffusion training",
    python_requires=">=3.11",
    packages=["repa_fast", "repa_fast.kernels"],
    package_dir={"repa_fast": "repa_fast", "repa_fast.kernels": "kernels"},
    install_requires=["torch", "numpy"],
    extras_require=extras,
    entry_points={"console_scripts": ["repa-fast=repa_fast.cli:main"]},
)
