"""benchmark the losses (fwd+bwd) against the SimpleTuner baseline: table, JSON, CSV, plot

`repa-fast bench --device cpu --quick` measures the quick preset; `--cases` takes presets (see
`repa_fast.cli.bench_cases.PRESETS`), case names or patterns; `--list` shows them. Rows per
case: `simpletuner` (SimpleTuner's math as trainers run it, plain torch), `simpletuner.compile`,
every repa-fast backend that runs on the device, and `torch.compile` of the torch backend.
Method (BENCHMARKS.md has it in full):
- time: CUDA events around each step, L2 flushed before each, on a GPU; `time.perf_counter`
  around each step on a CPU; median and p20/p80 of the samples, after warm-up;
- reliability: a row whose spread (p80/p20) is wide, during which other processes kept the
  CPUs busy, or during which torch.compile recompiled, is measured once more; if the kept
  measurement still is, the row is marked unreliable with the reason;
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
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional, TypeVar

import torch

from .bench_cases import (BASELINE, COMPILED, EXTRA_ROWS, PRESETS, ROWS, Case, Workload, all_cases, bench_backends,
                          compile_count, default_preset, make_workload, select_cases, synchronize)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
H100_BF16_TFLOPS = 797.0  # dense bf16 matmul measured on one H100 (DESIGN.md §5, GPU_LESS.md §4)
CSV_FIELDS = ("case", "op", "backend", "dtype", "shape", "device", "torch", "triton", "timestamp", "median_ms",
              "p20_ms", "p80_ms", "samples", "peak_mib", "speedup_vs_simpletuner", "speedup_vs_torch",
              "speedup_vs_compile", "floor_ms", "floor_fraction", "compile_s", "other_cores_busy", "warning", "error")
# Seconds of timed steps per measurement (after warm-up), and the bounds on their number.
TIMED_SECONDS, TIMED_SECONDS_QUICK = 1.0, 0.3
MIN_SAMPLES, MAX_SAMPLES = 5, 200
# A measurement is unreliable when p80 / p20 exceeds SPREAD_LIMIT, or when other processes kept
# more CPU cores busy than this one leaves free, plus LOAD_SLACK_CORES (a 2-core machine with
# both torch threads busy: one other busy core can stall a step's OpenMP region 10-100x).
SPREAD_LIMIT = 1.5
LOAD_SLACK_CORES = 0.25
UNRELIABLE = "UNRELIABLE"  # starts the warning of a row marked unreliable

T = TypeVar("T")

HELP = """Columns of the table (and fields of results.json / results.csv):
  median ms, p20-p80 ms  time of one forward + backward; the 20th-80th percentile range of the samples
  peak MiB               peak allocation above the inputs during one step, gradients included
  x simpletuner          speedup over the `simpletuner` row of the same case: SimpleTuner's math as
                         trainers run it today (fp32 LayerNorm + Linear projector, project then
                         resample, the manifold loss through two B x N x N similarity matrices,
                         plain autograd). This is the column a trainer decides from.
  x torch, x compile     speedup over repa-fast's torch backend, and over torch.compile of it
  floor                  the fraction of the row's median that the case's unavoidable GEMM work
                         takes at the device's peak (100% = nothing but those GEMMs at peak speed).
                         Peak: 797 TFLOP/s on an H100 in bf16/fp16, else a square matmul measured
                         at the start of the run (`--peak-tflops` overrides). A row faster than that
                         peak allows (the peak was measured while other processes slowed it) gets
                         the peak measured again; if still faster, no floor is shown and the note says why.
  note                   compile seconds of torch.compile rows; "UNRELIABLE" with the reason when the
                         spread p80/p20 exceeds {spread}, when other processes kept more CPU cores busy
                         than the run leaves free (+{slack}), or when torch.compile recompiled during
                         the timed steps. Such a measurement is taken once more and the faster of the
                         two kept; the row is marked only when that one is unreliable too.
