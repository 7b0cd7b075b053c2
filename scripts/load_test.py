"""A bounded load test for `specdec serve` (local only; stops by itself).

    # start a server for the run (and stop it afterwards), then 1, 4 and 8 concurrent clients:
    python scripts/load_test.py --spawn --concurrency 1 4 8 --requests 24
    python scripts/load_test.py --spawn --plain --concurrency 1 4 8 --requests 24   # baseline
    # or against a server already running on 127.0.0.1:8000:
    python scripts/load_test.py --url http://127.0.0.1:8000 --concurrency 4

Each level sends `--requests` greedy completions (`--max-tokens` each) from C client threads and
prints requests/s, output tokens/s, p50/p95 latency, errors, and the server's acceptance and
tokens per target call. Every request has a timeout, every level a time limit (`--time-limit`):
nothing runs unbounded. Only 127.0.0.1 / localhost URLs are accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

CODE_PROMPTS = [
    "def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n",
    "def read_lines(path):\n    with open(path) as f:\n", "for i in range(10):\n", "def is_prime(n):\n",
    "    def __repr__(self):\n", "if __name__ == \"__main__\":\n",
]
TOY_PROMPTS = ["hello world", "speculative decoding", "a", "the quick brown fox", "serve me", "abc abc"]


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_level(base: str, model: str, prompts: list[str], concurrency: int, requests: int,
              max_tokens: int, timeout: float, time_limit: float) -> dict:
    latencies, errors, tokens, drafted, accepted, calls = [], [], 0, 0, 0, 0
    lock = threading.Lock()
    next_index = [0]
    stop_at = time.perf_counter() + time_limit

    def worker() -> None:
        nonlocal tokens, drafted, accepted, calls
        while time.perf_counter() < stop_at:
            with lock:
                i = next_index[0]
                if i >= requests:
                    return
                next_index[0] += 1
            body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                    "temperature": 0}
            start = time.perf_counter()
            try:
                answer = post(base + "/v1/completions", body, timeout)
            except (urllib.error.URLError, OSError, ValueError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            seconds = time.perf_counter() - start
            spec = answer.get("speculative", {})
            with lock:
                latencies.append(seconds)
                tokens += answer["usage"]["completion_tokens"]
                drafted += spec.get("drafted", 0)
                accepted += spec.get("accepted", 0)
                calls += spec.get("target_calls", 0)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, stop_at - time.perf_counter()) + timeout)
    wall = time.perf_counter() - start
    done = len(latencies)
    q = statistics.quantiles(latencies, n=20) if done >= 2 else latencies * 19
    return {
        "concurrency": concurrency, "requests": done, "errors": len(errors),
        "unfinished": requests - done - len(errors), "seconds": round(wall, 2),
        "requests_per_s": round(done / wall, 3), "tokens_per_s": round(tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(q[18], 3) if latencies else None,
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "tokens_per_target_call": round(tokens / calls, 3) if calls else None,
        "first_error": errors[0] if errors else None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # Through the CLI, as a user starts it: on Linux it preloads a system OpenBLAS first.
    cmd = [sys.executable, "-m", "specdec.kit.cli", "serve", "--port", str(port), "--target", args.target,
           "--max-batch", str(args.max_batch), "--k", str(args.k)]
    cmd += ["--plain"] if args.plain else []
    cmd += [] if args.fallback else ["--no-fallback"]
    cmd += ["--draft", args.draft] if args.draft else []
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"load_test: the server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1):
                return proc, base
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("load_test: the server did not start within 120 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--spawn", action="store_true", help="start a server for the run and stop it after")
    p.add_argument("--target", default="tiny-code", help="--spawn: the target (default tiny-code)")
    p.add_argument("--draft", default=None, help="--spawn: the draft")
    p.add_argument("--plain", action="store_true", help="--spawn: plain batched serving (the baseline)")
    p.add_argument("--fallback", action="store_true", help="--spawn: keep the fallback controller on")
    p.add_argument("--k", type=int, default=4, help="--spawn: lookahead (default 4)")
    p.add_argument("--max-batch", type=int, default=8, help="--spawn: max batch (default 8)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=24, help="requests per level (default 24)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per level")
    p.add_argument("--json", action="store_true", help="one JSON object per level")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.spawn):
        p.error("pass exactly one of --url and --spawn")
    proc = None
    if args.spawn:
        proc, base = spawn(args)
    else:
        base = args.url.rstrip("/")
        if urllib.parse.urlparse(base).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error(f"--url {base}: this load test only talks to a local server (127.0.0.1)")
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        prompts = TOY_PROMPTS if model == "toy-llama" else CODE_PROMPTS
        post(base + "/v1/completions", {"model": model, "prompt": prompts[0], "max_tokens": 4,
                                        "temperature": 0}, args.timeout)  # warm-up
        mode = "plain" if args.plain else "speculative" if args.spawn else "server"
        if not args.json:
            print(f"{model} ({mode}), {args.requests} requests x {args.max_tokens} tokens per level")
            print(f"{'clients':>7} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'errors':>6} "
                  f"{'accept':>6} {'tok/call':>8}")
        for c in args.concurrency:
            row = run_level(base, model, prompts, c, args.requests, args.max_tokens,
                            args.timeout, args.time_limit)
            if args.json:
                print(json.dumps(dict(row, model=model, mode=mode)), flush=True)
                continue
            print(f"{c:>7} {row['requests_per_s']:>7.2f} {row['tokens_per_s']:>7.1f} {row['p50_s']:>7.2f} "
                  f"{row['p95_s']:>7.2f} {row['errors']:>6} {row['acceptance'] or 0:>6.2f} "
                  f"{row['tokens_per_target_call'] or 0:>8.2f}", flush=True)
            if row["first_error"]:
                print(f"        first error: {row['first_error']}")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
