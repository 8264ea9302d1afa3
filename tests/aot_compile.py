"""Compile every Triton kernel configuration the launchers can pick for sm_80 and sm_90, with
no GPU (../shared/GPU_LESS.md §2), and report what the GPU would get: registers, spilled
(local) bytes, shared memory, tensor-core instructions.

Each kernel module in repa_fast.kernels exposes `aot_specs()`, yielding dicts with keys
name, fn, signature, constexprs, num_warps, num_stages, tensor_cores (True when the kernel's
tl.dot must become wgmma/mma) and optionally attrs (the divisibility hints the JIT derives from
aligned, contiguous arguments, so the variant compiled is the one a GPU runs). Run as a script — triton.compile needs triton imported without
the interpreter — it prints one JSON object per spec and target; with --list, one per spec, what
it specialises (kernel, pointer types, constexprs, warps, stages), compiling nothing.
"""
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile


def all_specs():
    import repa_fast.kernels as package
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        yield from getattr(module, "aot_specs", lambda: ())()


def compile_spec(spec, cc):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                    attrs=spec.get("attrs"))
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    ptx = kernel.asm["ptx"]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout

    def field(name):
        found = re.search(rf"{name}:(\d+)", usage)
        return int(found.group(1)) if found else -1
    return {"regs": field("REG"), "local_bytes": field("LOCAL"), "stack": field("STACK"),
            "shared_bytes": kernel.metadata.shared, "tensor_core_ops": "wgmma" in ptx or "mma.sync" in ptx}


def spec_key(spec):
    """What a launch must match to be this configuration (tests/test_launch_audit.py)."""
    return {"kernel": spec["fn"].__name__, "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
            "constexprs": spec["constexprs"],
            "pointers": {k: v for k, v in spec["signature"].items() if v.startswith("*")}}


def main():
    if sys.argv[1:] == ["--list"]:
        for spec in all_specs():
            print(json.dumps(spec_key(spec)), flush=True)
        return
    for spec in all_specs():
        for cc in (80, 90):
            row = {"name": spec["name"], "cc": cc, "tensor_cores_required": bool(spec["tensor_cores"])}
            try:
                row.update(compile_spec(spec, cc))
            except Exception as err:  # reported per spec: one broken config must not hide the others
                row["error"] = f"{type(err).__name__}: {err}"[:2000]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: triton.compile needs the real JIT")
    main()