"""
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = HELP.format(spread=SPREAD_LIMIT, slack=LOAD_SLACK_CORES)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated presets, case names or patterns (default: design on cuda, cpu on "
                             "cpu; quick with --quick); e2e-cpu / e2e-gpu: the whole regularizer step "
                             "(decode, encode, loss), --device meta counts its flops")
    parser.add_argument("--quick", action="store_true", help="the quick preset and shorter timing")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated subset of {', '.join(ROWS)} (default: "
                             "the SimpleTuner baselines, every backend that runs on the device, and "
                             f"{COMPILED}; the Triton interpreter is never timed unless named)")
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
    speedup_vs_simpletuner: Optional[float] = None
    speedup_vs_torch: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    floor_ms: Optional[float] = None
    floor_fraction: Optional[float] = None
    compile_s: Optional[float] = None
    other_cores_busy: Optional[float] = None  # CPU cores other processes kept busy during the timed steps
    warning: str = ""  # why the row is unreliable: starts with UNRELIABLE; "" when reliable
    error: str = ""
    meta: Dict[str, str] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------- measuring

def time_step(step: Callable[[], None], device: torch.device, quick: bool) -> List[float]:
    """Milliseconds of each timed call of `step`, after one warm-up call; as many calls as fit
    the time budget, within [MIN_SAMPLES, MAX_SAMPLES]."""
    step()  # warm-up (caches, lazy init, autotuning)
    synchronize(device)
    budget = TIMED_SECONDS_QUICK if quick else TIMED_SECONDS
    if device.type != "cuda":
        # Calls until the budget is spent (not a count from one probe call: one call stalled by
        # another process would cut the samples to the minimum).
        samples: List[float] = []
        end = time.perf_counter() + budget
        while len(samples) < MIN_SAMPLES or (len(samples) < MAX_SAMPLES and time.perf_counter() < end):
            start = time.perf_counter()
            step()
            samples.append((time.perf_counter() - start) * 1e3)
        return samples
    # As triton.testing.do_bench: events around each call, the L2 cache flushed before each; the
    # count from one synchronized probe call (GPU time does not depend on the host's load).
    start = time.perf_counter()
    step()
    synchronize(device)
    count = int(min(MAX_SAMPLES, max(MIN_SAMPLES, budget / max(time.perf_counter() - start, 1e-6))))
    with torch.cuda.device(device):  # events record on the current device's stream
        flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for begin, end_event in events:
            flush.zero_()
            begin.record()
            step()
            end_event.record()
        torch.cuda.synchronize(device)
    return [begin.elapsed_time(end_event) for begin, end_event in events]


def _usable_cpus() -> List[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _cpus_busy_seconds(cpus: List[int]) -> Optional[float]:
    """Seconds the CPUs `cpus` have spent busy since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    # Fields: user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
    ticks = sum(sum(int(v) for v in (f[1:4] + f[6:9])) for f in lines if f[0] in wanted)
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    """The timed steps of one measurement, sorted, and what may have disturbed them."""

    samples: List[float]
    other_cores_busy: Optional[float]  # None where the CPUs' busy time cannot be read
    recompiles: int

    def quantile(self, q: float) -> float:
        """Linear interpolation between order statistics (numpy's default)."""
        pos = q * (len(self.samples) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(self.samples) - 1)
        return self.samples[lo] + (self.samples[hi] - self.samples[lo]) * (pos - lo)

    def problems(self, device: torch.device, spread_counts: bool = True) -> List[str]:
        """Why these samples may not be the step's time (empty: reliable)."""
        found = []
        spread = self.quantile(0.8) / max(self.quantile(0.2), 1e-9)
        if spread_counts and spread > SPREAD_LIMIT:
            found.append(f"spread p80/p20 {spread:.1f}x")
        cpus = len(_usable_cpus())
        free = cpus - (torch.get_num_threads() if device.type == "cpu" else 1)
        if self.other_cores_busy is not None and self.other_cores_busy > max(free, 0) + LOAD_SLACK_CORES:
            found.append(f"other processes kept {self.other_cores_busy:.1f} of {cpus} cores busy")
        if self.recompiles:
            found.append(f"torch.compile recompiled {self.recompiles} graphs during the timed steps")
        return found


def timed(workload: Workload, device: torch.device, quick: bool) -> Timing:
    """`time_step` of the workload, with the CPU time other processes took meanwhile (all usable
    CPUs' busy time minus this process's) and the graphs torch.compile compiled meanwhile."""
    workload.step()  # a compile this first step triggers is warm-up; one in the steps after it is counted
    synchronize(device)
    cpus = _usable_cpus()
    busy, own, wall, compiled = _cpus_busy_seconds(cpus), time.process_time(), time.perf_counter(), compile_count()
    samples = sorted(time_step(workload.step, device, quick))
    recompiles = compile_count() - compiled
    busy_after = _cpus_busy_seconds(cpus)
    others = None
    if busy is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy) - (time.process_time() - own)) / (time.perf_counter() - wall)
    return Timing(samples, others, recompiles)


