"""benchmark the losses (fwd+bwd) on every backend and torch.compile: table, JSON, CSV, plot

`repa-fast bench --device cpu --quick` measures the quick preset; `--cases` takes presets (see
`repa_fast.cli.bench_cases.PRESETS`), case names or patterns; `--list` shows them. Method
(BENCHMARKS.md has it in full):
- time: CUDA events around each step, L2 flushed before each, on a GPU; `time.perf_counter`
  around each step on a CPU; median and p20/p80 of the samples, after warm-up;
- memory: peak allocation above the inputs during one step, gradients included. CUDA: the
  caching allocator's `max_memory_allocated` after a reset. CPU: the running sum of the
  allocations and frees torch's CPU allocator reports to the profiler (what torch allocates;
  not BLAS / OpenMP scratch);
- floor: the case's unavoidable GEMM flops (`Case.gemm_flops`) at the device's peak: the
  stated 797 TFLOP/s bf16 of an H100 (DESIGN.md §5), otherwise a dense matmul measured here in
  the benchmark's dtype.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .bench_cases import (COMPILED, PRESETS, Case, Workload, all_cases, bench_backends, default_preset,
                          make_workload, select_cases, synchronize)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
H100_BF16_TFLOPS = 797.0  # dense bf16 matmul measured on one H100 (DESIGN.md §5, GPU_LESS.md §4)
CSV_FIELDS = ("case", "op", "backend", "dtype", "shape", "device", "torch", "triton", "timestamp", "median_ms",
              "p20_ms", "p80_ms", "samples", "peak_mib", "speedup_vs_torch", "speedup_vs_compile", "floor_ms",
              "floor_fraction", "compile_s", "error")
# Seconds of timed steps per measurement (after warm-up), and the bounds on their number.
TIMED_SECONDS, TIMED_SECONDS_QUICK = 1.0, 0.3
MIN_SAMPLES, MAX_SAMPLES = 5, 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated presets, case names or patterns (default: design on cuda, cpu on "
                             "cpu; quick with --quick); e2e-cpu / e2e-gpu: the whole regularizer step "
                             "(decode, encode, loss), --device meta counts its flops")
    parser.add_argument("--quick", action="store_true", help="the quick preset and shorter timing")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated subset of torch, triton, cuda, {COMPILED} (default: every backend "
                             f"that runs on the device, plus {COMPILED}; the Triton interpreter is never timed "
                             "unless named)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="activation dtype (default: bf16 on cuda, fp32 on cpu); parameters stay fp32")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for the GEMM floor (default: 797 on an H100 in bf16/fp16, else measured)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; measurements not started by then get a 'skipped' row")
    parser.add_argument("--out", default=None, help="folder for results.json, results.csv and plot.png")
    parser.add_argument("--list", action="store_true", help="list presets and cases, then exit")


@dataclass
class Row:
    case: str
    op: str
    backend: str
    dtype: str
    shape: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    samples: int = 0
    peak_mib: Optional[float] = None
    speedup_vs_torch: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    floor_ms: Optional[float] = None
    floor_fraction: Optional[float] = None
    compile_s: Optional[float] = None
    error: str = ""
    meta: Dict[str, str] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------- measuring

def time_step(step: Callable[[], None], device: torch.device, quick: bool) -> List[float]:
    """Milliseconds of each timed call of `step`, after warm-up; as many calls as fit the budget."""
    step()  # warm-up (caches, lazy init, autotuning)
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-6)
    count = int(min(MAX_SAMPLES, max(MIN_SAMPLES, (TIMED_SECONDS_QUICK if quick else TIMED_SECONDS) / once)))
    if device.type != "cuda":
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            samples.append((time.perf_counter() - start) * 1e3)
        return samples
    # As triton.testing.do_bench: events around each call, the L2 cache flushed before each.
    with torch.cuda.device(device):  # events record on the current device's stream
        flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for begin, end in events:
            flush.zero_()
            begin.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) for begin, end in events]


def _cpu_allocation_peak(run: Callable[[], None]) -> int:
    """Peak of the running sum of the allocations (+) and frees (-) that torch's CPU allocator
    reports to the profiler while `run` executes, in bytes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_bytes(workload: Workload, device: torch.device) -> int:
    """Peak allocation above the inputs during one fwd+bwd (gradients included)."""
    workload.clear()
    synchronize(device)
    if device.type != "cuda":
        return _cpu_allocation_peak(workload.run)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    workload.run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The peak the floor is computed at, and where it comes from."""
    if device.type == "cuda" and "H100" in torch.cuda.get_device_name(device) and dtype != torch.float32:
        return H100_BF16_TFLOPS, "stated: 797 TFLOP/s, dense bf16 matmul on one H100 (DESIGN.md §5)"
    n = 8192 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(time_step(lambda: a @ b, device, quick=True)) / 1e3
    return 2 * n ** 3 / best / 1e12, f"measured: best {n}x{n}x{n} {_dtype_name(dtype)} matmul here"


def resolve_device(name: Optional[str]) -> torch.device:
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (or cuda:N), got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on a GPU (what a trainer's autocast gives the loss), fp32 on a CPU."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, dt in DTYPES.items() if dt == dtype)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def measure(case: Case, backend: str, device: torch.device, dtype: torch.dtype, quick: bool) -> Row:
    """One (case, backend) row; a backend that fails on the case gives an error row."""
    row = Row(case.name, case.op, backend, _dtype_name(dtype), case.shape)
    try:
        workload = make_workload(case, backend, device, dtype)
        row.compile_s = workload.compile_s
        samples = sorted(time_step(workload.step, device, quick))
        row.samples = len(samples)
        row.median_ms, row.p20_ms, row.p80_ms = (_quantile(samples, q) for q in (0.5, 0.2, 0.8))
        row.peak_mib = peak_memory_bytes(workload, device) / 2 ** 20
    except Exception as err:  # noqa: BLE001 - any failure of a backend is a result to report
        message = str(err).strip().splitlines()
        row.error = f"{type(err).__name__}: {message[0] if message else ''}"[:300]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _quantile(ordered: List[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def fill_derived(rows: List[Row], cases: Dict[str, Case], peak_tflops: float) -> None:
    """Speedups over the torch backend and torch.compile of the same case, and the floor."""
    medians = {(r.case, r.backend): r.median_ms for r in rows if r.median_ms}
    for r in rows:
        r.floor_ms = cases[r.case].gemm_flops() / (peak_tflops * 1e12) * 1e3
        if not r.median_ms:
            continue
        r.floor_fraction = r.floor_ms / r.median_ms
        for attr, base in (("speedup_vs_torch", "torch"), ("speedup_vs_compile", COMPILED)):
            if (r.case, base) in medians:
                setattr(r, attr, medians[(r.case, base)] / r.median_ms)


# ---------------------------------------------------------------------------- output

def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def markdown_table(rows: List[Row]) -> str:
    lines = ["| case | shape | backend | median ms | p20-p80 ms | peak MiB | x torch | x compile | floor | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spread = f"{_ms(r.p20_ms)}-{_ms(r.p80_ms)}" if r.median_ms else ""
        note = r.error or (f"compile {r.compile_s:.1f} s" if r.compile_s is not None else "")
        lines.append(f"| {r.case} | {r.shape} | {r.backend} | {_ms(r.median_ms) if r.median_ms else ''} | {spread} | "
                     f"{_fmt(r.peak_mib, '.1f')} | {_fmt(r.speedup_vs_torch, '.2f')} | "
                     f"{_fmt(r.speedup_vs_compile, '.2f')} | "
                     f"{'' if r.floor_fraction is None else f'{r.floor_fraction:.0%}'} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def _round(value):
    return float(f"{value:.5g}") if isinstance(value, float) else value


def write_results(out: Path, rows: List[Row], meta: Dict[str, object]) -> None:
    """results.json ({"meta", "results"}) and results.csv (one line per row, meta repeated)."""
    out.mkdir(parents=True, exist_ok=True)
    records = [{**{k: _round(v) for k, v in asdict(r).items() if k != "meta"}, **r.meta} for r in rows]
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": records}, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def write_plot(path: Path, rows: List[Row]) -> str:
    """Speedup over the torch backend and peak memory per case, one bar per backend. Returns
    what was done, for the log (matplotlib is optional: without it the plot is skipped)."""
    try:
        import matplotlib
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'repa-fast[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    by_key = {(r.case, r.backend): r for r in rows}
    nan = float("nan")
    width = 0.8 / len(backends)
    fig, (ax_speed, ax_mem) = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(cases) + 2), 7.5), sharex=True)
    for i, backend in enumerate(backends):
        xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(cases))]
        found = [by_key.get((c, backend)) for c in cases]
        ax_speed.bar(xs, [r.speedup_vs_torch or nan if r else nan for r in found], width, label=backend)
        ax_mem.bar(xs, [r.peak_mib or nan if r else nan for r in found], width, label=backend)
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set_ylabel("speedup over torch backend (x)")
    ax_speed.legend(fontsize=8)
    ax_mem.set_ylabel("peak MiB above inputs")
    for ax in (ax_speed, ax_mem):
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)
    ax_mem.set_xticks(range(len(cases)), cases, rotation=35, ha="right", fontsize=7)
    fig.suptitle(f"repa-fast fwd+bwd, {rows[0].meta.get('device', '')} ({rows[0].dtype}); missing bar = error",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


# ---------------------------------------------------------------------------- command

def run(args: argparse.Namespace) -> int:
    if args.cases and args.cases.startswith("e2e"):  # the whole regularizer step: bench_e2e.py
        from .bench_e2e import run_e2e
        return run_e2e(args)
    if args.list:
        for name, preset in PRESETS.items():
            print(f"preset {name}: {len(preset())} cases")
        for case in all_cases():
            print(f"{case.name:40s} {case.op:8s} {case.shape:36s} {case.about}")
        return 0
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        cases = select_cases(args.cases or default_preset(device, args.quick))
        backends = bench_backends(device, args.backends.split(",") if args.backends else None)
    except ValueError as err:
        print(f"repa-fast bench: {err}", file=sys.stderr)
        return 2

    peak, peak_source = (args.peak_tflops, "given: --peak-tflops") if args.peak_tflops else device_peak_tflops(device, dtype)
    meta = {"device": device_name(device), "torch": torch.__version__, "triton": _version("triton"),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": _dtype_name(dtype), "peak_tflops": round(peak, 3), "peak_source": peak_source,
            "python": platform.python_version(), "argv": sys.argv[1:], "backends": backends,
            "load_average_1min": round(os.getloadavg()[0], 2)}  # CPU timings mean little on a busy machine
    row_meta = {k: str(meta[k]) for k in ("device", "torch", "triton", "timestamp")}
    print(f"# repa-fast bench: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"{meta['dtype']}, {meta['timestamp']}, load average {meta['load_average_1min']}\n"
          f"# floor at {peak:.3g} TFLOP/s ({peak_source})", flush=True)

    out = Path(args.out) if args.out else None
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    by_name = {c.name: c for c in cases}
    rows: List[Row] = []
    # Eager backends on every case first, torch.compile (slow to compile) last, so a time budget
    # cuts the compile rows, not the backends' own.
    order = [b for b in backends if b != COMPILED] + [b for b in backends if b == COMPILED]
    for backend in order:
        for case in cases:
            if deadline is not None and time.monotonic() > deadline:
                row = Row(case.name, case.op, backend, meta["dtype"], case.shape, error="skipped: --time-budget spent")
            else:
                row = measure(case, backend, device, dtype, args.quick)
            row.meta = row_meta
            rows.append(row)
            status = row.error or f"{_ms(row.median_ms)} ms, {row.peak_mib:.1f} MiB"
            print(f"  {case.name} [{backend}]: {status}", file=sys.stderr, flush=True)
            if out:  # after every row, so a run cut short keeps what it measured
                fill_derived(rows, by_name, peak)
                write_results(out, rows, meta)
    rows.sort(key=lambda r: (list(by_name).index(r.case), order.index(r.backend)))
    fill_derived(rows, by_name, peak)
    print(markdown_table(rows), flush=True)
    if out:
        write_results(out, rows, meta)
        print(write_plot(out / "plot.png", rows))
    return 0
