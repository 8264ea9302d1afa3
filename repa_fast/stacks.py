"""The supported software stacks (README "Supported stacks"): torch with the triton it pins, from
torch 2.11 / triton 3.6 to the newest. CI proves each triton (`make test`, `make triton-matrix`).

Standard library only: setup.py reads the minimum versions from here where torch may not be
importable.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

MIN_TORCH = (2, 11)
MIN_TRITON = (3, 6)
# The triton each torch release pins (its CUDA wheels' requirement).
TRITON_PINNED_BY_TORCH = {"2.11": "3.6.0", "2.12": "3.7.1", "2.14": "3.8.0", "2.15": "3.9.0"}


def requirement(name: str, minimum: Tuple[int, int]) -> str:
    return f"{name}>={minimum[0]}.{minimum[1]}"


def _release(version: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of a version string such as "2.13.0+cpu" or "3.6.0", or None."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def supported_range() -> str:
    pins = ", ".join(f"torch {torch} -> triton {triton}" for torch, triton in TRITON_PINNED_BY_TORCH.items())
    return f"{requirement('torch', MIN_TORCH)} with {requirement('triton', MIN_TRITON)} ({pins})"


def check(name: str, version: Optional[str]) -> str:
    """Whether an installed torch or triton `version` (None: not installed) is inside the range."""
    minimum = {"torch": MIN_TORCH, "triton": MIN_TRITON}[name]
    if version is None:
        return f"{name} not installed"
    release = _release(version)
    if release is None:
        return f"{name} {version}: unknown version"
    inside = "inside" if release >= minimum else f"OUTSIDE (needs {requirement(name, minimum)})"
    return f"{name} {version} {inside}"
