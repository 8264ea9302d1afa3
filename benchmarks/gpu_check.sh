#!/usr/bin/env bash
# The one script to run on a lent GPU (an H100 with torch 2.11 + CUDA 13, triton 3.6, nvcc, ninja,
# pytest, pytest-benchmark; no package registry, so nothing is downloaded):
#   1. build: install the project editable with the CUDA extension (REPA_FAST_BUILD_CUDA=1),
#   2. tests: the GPU tests (pytest -m gpu tests),
#   3. bench: `repa-fast info`, then `repa-fast bench --device cuda` on the DESIGN.md §5 cases.
# Output folder: $1, else $OUT, else ./gpu_out. It receives build.log, tests.log, bench.log,
# results.json, results.csv, plot.png and summary.json (7 files, nothing deeper). Each stage has
# its own time limit (build 150 s, tests 150 s, bench 150 s: 7.5 min in all) and a failed or
# timed-out stage does not stop the next; summary.json records each stage's exit code and seconds.
# The exit code is 0 only when every stage passed.
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
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    stages+=("$name:$rc:$((SECONDS - start)):$limit")
}

stage build 150 env REPA_FAST_BUILD_CUDA=1 python3 -m pip install --no-deps --no-build-isolation -v -e .
stage tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=10 tests
# The runner stops starting measurements after --time-budget seconds (skipped rows) and rewrites
# results.json/csv after every row, so even a timeout keeps what was measured.
stage bench 150 bash -c 'python3 -m repa_fast.cli info; echo
    exec python3 -m repa_fast.cli bench --device cuda --cases design --time-budget 110 --out "$0"' "$out"

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
                         capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as err:
    gpu = f"nvidia-smi failed: {err}"
summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
           "stages": stages}
results = out / "results.json"
if results.exists():
    rows = json.loads(results.read_text())["results"]
    summary["bench_rows"] = len(rows)
    summary["bench_errors"] = {f"{r['case']} [{r['backend']}]": r["error"] for r in rows if r["error"]}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
sys.exit(0 if all(s["status"] == "ok" for s in stages) else 1)
PY
