"""Smoke tests of the benchmark tooling (never a timing gate): the `repa-fast bench` runner on the
tiniest CPU cases writes its table, JSON, CSV and plot; the pytest-benchmark suite in
benchmarks/ runs its quick preset; the case table matches DESIGN.md §5."""
import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repa_fast.cli import bench
from repa_fast.cli.bench_cases import COMPILED, PRESETS, Workload, bench_backends, select_cases

REPO = Path(__file__).resolve().parents[1]
TINY_CASES = ("manifold.n64-e384.b1", "urepa.sd15-512.dinov2-s-224.b1")


@pytest.fixture(autouse=True)
def one_thread():
    """Smoke, not timing: one thread keeps OpenMP from stalling when CI's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_bench(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(list(argv)))


def test_runner_quick_cpu_writes_table_json_csv_and_plot(tmp_path, capsys):
    assert run_bench("--device", "cpu", "--quick", "--cases", ",".join(TINY_CASES), "--out", str(tmp_path)) == 0
    table = capsys.readouterr().out

    results = json.loads((tmp_path / "results.json").read_text())
    meta, rows = results["meta"], results["results"]
    assert meta["torch"] == torch.__version__ and meta["dtype"] == "fp32" and meta["peak_tflops"] > 0
    assert [(r["case"], r["backend"]) for r in rows] == [(c, b) for c in TINY_CASES for b in ("torch", COMPILED)]
    for r in rows:
        assert r["error"] == "", r
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["samples"] >= 5
        assert 0 < r["floor_fraction"] and r["floor_ms"] > 0
        assert r["device"] == meta["device"] and r["timestamp"] == meta["timestamp"]
        assert r["speedup_vs_torch"] > 0 and r["speedup_vs_compile"] > 0
        assert (r["compile_s"] is not None) == (r["backend"] == COMPILED)
        assert f"| {r['case']} | {r['shape']} | {r['backend']} |" in table
    # The memory probe sees what the step allocates: at least the gradient of the (1, 64, 384) fp32 input.
    manifold_torch = rows[0]
    assert manifold_torch["peak_mib"] >= 64 * 384 * 4 / 2 ** 20
    assert {r["speedup_vs_torch"] for r in rows if r["backend"] == "torch"} == {1.0}

    with open(tmp_path / "results.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert list(lines[0]) == list(bench.CSV_FIELDS)
    assert [(line["case"], line["backend"], line["shape"]) for line in lines] == \
        [(r["case"], r["backend"], r["shape"]) for r in rows]
    assert all(line["triton"] == meta["triton"] and float(line["median_ms"]) > 0 for line in lines)

    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_failing_backend_gives_an_error_row(tmp_path, capsys):
    assert run_bench("--device", "cpu", "--quick", "--cases", TINY_CASES[0], "--backends", "torch,cuda",
                     "--out", str(tmp_path)) == 0
    torch_row, cuda_row = json.loads((tmp_path / "results.json").read_text())["results"]
    assert torch_row["error"] == "" and torch_row["median_ms"] > 0
    assert "cuda" in cuda_row["error"] and cuda_row["median_ms"] is None
    assert cuda_row["error"] in capsys.readouterr().out


def test_cpu_memory_probe_sees_the_peak_of_live_allocations():
    def two_then_one():
        a = torch.empty(2 ** 20)  # 4 MiB
        b = torch.empty(2 ** 20)
        del a, b
        torch.empty(2 ** 20)

    assert bench._cpu_allocation_peak(two_then_one) == 8 * 2 ** 20


@pytest.mark.gpu
def test_cuda_timing_and_memory_probe():
    device = torch.device("cuda")
    held = []

    def two_then_one():
        held[:] = [torch.empty(2 ** 20, device=device), torch.empty(2 ** 20, device=device)]  # 4 MiB each
        held[:] = [torch.empty(2 ** 20, device=device)]

    workload = Workload(run=two_then_one, clear=held.clear)
    assert bench.peak_memory_bytes(workload, device) == 12 * 2 ** 20  # the third lands before two are freed
    samples = bench.time_step(workload.step, device, quick=True)
    assert len(samples) >= bench.MIN_SAMPLES and min(samples) > 0


def test_bad_arguments_are_rejected(capsys):
    assert run_bench("--device", "cpu", "--cases", "no-such-case") == 2
    assert run_bench("--device", "cpu", "--backends", "numpy") == 2
    err = capsys.readouterr().err
    assert "no-such-case" in err and "numpy" in err


def test_design_preset_is_design_section_5():
    """The §5 table's shapes, and its manifold floors at 797 TFLOP/s (the repa floors there are
    the GEMMs measured alone, a little above the flop count)."""
    cases = {c.name: c for c in select_cases("design")}
    shapes = [c.shape for c in cases.values()]
    assert shapes == ["B4 S4096 D3072 -> N4096 E1536", "B256 S256 D1152 -> N256 E768",
                      "B4 S4096 D3072 -> N1369 E1536", "B8 1280x32x32 -> N1369 E1536", "B4 N1369 E1536",
                      "B16 N1024 E1536", "B4 N4096 E1536", "B2 N16384 E1024"]
    floors_ms = {"manifold.n1369-e1536.b4": 0.09, "manifold.n1024-e1536.b16": 0.19,
                 "manifold.n4096-e1536.b4": 0.48, "manifold.n16384-e1024.b2": 0.43}
    for name, floor in floors_ms.items():
        assert cases[name].gemm_flops() / (bench.H100_BF16_TFLOPS * 1e9) == pytest.approx(floor, rel=0.05)


def test_pytest_benchmark_suite_runs_its_quick_preset():
    expected = len(PRESETS["quick"]()) * len(bench_backends(torch.device("cpu")))
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable", "--bench-device", "cpu", "--bench-cases", "quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{expected} passed" in proc.stdout
