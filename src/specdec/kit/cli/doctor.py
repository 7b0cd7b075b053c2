"""`specdec doctor`: Python, MLX and mlx-lm versions, device, BLAS, a matmul timing, models."""

from __future__ import annotations

import argparse
import platform
import sys


def add_parser(sub) -> None:
    d = sub.add_parser("doctor", help="MLX version, device, BLAS, embedded models")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import numpy as np

    from specdec.kit.loading import EMBEDDED, embedded_available
    from specdec.kit.timing import best_time, blas_info, find_openblas

    try:
        from importlib.metadata import version

        mlx_lm_version = version("mlx-lm")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        mlx_lm_version = "unknown"
    info = blas_info()
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"platform     {info['platform']}")
    print(f"mlx          {info['mlx']}")
    print(f"mlx-lm       {mlx_lm_version}")
    print(f"device       {info['device']}")
    print(f"BLAS         {info['blas']}")

    # A 512x512 float32 matmul on the CPU: MLX vs numpy tells a slow BLAS at a glance. The
    # fastest of several runs: on a busy machine a single run mostly measures the neighbours.
    a = mx.random.normal((512, 512), key=mx.random.key(0))
    b = np.asarray(a)
    with mx.stream(mx.cpu):
        t_mlx = best_time(lambda: mx.eval(a @ a), repeats=10)
    t_np = best_time(lambda: b @ b, repeats=10)
    print(f"matmul       512x512 float32 on CPU, best of 10: MLX {t_mlx * 1e3:.2f} ms, "
          f"numpy {t_np * 1e3:.2f} ms")

    if platform.system() == "Linux":
        lib = find_openblas()
        if info["blas"].startswith("OpenBLAS"):
            print("fast BLAS    yes: OpenBLAS is loaded")
        elif lib:
            print(f"fast BLAS    available but not loaded: {lib}")
            print("             `specdec generate` and `specdec bench` preload it for you; elsewhere use")
            print(f"             export LD_PRELOAD={lib}")
        else:
            print("fast BLAS    not found: MLX uses its slow bundled BLAS (a K-token forward costs")
            print("             about K single-token forwards). Install it and preload it:")
            print("             sudo apt-get install libopenblas0-pthread")
            print("             export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
    emb = "yes" if embedded_available() else "no (generate/bench fall back to toy-llama)"
    print(f"embedded     {emb}: {', '.join(str(p) for p in EMBEDDED.values())}")
    return 0
