"""SimpleTuner's own `crepa.py`, loaded at test time from its PyPI wheel (never copied: its license
forbids it). The wheel is pure Python; `crepa.py` imports only torch at module level, so it loads
standalone on Python 3.11 although the wheel is tagged for 3.12.

The wheel is kept in REPA_FAST_TEST_CACHE (default ~/.cache/repa-fast-tests) and downloaded with
pip when missing; a test that needs it fails (never skips) when it cannot be had.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType

SIMPLETUNER_VERSION = "4.10.1"
WHEEL_NAME = f"simpletuner-{SIMPLETUNER_VERSION}-py3-none-any.whl"
CREPA_PATH_IN_WHEEL = "simpletuner/helpers/training/crepa.py"


def cache_dir() -> Path:
    return Path(os.environ.get("REPA_FAST_TEST_CACHE", Path.home() / ".cache" / "repa-fast-tests"))


def simpletuner_wheel() -> Path:
    """The wheel's path, downloaded (no dependencies, binary only) when not cached yet."""
    directory = cache_dir()
    wheel = directory / WHEEL_NAME
    if not wheel.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", f"simpletuner=={SIMPLETUNER_VERSION}", "-d", str(directory)],
                       check=True)
    if not zipfile.is_zipfile(wheel):
        raise RuntimeError(f"{wheel} is not a wheel: delete it and rerun")
    return wheel


@lru_cache(maxsize=None)
def load_crepa() -> ModuleType:
    """SimpleTuner 4.10.1's `simpletuner.helpers.training.crepa`, as a module of its own."""
    with zipfile.ZipFile(simpletuner_wheel()) as archive:
        source = archive.read(CREPA_PATH_IN_WHEEL)
    # Extracted under a name keyed by content, so a changed wheel never reuses a stale file.
    target = cache_dir() / f"crepa-{SIMPLETUNER_VERSION}-{hashlib.sha256(source).hexdigest()[:12]}.py"
    if not target.is_file():
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(source)
        os.replace(partial, target)
    spec = importlib.util.spec_from_file_location("simpletuner_crepa", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
