"""The supported range (README "Supported stacks") as setup.py and `repa-fast info` state it."""
import re
import subprocess
import sys
from pathlib import Path

import torch

from repa_fast import stacks
from repa_fast.cli import info

ROOT = Path(__file__).resolve().parent.parent


def test_versions_inside_and_outside_the_range():
    assert stacks.check("torch", "2.11.0+cu130") == "torch 2.11.0+cu130 inside"
    assert stacks.check("triton", "3.10.1") == "triton 3.10.1 inside"
    assert stacks.check("triton", "3.5.1") == "triton 3.5.1 OUTSIDE (needs triton>=3.6)"
    assert stacks.check("torch", "2.9.1") == "torch 2.9.1 OUTSIDE (needs torch>=2.11)"
    assert stacks.check("triton", None) == "triton not installed"
    assert stacks.check("torch", "nightly") == "torch nightly: unknown version"


def test_every_pinned_triton_is_inside_the_range():
    for torch_release, triton_version in stacks.TRITON_PINNED_BY_TORCH.items():
        assert stacks.check("torch", torch_release).endswith("inside")
        assert stacks.check("triton", triton_version).endswith("inside")


def test_info_states_the_range_and_the_installed_versions():
    line = next(line for line in info().splitlines() if line.startswith("supported: "))
    assert stacks.supported_range() in line and f"torch {torch.__version__} inside" in line


def test_setup_py_requires_the_range():
    done = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['setup.py', '--name']; "
                           "import setuptools; captured = {}; setuptools.setup = lambda **kw: captured.update(kw); "
                           "runpy.run_path('setup.py'); print(captured['install_requires'], captured['extras_require'])"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'torch>=2.11'" in done.stdout and re.search(r"'triton': \['triton>=3\.6'\]", done.stdout)
