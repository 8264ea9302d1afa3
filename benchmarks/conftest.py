"""pytest-benchmark suite options: which device, cases, backends and dtype. The case table is
repa_fast.cli.bench_cases, the one `repa-fast bench` uses.

    pytest benchmarks --benchmark-only                          # cpu preset on CPU, gpu preset on CUDA
    pytest benchmarks --benchmark-only --bench-cases design     # DESIGN.md §5
    pytest benchmarks --benchmark-disable --bench-cases quick   # every quick case once, untimed (CI)
"""
import pytest

from repa_fast.cli.bench import DTYPES, resolve_device, resolve_dtype
from repa_fast.cli.bench_cases import bench_backends, select_cases


def pytest_addoption(parser):
    group = parser.getgroup("repa-fast", "repa-fast benchmark cases")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")
    group.addoption("--bench-cases", default=None,
                    help="presets, case names or patterns, comma-separated, as `repa-fast bench --cases` "
                         "(default: gpu on cuda, cpu on cpu)")
    group.addoption("--bench-backends", default=None,
                    help="comma-separated rows (default: the SimpleTuner baselines, every backend that runs "
                         "on the device, and torch.compile)")
    group.addoption("--bench-dtype", default="auto", choices=("auto", *DTYPES),
                    help="activation dtype (default: bf16 on cuda, fp32 on cpu)")


def pytest_generate_tests(metafunc):
    if not {"case", "backend"} <= set(metafunc.fixturenames):
        return
    config = metafunc.config
    device = resolve_device(config.getoption("--bench-device"))
    spec = config.getoption("--bench-cases") or ("gpu" if device.type == "cuda" else "cpu")
    requested = config.getoption("--bench-backends")
    metafunc.parametrize("case", select_cases(spec), ids=lambda case: case.name)
    metafunc.parametrize("backend", bench_backends(device, requested.split(",") if requested else None))


@pytest.fixture(scope="session")
def bench_device(pytestconfig):
    return resolve_device(pytestconfig.getoption("--bench-device"))


@pytest.fixture(scope="session")
def bench_dtype(pytestconfig, bench_device):
    return resolve_dtype(pytestconfig.getoption("--bench-dtype"), bench_device)
