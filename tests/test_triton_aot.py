"""Every Triton kernel configuration compiles for sm_80 and sm_90 without a GPU, spills no
registers, and uses tensor cores where it multiplies tiles (../shared/GPU_LESS.md §2)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "aot_compile.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows, "no kernel configuration was compiled: " + done.stderr[-2000:]
    return rows


def test_every_configuration_compiles(reports):
    failed = [f"{r['name']} sm_{r['cc']}: {r['error']}" for r in reports if "error" in r]
    assert not failed, "\n".join(failed)


def test_no_register_spills(reports):
    # ptxas spill stores land in the stack frame (STACK) as well as in LOCAL: both must be 0.
    spilled = [f"{r['name']} sm_{r['cc']}: {r['local_bytes']} local bytes, {r['stack']} stack bytes, {r['regs']} regs"
               for r in reports if r.get("local_bytes", 0) > 0 or r.get("stack", 0) > 0]
    assert not spilled, "\n".join(spilled)


# Shared memory a block may use (opt-in maximum): H100/H200 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
SHARED_MEMORY_LIMITS = {80: 163 * 1024, 90: 227 * 1024}


def test_shared_memory_fits(reports):
    over = [f"{r['name']} sm_{r['cc']}: {r['shared_bytes']} bytes > {SHARED_MEMORY_LIMITS[r['cc']]}"
            for r in reports if "error" not in r and r["shared_bytes"] > SHARED_MEMORY_LIMITS[r["cc"]]]
    assert not over, "\n".join(over)


def test_tile_gemms_use_tensor_cores(reports):
    missing = [f"{r['name']} sm_{r['cc']}" for r in reports
               if r["tensor_cores_required"] and "error" not in r and not r["tensor_core_ops"]]
    assert not missing, "no wgmma/mma.sync in: " + ", ".join(missing)
