"""Timers and the facts every benchmark must report (device, BLAS)."""

from __future__ import annotations

import ctypes.util
import os
import platform
import statistics
import time
from typing import Callable

import mlx.core as mx


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds; `fn` must evaluate its own MLX arrays."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_time(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Shortest wall time of `fn()` over `repeats` runs, in seconds (after `warmup` runs).

    For a quick machine check: other processes only ever add time, so the minimum is the
    steadiest single figure (a median of a few runs still jumps on a busy machine).
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if ".so" in line})
    except OSError:
        return []


def blas_info() -> dict:
    """Which BLAS MLX's CPU matmuls run on, as far as the process can tell."""
    system = platform.system()
    if system == "Darwin":
        name = "Accelerate (macOS)"
    else:
        libs = _loaded_libraries()
        # numpy/scipy ship their own `libscipy_openblas64_*.so`, which MLX does not use: only a
        # system `libopenblas.so*` (preloaded, it replaces MLX's bundled BLAS symbols) counts.
        openblas = [lib for lib in libs if os.path.basename(lib).startswith("libopenblas")]
        if openblas:
            name = f"OpenBLAS ({openblas[0]})"
        else:
            name = "MLX bundled reference BLAS (slow)"
    return {
        "blas": name,
        "fast_blas_available": find_openblas(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "platform": f"{system} {platform.machine()}",
    }


def find_openblas() -> str | None:
    """Path of a system OpenBLAS that could be preloaded on Linux, or None."""
    for candidate in (
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    ):
        if os.path.exists(candidate):
            return candidate
    return ctypes.util.find_library("openblas")

