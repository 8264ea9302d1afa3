"""`repa-fast` command line: info, demo, bench, cache."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional

import torch

from .. import __version__, stacks
from ..backends import BACKENDS, _why_not, triton_interpreter_active


def _version_of(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def info() -> str:
    """Versions, devices and which backend can run where, with the reason when one cannot."""
    triton = _version_of("triton")
    lines = [f"repa-fast {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"triton {triton or 'not installed'}" + (" (interpreter: TRITON_INTERPRET=1)" if triton_interpreter_active() else ""),
             f"supported: {stacks.supported_range()}; installed: {stacks.check('torch', torch.__version__)}, "
             f"{stacks.check('triton', triton)}"]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            lines.append(f"cuda:{index} {torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda})")
        devices.append(torch.device("cuda"))
    else:
        lines.append("cuda: not available")
    for device in devices:
        for name in BACKENDS:
            reason = _why_not(name, device)
            lines.append(f"backend {name:6s} on {device.type}: " + ("yes" if not reason else f"no ({reason})"))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="repa-fast", description="Fused REPA / U-REPA losses")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends")
    # Each command module exposes add_arguments(parser) and run(args) -> exit code, and imports
    # its heavy dependencies (diffusers, matplotlib) only inside run.
    from . import bench, cache, demo
    for name, module in (("demo", demo), ("bench", bench), ("cache", cache)):
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    return {"demo": demo, "bench": bench, "cache": cache}[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