def _without_profiler_chatter(run: Callable[[], T]) -> T:
    """`run()` with the process's stderr (fd 2, where torch's profiler prints its
    `USDT ... profiler_start/stop` lines from C++) sent to a file, then pass on whatever else was
    written there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            result = run()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        rest = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                if not (line.startswith("USDT:") and ("profiler_start" in line or "profiler_stop" in line))]
    if rest:
        sys.stderr.write("".join(rest))
    return result


def _cpu_allocation_peak(run: Callable[[], None]) -> int:
    """Peak of the running sum of the allocations (+) and frees (-) that torch's CPU allocator
    reports to the profiler while `run` executes, in bytes."""
    from torch.profiler import ProfilerActivity, profile

    def profiled():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        return prof

    prof = _without_profiler_chatter(profiled)
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
    timing = timed(Workload(run=lambda: a @ b, clear=lambda: None), device, quick=True)
    problems = "; ".join(timing.problems(device, spread_counts=False))  # the best sample is what counts
    source = f"measured: best {n}x{n}x{n} {_dtype_name(dtype)} matmul here" + (f", {problems}" if problems else "")
    return 2 * n ** 3 / (timing.samples[0] / 1e3) / 1e12, source


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
    """One (case, backend) row; a backend that fails on the case gives an error row. An
    unreliable measurement is taken once more and the faster of the two kept (load only slows
    a step down); the row is marked when the kept one is unreliable too."""
    row = Row(case.name, case.op, backend, _dtype_name(dtype), case.shape)
    try:
        workload = make_workload(case, backend, device, dtype)
        row.compile_s = workload.compile_s
        timing = timed(workload, device, quick)
        if timing.problems(device):
            timing = min(timing, timed(workload, device, quick), key=lambda t: t.quantile(0.5))
            problems = timing.problems(device)
            row.warning = f"{UNRELIABLE}, measured twice: {'; '.join(problems)}" if problems else ""
        row.samples = len(timing.samples)
        row.median_ms, row.p20_ms, row.p80_ms = (timing.quantile(q) for q in (0.5, 0.2, 0.8))
        row.other_cores_busy = timing.other_cores_busy
        row.peak_mib = peak_memory_bytes(workload, device) / 2 ** 20
    except Exception as err:  # noqa: BLE001 - any failure of a backend is a result to report
        message = str(err).strip().splitlines()
        row.error = f"{type(err).__name__}: {message[0] if message else ''}"[:300]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def fill_derived(rows: List[Row], cases: Dict[str, Case], peak_tflops: float) -> None:
    """Speedups over the SimpleTuner baseline, the torch backend and torch.compile of the same
    case, and the floor. A row faster than its floor has no floor fraction (see `floor_note`)."""
    medians = {(r.case, r.backend): r.median_ms for r in rows if r.median_ms}
    for r in rows:
        r.floor_ms = cases[r.case].gemm_flops() / (peak_tflops * 1e12) * 1e3
        if not r.median_ms:
            continue
        r.floor_fraction = r.floor_ms / r.median_ms if r.floor_ms <= r.median_ms else None
        for attr, base in (("speedup_vs_simpletuner", BASELINE), ("speedup_vs_torch", "torch"),
                           ("speedup_vs_compile", COMPILED)):
            if (r.case, base) in medians:
                setattr(r, attr, medians[(r.case, base)] / r.median_ms)


def faster_than_floor(rows: List[Row]) -> List[Row]:
    return [r for r in rows if r.median_ms and r.floor_ms and r.floor_ms > r.median_ms]


def floor_note(row: Row, peak_tflops: float) -> str:
    if not faster_than_floor([row]):
        return ""
    return (f"no floor: ran faster than its GEMMs take at {peak_tflops:.3g} TFLOP/s, the peak above (measured "
            "while other processes slowed it, or stated too low)")


# ---------------------------------------------------------------------------- output

def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def markdown_table(rows: List[Row], peak_tflops: float) -> str:
    lines = ["| case | shape | backend | median ms | p20-p80 ms | peak MiB | x simpletuner | x torch | x compile | "
             "floor | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spread = f"{_ms(r.p20_ms)}-{_ms(r.p80_ms)}" if r.median_ms else ""
        notes = [r.error, f"compile {r.compile_s:.1f} s" if r.compile_s is not None else "", r.warning,
                 floor_note(r, peak_tflops)]
        note = "; ".join(n for n in notes if n)
        lines.append(f"| {r.case} | {r.shape} | {r.backend} | {_ms(r.median_ms) if r.median_ms else ''} | {spread} | "
                     f"{_fmt(r.peak_mib, '.1f')} | {_fmt(r.speedup_vs_simpletuner, '.2f')} | "
                     f"{_fmt(r.speedup_vs_torch, '.2f')} | {_fmt(r.speedup_vs_compile, '.2f')} | "
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
    """Per case, one bar per row: the speedup over the SimpleTuner baseline, labelled with the
    row's median ms, and the peak memory. Returns what was done, for the log (matplotlib is
    optional: without it the plot is skipped)."""
    try:
        import matplotlib
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'repa-fast[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cases = list(dict.fromkeys(r.case for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    by_key = {(r.case, r.backend): r for r in rows}
    nan = float("nan")
    width = 0.8 / len(backends)
    fig, (ax_speed, ax_mem) = plt.subplots(2, 1, figsize=(max(7.0, 1.2 * len(cases) + 3.5), 8.0), sharex=True)
    for ax in (ax_speed, ax_mem):
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)
    shown, handles = [], []
    for i, backend in enumerate(backends):
        xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(cases))]
        found = [by_key.get((c, backend)) for c in cases]
        speedups = [r.speedup_vs_simpletuner if r and r.speedup_vs_simpletuner else nan for r in found]
        bars = ax_speed.bar(xs, speedups, width)
        handles.append(Patch(facecolor=bars.patches[0].get_facecolor(), label=backend))  # unhatched
        for bar, x, speedup, r in zip(bars, xs, speedups, found):
            if speedup == speedup:  # not nan
                shown.append(speedup)
                ax_speed.text(x, speedup * 1.1, _ms(r.median_ms), rotation=90, ha="center", va="bottom", fontsize=6)
                bar.set_hatch("//" if r.warning.startswith(UNRELIABLE) else "")
        ax_mem.bar(xs, [r.peak_mib or nan if r else nan for r in found], width, color=handles[-1].get_facecolor())
    if shown:  # room below the smallest bar and above the largest for its label, on a log axis
        ax_speed.set_ylim(min(shown) / 2, max(shown) * 6)
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set_ylabel(f"speedup over {BASELINE} (x)\nbar labels: median ms")
    ax_speed.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="row",
                    title_fontsize=8)  # beside the plot: never over a group
    ax_mem.set_ylabel("peak MiB above inputs")
    ax_mem.set_xticks(range(len(cases)), cases, rotation=35, ha="right", fontsize=7)
    fig.suptitle(f"repa-fast fwd+bwd, {rows[0].meta.get('device', '')} ({rows[0].dtype})\nhatched: unreliable; "
                 f"missing bar: error or no {BASELINE} row", fontsize=9)
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
          f"{meta['dtype']}, {meta['timestamp']}, load average {meta['load_average_1min']}", flush=True)

    out = Path(args.out) if args.out else None
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    by_name = {c.name: c for c in cases}
    rows: List[Row] = []
    # Rows without torch.compile on every case first, the compiled ones (slow to compile) last,
    # so a time budget cuts compile rows, not the backends' or the baseline's own.
    compiled = {b for b in backends if EXTRA_ROWS.get(b, (b, False))[1]}
    jobs = ([(case, b) for b in backends if b not in compiled for case in cases] +
            [(case, b) for case in cases for b in backends if b in compiled])
    for case, backend in jobs:
        if deadline is not None and time.monotonic() > deadline:
            row = Row(case.name, case.op, backend, meta["dtype"], case.shape, error="skipped: --time-budget spent")
        else:
            row = measure(case, backend, device, dtype, args.quick)
        row.meta = row_meta
        rows.append(row)
        status = row.error or f"{_ms(row.median_ms)} ms, {row.peak_mib:.1f} MiB"
        warning = f"; {row.warning}" if row.warning else ""
        print(f"  {case.name} [{backend}]: {status}{warning}", file=sys.stderr, flush=True)
        if out:  # after every row, so a run cut short keeps what it measured
            fill_derived(rows, by_name, peak)
            write_results(out, rows, meta)
    rows.sort(key=lambda r: (list(by_name).index(r.case), backends.index(r.backend)))
    fill_derived(rows, by_name, peak)
    if faster_than_floor(rows) and not args.peak_tflops and peak_source.startswith("measured"):
        # The peak was measured slower than some row ran: other processes slowed the matmul.
        again, again_source = device_peak_tflops(device, dtype)
        if again > peak:
            peak, meta["peak_tflops"] = again, round(again, 3)
            meta["peak_source"] = peak_source = f"{again_source}; the better of two, before and after the rows"
            fill_derived(rows, by_name, peak)
    print(f"# floor at {peak:.3g} TFLOP/s ({peak_source})", flush=True)
    print(markdown_table(rows, peak), flush=True)
    if out:
        write_results(out, rows, meta)
        print(write_plot(out / "plot.png", rows))
    return 0
