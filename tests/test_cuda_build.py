"""The cuda backend without a GPU: its kernels compile for sm_80 and sm_90 with this machine's nvcc
(no spills, tensor cores in the manifold kernel), the CUDA-only glue compiles against torch's
headers, setup.py's build decision, and the refusals and the one warning when the extension
cannot be had (../shared/GPU_LESS.md §3). A missing nvcc fails these tests: CI machines have one.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import repa_fast as rf
from repa_fast import cuda_backend

ROOT = Path(__file__).resolve().parent.parent
ARCHES = (80, 90)


build = cuda_backend._build_description()


def nvcc() -> str:
    path = shutil.which("nvcc")
    assert path, "nvcc is not on PATH: the CUDA kernels of csrc/ cannot be checked (CI machines have nvcc)"
    return path


# ---------------------------------------------------------------- the kernels, with nvcc

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every csrc/*.cu compiled for sm_80 and sm_90 as torch builds them (its nvcc flags), in
    parallel: {source: (returncode, ptxas log, kept-files directory)}."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    out = tmp_path_factory.mktemp("nvcc")
    gencode = [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in ARCHES]
    runs = {}
    for source in build.KERNEL_SOURCES:
        keep = out / Path(source).stem
        keep.mkdir()
        command = [nvcc(), "-std=c++17", *build.NVCC_FLAGS, *COMMON_NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-keep",
                   "-keep-dir", str(keep), "-c", str(ROOT / "csrc" / source), "-o", str(keep / "kernel.o")]
        runs[source] = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), keep)
    return {source: (proc.wait(timeout=600), proc.stdout.read(), keep) for source, (proc, keep) in runs.items()}


@pytest.mark.parametrize("source", build.KERNEL_SOURCES)
def test_kernel_compiles_for_sm80_and_sm90(compiled, source):
    returncode, log, _ = compiled[source]
    assert returncode == 0, f"nvcc failed on csrc/{source}:\n{log[-4000:]}"
    for cc in ARCHES:
        assert re.search(rf"Compiling entry function '\w+' for 'sm_{cc}'", log), f"no sm_{cc} kernel in csrc/{source}"


@pytest.mark.parametrize("source", build.KERNEL_SOURCES)
def test_kernel_spills_no_registers(compiled, source):
    _, log, _ = compiled[source]
    spills = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads",
                        log, flags=re.S)
    assert spills, f"no ptxas report for csrc/{source}:\n{log[-2000:]}"
    spilled = [f"{name} {arch}: {stores} B stored, {loads} B loaded" for name, arch, stores, loads in spills
               if int(stores) or int(loads)]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_manifold_kernel_runs_on_tensor_cores(compiled):
    returncode, log, keep = compiled["manifold.cu"]
    assert returncode == 0, log[-4000:]
    for cc in ARCHES:
        ptx = next(keep.glob(f"*compute_{cc}.ptx")).read_text()
        assert "mma.sync" in ptx, f"no tensor-core MMA in the sm_{cc} PTX of csrc/manifold.cu"


def test_kernels_include_no_torch_header():
    """The .cu files must compile with plain nvcc: torch's CPU build lacks the CUDA config headers."""
    for path in sorted((ROOT / "csrc").glob("*.cu*")):
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")], f"{path.name}: {includes}"


