"""Tests of the benchmark tooling (never a timing gate): the `repa-fast bench` runner on the
tiniest CPU cases writes its table, JSON, CSV and plot; the SimpleTuner baseline computes the
reference's loss and gradients; compile rows time the compiled step; unreliable rows are
rerun, then marked; the pytest-benchmark suite in benchmarks/ runs its quick preset; the case
table matches DESIGN.md §5."""
import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repa_fast.cli import bench, main
from repa_fast.cli.bench_cases import (BASELINE, BASELINE_COMPILED, COMPILED, PRESETS, Workload, _loss_fn,
                                       bench_backends, compile_count, make_workload, select_cases)
from parity import PROJECTION_ARGS, outputs_and_grads, projection_inputs, rel_err

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
    backends = (BASELINE, "torch", COMPILED)  # simpletuner.compile: see test_compile_rows_time_the_compiled_step
    assert run_bench("--device", "cpu", "--quick", "--cases", ",".join(TINY_CASES), "--backends", ",".join(backends),
                     "--out", str(tmp_path)) == 0
    table = capsys.readouterr().out

    results = json.loads((tmp_path / "results.json").read_text())
    meta, rows = results["meta"], results["results"]
    assert meta["torch"] == torch.__version__ and meta["dtype"] == "fp32" and meta["peak_tflops"] > 0
    assert [(r["case"], r["backend"]) for r in rows] == [(c, b) for c in TINY_CASES for b in backends]
    for r in rows:
        assert r["error"] == "", r
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["samples"] >= 5
        assert r["floor_ms"] > 0 and (r["floor_fraction"] is None or 0 < r["floor_fraction"] <= 1)
        assert r["device"] == meta["device"] and r["timestamp"] == meta["timestamp"]
        assert r["speedup_vs_simpletuner"] > 0 and r["speedup_vs_torch"] > 0 and r["speedup_vs_compile"] > 0
        assert (r["compile_s"] is not None) == (r["backend"] == COMPILED)
        assert r["warning"] == "" or r["warning"].startswith(bench.UNRELIABLE)
        assert f"| {r['case']} | {r['shape']} | {r['backend']} |" in table
    # The memory probe sees what the step allocates: at least the gradient of the (1, 64, 384) fp32 input.
    manifold_torch = rows[1]
    assert manifold_torch["backend"] == "torch" and manifold_torch["peak_mib"] >= 64 * 384 * 4 / 2 ** 20
    assert {r["speedup_vs_torch"] for r in rows if r["backend"] == "torch"} == {1.0}
    assert {r["speedup_vs_simpletuner"] for r in rows if r["backend"] == BASELINE} == {1.0}
    assert "| x simpletuner |" in table and "USDT" not in table

    with open(tmp_path / "results.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert list(lines[0]) == list(bench.CSV_FIELDS)
    assert [(line["case"], line["backend"], line["shape"]) for line in lines] == \
        [(r["case"], r["backend"], r["shape"]) for r in rows]
    assert all(line["triton"] == meta["triton"] and float(line["median_ms"]) > 0 for line in lines)

    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_default_rows_are_the_baselines_the_backends_and_torch_compile():
    assert bench_backends(torch.device("cpu")) == [BASELINE, BASELINE_COMPILED, "torch", COMPILED]


@pytest.mark.parametrize("op, hidden, target", [
    ("urepa", (2, 19, 5, 5), (2, 9, 11)),     # a feature map aligned down to the target's 3 x 3 grid
    ("repa", (2, 30, 21), (2, 16, 13)),       # 30 tokens (no grid) resampled to 16
    ("repa", (1, 7, 12), (1, 7, 10)),         # equal counts
])
def test_simpletuner_baseline_matches_the_float64_reference(op, hidden, target):
    """The baseline (fp32, B x N x N similarities, plain autograd) gives the reference's loss
    and gradients (DESIGN.md §4, fp32) on targets close to the projection, as in training."""
    feature_map = len(hidden) == 4
    tokens = hidden[2:] if feature_map else hidden[1]
    inputs = projection_inputs(hidden[0], tokens, hidden[-3] if feature_map else hidden[2], target[1], target[2],
                               feature_map=feature_map)

    def loss(backend, **kw):
        return _loss_fn(op, backend)(*(kw[name] for name in ("hidden", "target", *PROJECTION_ARGS[1:])))

    reference = outputs_and_grads(loss, {k: v.double() for k, v in inputs.items()}, PROJECTION_ARGS, backend="torch")
    baseline = outputs_and_grads(loss, inputs, PROJECTION_ARGS, backend=BASELINE)
    for key, ref in reference.items():
        assert rel_err(baseline[key], ref) <= 1e-5, (key, rel_err(baseline[key], ref))


@pytest.mark.parametrize("noise", [1.0, 0.05])
def test_simpletuner_baseline_manifold_matches_the_float64_reference(noise):
    projected = torch.randn(2, 13, 11, dtype=torch.float64)
    target = projected + noise * torch.randn_like(projected)
    inputs = {"projected": projected.float(), "target": target.float()}
    loss = lambda backend, projected, target: _loss_fn("manifold", backend)(projected, target)  # noqa: E731
    reference = outputs_and_grads(loss, {k: v.double() for k, v in inputs.items()}, ["projected"], backend="torch")
    baseline = outputs_and_grads(loss, inputs, ["projected"], backend=BASELINE)
    for key, ref in reference.items():
        assert rel_err(baseline[key], ref) <= 1e-5, (key, rel_err(baseline[key], ref))


@pytest.mark.parametrize("row", [COMPILED, BASELINE_COMPILED])
def test_compile_rows_time_the_compiled_step(row):
    """A torch.compile row's timed steps run the graph compiled in its warm-up: no compile (no
    guard failure, no lazily compiled backward) happens while they are timed; and the graph is
    the one a trainer gets by compiling the loss by hand: one graph, same loss and gradients."""
    from torch._dynamo.utils import counters

    case = select_cases("manifold.n64-e384.b1")[0]
    cpu = torch.device("cpu")
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    workload = make_workload(case, row, cpu, torch.float32)
    assert counters["stats"]["unique_graphs"] == graphs + 1 and sum(counters["graph_break"].values()) == breaks
    compiled = compile_count()
    timing = bench.timed(workload, cpu, quick=True)
    assert timing.recompiles == 0 and compile_count() == compiled
    assert not [p for p in timing.problems(cpu) if "recompiled" in p]
    projected, target = (torch.randn(1, 64, 384) for _ in range(2))
    eager = _loss_fn("manifold", "torch" if row == COMPILED else BASELINE)
    hand = torch.compile(eager)
    for fn in (eager, hand):
        z = projected.clone().requires_grad_()
        loss = fn(z, target)
        loss.backward()
        if fn is eager:
            expected = (loss.detach(), z.grad)
        else:
            assert torch.allclose(loss, expected[0], rtol=1e-5) and torch.allclose(z.grad, expected[1], rtol=1e-4,
                                                                                   atol=1e-9)


def test_a_recompile_during_timing_is_counted_and_marks_the_measurement():
    torch._dynamo.reset()
    scale = itertools.cycle((1, 2))  # an int that alternates: dynamic=False compiles a graph for each value
    fn = torch.compile(lambda x, k: x * k, dynamic=False)
    x = torch.randn(3)
    workload = Workload(run=lambda: fn(x, next(scale)), clear=lambda: None)
    timing = bench.timed(workload, torch.device("cpu"), quick=True)
    assert timing.recompiles >= 1
    assert any("recompiled" in p for p in timing.problems(torch.device("cpu")))


def test_unreliable_measurement_is_rerun_then_marked(monkeypatch):
    case = select_cases("manifold.n64-e384.b1")[0]
    cpu = torch.device("cpu")
    steady, spread = bench.Timing([1.0] * 10, 0.0, 0), bench.Timing([1.0] * 5 + [3.0] * 5, 0.0, 0)
    loaded = bench.Timing([0.9] * 10, 64.0, 0)
    assert steady.problems(cpu) == []
    assert spread.problems(cpu) == ["spread p80/p20 3.0x"]
    assert loaded.problems(cpu) == [f"other processes kept 64.0 of {len(bench._usable_cpus())} cores busy"]

    for measurements, warning, median in (([spread, steady], "", 1.0), ([spread, loaded], "other processes", 0.9)):
        calls = iter(measurements)
        monkeypatch.setattr(bench, "timed", lambda *args: next(calls))
        row = bench.measure(case, "torch", cpu, torch.float32, quick=True)
        assert next(calls, None) is None  # measured twice
        assert row.median_ms == median  # the faster measurement kept
        assert (row.warning.startswith(f"{bench.UNRELIABLE}, measured twice") and warning in row.warning
                if warning else row.warning == "")


def test_a_row_faster_than_its_floor_shows_no_floor_fraction():
    case = select_cases("manifold.n64-e384.b1")[0]
    rows = [bench.Row(case.name, case.op, "torch", "fp32", case.shape, median_ms=1.0, p20_ms=1.0, p80_ms=1.0)]
    floor_peak = case.gemm_flops() / 1e9  # TFLOP/s at which the floor is exactly 1 ms
    bench.fill_derived(rows, {case.name: case}, floor_peak)
    assert rows[0].floor_fraction == pytest.approx(1.0) and bench.floor_note(rows[0], floor_peak) == ""
    bench.fill_derived(rows, {case.name: case}, floor_peak / 1.49)  # a peak measured 1.49x too slow
    assert rows[0].floor_fraction is None and "149%" not in bench.markdown_table(rows, floor_peak / 1.49)
    assert "no floor: ran faster than its GEMMs" in bench.markdown_table(rows, floor_peak / 1.49)


def test_help_explains_the_columns(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "floor the fraction of the row's median that the case's unavoidable GEMM work takes" in text
    assert "x simpletuner speedup over the `simpletuner` row" in text and "UNRELIABLE" in text


def test_failing_backend_gives_an_error_row(tmp_path, capsys):
    assert run_bench("--device", "cpu", "--quick", "--cases", TINY_CASES[0], "--backends", "torch,cuda",
                     "--out", str(tmp_path)) == 0
    torch_row, cuda_row = json.loads((tmp_path / "results.json").read_text())["results"]
    assert torch_row["error"] == "" and torch_row["median_ms"] > 0
    assert "cuda" in cuda_row["error"] and cuda_row["median_ms"] is None
    assert cuda_row["error"] in capsys.readouterr().out


def test_cpu_memory_probe_sees_the_peak_of_live_allocations(capfd):
    def two_then_one():
        a = torch.empty(2 ** 20)  # 4 MiB
        b = torch.empty(2 ** 20)
        del a, b
        torch.empty(2 ** 20)
        os.write(2, b"a warning of the step itself\n")

    assert bench._cpu_allocation_peak(two_then_one) == 8 * 2 ** 20
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "profiler_stop" not in err  # the profiler's own lines only
    assert "a warning of the step itself" in err


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
    # simpletuner.compile would double the compiles; test_compile_rows_time_the_compiled_step runs it.
    backends = [b for b in bench_backends(torch.device("cpu")) if b != BASELINE_COMPILED]
    expected = len(PRESETS["quick"]()) * len(backends)
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable", "--bench-device", "cpu", "--bench-cases", "quick",
                           "--bench-backends", ",".join(backends)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{expected} passed" in proc.stdout


def test_makefile_reinstalls_torch_when_torch_spec_changes_and_picks_the_bench_device(tmp_path):
    """With a stand-in venv whose python and repa-fast only log their arguments: the first
    `make test` installs TORCH_SPEC, the same spec again installs nothing, another spec
    reinstalls torch; `make bench` leaves the device to the bench (cuda when present) unless
    DEVICE is given."""
    bin_dir, log = tmp_path / "venv" / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "repa-fast"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        (bin_dir / tool).chmod(0o755)

    def make(*args):
        log.write_text("")
        subprocess.run(["make", "-s", "-C", str(REPO), f"VENV={tmp_path / 'venv'}", *args], check=True,
                       capture_output=True, timeout=60)
        return log.read_text().splitlines()

    first = make("test", "TORCH_SPEC=torch==2.13.0")
    assert "python -m pip install -q torch==2.13.0" in first and first[-1] == "python -m pytest -q tests"
    assert make("test", "TORCH_SPEC=torch==2.13.0") == ["python -m pytest -q tests"]
    changed = make("test", "TORCH_SPEC=torch")
    assert changed.index("python -m pip uninstall -q -y torch") < changed.index("python -m pip install -q torch")
    assert "python -m pip install -q -e .[test,bench]" in changed
    assert make("bench", "TORCH_SPEC=torch") == ["repa-fast bench --quick --out bench_out"]
    assert make("bench", "TORCH_SPEC=torch", "DEVICE=cpu") == ["repa-fast bench --device cpu --quick --out bench_out"]


def test_gpu_check_prints_versions_first_benches_every_row_and_fits_8_minutes():
    import re

    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    stages = re.findall(r"^stage (\w+) (\d+) (.*)$", script, flags=re.M)
    assert [name for name, _, _ in stages] == ["versions", "build", "tests", "bench"]
    versions = script[script.index("stage versions"):script.index("stage build")]
    assert all(word in versions for word in ("torch.__version__", "triton.__version__", "torch.version.cuda", "nvcc"))
    bench_stage = script[script.index("stage bench"):script.index("python3 - ")]
    assert "bench --device cuda" in bench_stage and "--backends" not in bench_stage  # the baselines included
    kill_after = int(re.search(r"--kill-after=(\d+)", script).group(1))
    summary_timeout = int(re.search(r"timeout=(\d+)\)", script).group(1))
    assert sum(int(limit) + kill_after for _, limit, _ in stages) + summary_timeout < 8 * 60
