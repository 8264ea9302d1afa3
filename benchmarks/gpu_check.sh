#!/usr/bin/env bash
# The one script to run on a lent GPU (an H100 / H200 with torch + CUDA, triton, nvcc, ninja,
# pytest, pytest-benchmark; no package registry, so nothing is downloaded):
#   0. versions: torch, triton, CUDA (torch's and nvcc's), the GPU and its driver, first,
#   1. build: install the project editable with the CUDA extension (REPA_FAST_BUILD_CUDA=1),
#   2. tests: the GPU tests (pytest -m gpu tests),
#   3. bench: `repa-fast info`, then `repa-fast bench --device cuda --quick` on the DESIGN.md §5
#      cases: the SimpleTuner baseline, every backend, then the torch.compile rows (simpletuner.compile
#      and torch.compile) while the bench's time budget lasts.
# Output folder: $1, else $OUT, else ./gpu_out. It receives versions.log, build.log, tests.log,
# bench.log, results.json, results.csv, plot.png and summary.json (8 files, nothing deeper). Each
# stage has its own time limit (versions 20 s, build 140 s, tests 150 s, bench 140 s, each killed
# 5 s after its limit: under 8 min in all) and a failed or timed-out stage does not stop the
# next; summary.json records each stage's exit code and seconds. The exit code is 0 only when
# every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-./gpu_out}}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
stages=()

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, output tee'd to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    stages+=("$name:$rc:$((SECONDS - start)):$limit")
}

stage versions 20 bash -c 'python3 -c "import platform, torch, triton
print(\"python\", platform.python_version(), \"| torch\", torch.__version__, \"| triton\", triton.__version__,
      \"| CUDA (torch)\", torch.version.cuda, \"| cuDNN\", torch.backends.cudnn.version())"
    nvcc --version | tail -n 2
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader'
stage build 140 env REPA_FAST_BUILD_CUDA=1 python3 -m pip install --no-deps --no-build-isolation -v -e .
stage tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=10 tests
# The runner stops starting measurements after --time-budget seconds (skipped rows) and rewrites
# results.json/csv after every row, so even a timeout keeps what was measured. --quick: 0.3 s of
# timed steps per row, so the baseline and every backend fit on all eight cases.
stage bench 140 bash -c 'python3 -m repa_fast.cli info; echo
    exec python3 -m repa_fast.cli bench --device cuda --cases design --quick --time-budget 100 --out "$0"' "$out"

python3 - "$out" "${stages[@]}" <<'PY'
import datetime, json, subprocess, sys
from pathlib import Path

out, stages = Path(sys.argv[1]), []
for entry in sys.argv[2:]:
    name, rc, seconds, limit = entry.split(":")
    status = "ok" if rc == "0" else "timed out" if rc in ("124", "137") else "failed"
    stages.append({"stage": name, "status": status, "exit_code": int(rc), "seconds": int(seconds), "limit_s": int(limit)})
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=5).stdout.strip()
except (OSError, subprocess.SubprocessError) as err:
    gpu = f"nvidia-smi failed: {err}"
versions = out / "versions.log"
summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
           "versions": versions.read_text().strip() if versions.exists() else "", "stages": stages}
results = out / "results.json"
if results.exists():
    rows = json.loads(results.read_text())["results"]
    summary["bench_rows"] = len(rows)
    summary["bench_errors"] = {f"{r['case']} [{r['backend']}]": r["error"] for r in rows if r["error"]}
    summary["bench_warnings"] = {f"{r['case']} [{r['backend']}]": r["warning"] for r in rows if r.get("warning")}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
sys.exit(0 if all(s["status"] == "ok" for s in stages) else 1)
PY