def nvcc_include_dirs():
    dryrun = subprocess.run([nvcc(), "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    return re.findall(r'-I"?([^"\s]+)', "\n".join(line for line in dryrun.splitlines() if "INCLUDES=" in line))


def test_stream_glue_compiles_against_torch_headers(tmp_path):
    """csrc/cuda_stream.cpp is the only glue needing torch's CUDA headers; torch's CPU build lacks its
    generated c10/cuda/impl/cuda_cmake_macros.h, so a stand-in is given. (csrc/ops.cpp is compiled
    and run by test_cuda_backend.py's host emulation.)"""
    from torch.utils.cpp_extension import include_paths
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{tmp_path}"] + [f"-isystem{p}" for p in include_paths() + nvcc_include_dirs()]
    done = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", *includes, str(ROOT / "csrc" / "cuda_stream.cpp")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


# ---------------------------------------------------------------- setup.py's decision

HAVE_ALL = {"torch_version": "2.11.0", "torch_cuda": "13.0", "cuda_available": True, "cuda_home": "/usr/local/cuda"}


def test_builds_when_cuda_is_available_for_sm80_and_sm90():
    decision = build.decide({}, **HAVE_ALL)
    assert decision.build and not decision.error and "TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX" in decision.message


def test_respects_torch_cuda_arch_list():
    decision = build.decide({"TORCH_CUDA_ARCH_LIST": "9.0a"}, **HAVE_ALL)
    assert decision.build and "TORCH_CUDA_ARCH_LIST=9.0a" in decision.message
    assert build.arch_list({"TORCH_CUDA_ARCH_LIST": "9.0a"}) == "9.0a" and build.arch_list({}) == "8.0;9.0+PTX"


@pytest.mark.parametrize("missing, says", [
    ({"torch_version": None, "torch_cuda": None, "cuda_available": False, "cuda_home": None}, "--no-build-isolation"),
    ({"torch_cuda": None, "cuda_available": False}, "is a CPU build"),
    ({"cuda_home": None}, "set CUDA_HOME"),
    ({"cuda_available": False}, "no CUDA device is visible (set REPA_FAST_BUILD_CUDA=1 to build it anyway"),
])
def test_without_cuda_installs_without_the_extension_and_says_why(missing, says):
    decision = build.decide({}, **dict(HAVE_ALL, **missing))
    assert not decision.build and not decision.error
    assert "installing without the CUDA extension" in decision.message and says in decision.message


def test_zero_skips_even_with_cuda():
    decision = build.decide({"REPA_FAST_BUILD_CUDA": "0"}, **HAVE_ALL)
    assert not decision.build and not decision.error and "REPA_FAST_BUILD_CUDA=0" in decision.message


def test_one_builds_without_a_device_and_fails_without_a_toolkit():
    assert build.decide({"REPA_FAST_BUILD_CUDA": "1"}, **dict(HAVE_ALL, cuda_available=False)).build
    decision = build.decide({"REPA_FAST_BUILD_CUDA": "1"}, **dict(HAVE_ALL, cuda_home=None))
    assert decision.error and "cannot be built" in decision.message and "CUDA_HOME" in decision.message


def test_other_values_are_errors():
    decision = build.decide({"REPA_FAST_BUILD_CUDA": "yes"}, **HAVE_ALL)
    assert decision.error and "must be 0 or 1, got 'yes'" in decision.message


def run_setup(value):
    env = dict(os.environ, REPA_FAST_BUILD_CUDA=value)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_setup_py_reports_its_decision():
    """setup.py itself, on this machine: the same decision as build.decide, said on stderr."""
    from torch.utils import cpp_extension
    expected = build.decide({}, torch_version=torch.__version__, torch_cuda=torch.version.cuda,
                            cuda_available=torch.cuda.is_available(), cuda_home=cpp_extension.CUDA_HOME)
    done = run_setup("")
    assert done.returncode == 0 and done.stdout.strip() == "repa-fast", done.stderr
    assert f"repa-fast: {expected.message}" in done.stderr
    done = run_setup("0")
    assert done.returncode == 0 and "REPA_FAST_BUILD_CUDA=0: installing without the CUDA extension" in done.stderr
    done = run_setup("maybe")
    assert done.returncode != 0 and "REPA_FAST_BUILD_CUDA must be 0 or 1, got 'maybe'" in done.stderr


def test_setup_and_runtime_agree_on_names():
    assert cuda_backend.PREBUILT == build.EXTENSION
    assert set(build.HOST_EMULATION_SOURCES) - {"host_launchers.cpp"} <= set(build.SOURCES)
    assert all((ROOT / "csrc" / s).is_file() for s in build.SOURCES + build.HOST_EMULATION_SOURCES)


# ---------------------------------------------------------------- at run time

NVCC_LOG = """Error building extension 'repa_fast_cuda': [1/6] /usr/local/cuda/bin/nvcc -Werror=all -c /src/csrc/manifold.cu
FAILED: manifold.cuda.o
/usr/local/cuda/bin/nvcc -DTORCH_EXTENSION_NAME=repa_fast_cuda -c /src/csrc/manifold.cu -o manifold.cuda.o
/src/csrc/manifold.cu(42): error: identifier "tile" is undefined
/src/csrc/manifold.cu(57): error: expected a ";"
2 errors detected in the compilation of "/src/csrc/manifold.cu".
ninja: build stopped: subcommand failed.
"""


@pytest.mark.parametrize("log, first", [
    (NVCC_LOG, '/src/csrc/manifold.cu(42): error: identifier "tile" is undefined'),
    ("[1/2] c++ -c ops.cpp\nFAILED: ops.o\n/src/csrc/ops.cpp:3:10: fatal error: torch/library.h: No such file\n"
     "compilation terminated.", "/src/csrc/ops.cpp:3:10: fatal error: torch/library.h: No such file"),
    ("x.cpp: In function 'f':\nx.cpp:7:5: error: 'g' was not declared in this scope", "x.cpp:7:5: error: 'g' was not declared in this scope"),
    ("nvcc fatal   : Unsupported gpu architecture 'compute_20'", "nvcc fatal   : Unsupported gpu architecture 'compute_20'"),
    ("Ninja is required to load C++ extensions (pip install ninja to get it)",
     "Ninja is required to load C++ extensions (pip install ninja to get it)"),
])
def test_first_compiler_error_is_the_line_that_says_what_broke(log, first):
    assert cuda_backend.first_compiler_error(log) == first


def test_failed_build_warns_once_with_the_first_error_and_keeps_other_backends(monkeypatch):
    def failing_build():
        raise RuntimeError(NVCC_LOG)
    monkeypatch.setattr(cuda_backend, "_prebuilt_library", lambda: None)
    monkeypatch.setattr(cuda_backend, "_jit_build", failing_build)
    monkeypatch.setattr(cuda_backend, "_load", cuda_backend._load_extension)  # as if CUDA were there
    monkeypatch.setattr(cuda_backend, "_reason", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reasons = {cuda_backend.unavailable_reason() for _ in range(3)}
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert 'manifold.cu(42): error: identifier "tile" is undefined' in str(caught[0].message)
    (reason,) = reasons
    assert reason.startswith("the CUDA extension is not built and JIT-building it failed: ")
    assert reason.endswith('/src/csrc/manifold.cu(42): error: identifier "tile" is undefined')


def test_prebuilt_library_is_used_unless_csrc_was_edited_since(monkeypatch, tmp_path):
    library = tmp_path / "_cuda.so"
    library.write_bytes(b"")
    spec = importlib.util.spec_from_file_location(build.EXTENSION, library)
    monkeypatch.setattr(cuda_backend.importlib.util, "find_spec", lambda name: spec if name == build.EXTENSION else None)
    csrc = ROOT / "csrc"   # the library's sources and headers (not the host stand-ins)
    watched = [csrc / s for s in build.SOURCES] + [*csrc.glob("*.h"), *csrc.glob("*.cuh")]
    newest = max(path.stat().st_mtime for path in watched)
    os.utime(library, (newest + 10, newest + 10))
    assert cuda_backend._prebuilt_library() == str(library)
    os.utime(library, (newest - 10, newest - 10))
    assert cuda_backend._prebuilt_library() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: test_cuda_backend.py runs the extension")
def test_without_cuda_the_backend_refuses_and_says_why():
    reason = cuda_backend.unavailable_reason()
    assert reason and ("built without CUDA" in reason or "no CUDA device" in reason)
    assert "cuda" not in rf.available_backends() and "cuda" not in rf.available_backends("cpu")
    inputs = {"projected": torch.randn(1, 3, 4), "target": torch.randn(1, 3, 4)}
    with pytest.raises(rf.BackendUnavailableError, match=re.escape(reason)):
        rf.manifold_loss(**inputs, backend="cuda")
