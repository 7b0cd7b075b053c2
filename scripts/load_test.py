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

    # attack mode: what an operator tries before exposing a server (bounded, a few minutes):
    python scripts/load_test.py --spawn --target toy-llama --attack
    python scripts/load_test.py --spawn --attack --api-key secret      # the embedded pair

--attack runs five cases and prints one line each (JSON with --json): 64 concurrent greedy
clients (errors, how many returned exactly their solo output, tokens/s); 400 clients flooding
the queue (how many 429s, and that no 5xx came back); 10 rounds of clients that disconnect
mid-request, streaming and not (the server's RSS after each round, and whether every row was
freed); 300 half-open connections (a real request must still be answered: seconds); and the
largest body (20 MB sent: seconds to the 413, the server's peak RSS). RSS needs --spawn.
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
from typing import Optional

CODE_PROMPTS = [
    "def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n",
    "def read_lines(path):\n    with open(path) as f:\n", "for i in range(10):\n", "def is_prime(n):\n",
    "    def __repr__(self):\n", "if __name__ == \"__main__\":\n",
]
TOY_PROMPTS = ["hello world", "speculative decoding", "a", "the quick brown fox", "serve me", "abc abc"]


HEADERS: dict = {}  # Authorization, when --api-key is given


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **HEADERS})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def post_status(url: str, body: dict, timeout: float) -> tuple[int, dict, dict]:
    """(status, JSON body, headers), for 4xx and 5xx too."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **HEADERS})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        try:
            payload = json.loads(e.read())
        except ValueError:
            payload = {}
        return e.code, payload, dict(e.headers)


def get_json(url: str, timeout: float = 10) -> dict:
    req = urllib.request.Request(url, headers=HEADERS)
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


# Attack mode --------------------------------------------------------------------------------------
class RSS:
    """The spawned server's resident memory (MB), sampled every 20 ms while `peak` is watched."""

    def __init__(self, pid: Optional[int]):
        self.process = None
        if pid is not None:
            try:
                import psutil

                self.process = psutil.Process(pid)
            except Exception:  # noqa: BLE001 — no psutil: no RSS column
                self.process = None
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def now(self) -> Optional[float]:
        if self.process is None:
            return None
        try:
            procs = [self.process] + self.process.children(recursive=True)
            return round(sum(p.memory_info().rss for p in procs) / 2**20, 1)
        except Exception:  # noqa: BLE001
            return None

    def __enter__(self):
        self.peak_mb = self.now() or 0.0
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self.now() or 0.0)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)


def run_concurrent(fn, n: int, timeout: float) -> list:
    results: list = [None] * n

    def worker(i: int) -> None:
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 — reported, never raised
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.perf_counter() + timeout
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()))
    return results


def wait_idle(base: str, seconds: float) -> float:
    """Seconds until no row runs and none waits (or `seconds`, if it never happens)."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        h = get_json(base + "/health", 5)
        if h["running"] == 0 and h["waiting"] == 0:
            return time.perf_counter() - start
        time.sleep(0.02)
    return seconds


def attack_concurrent(base, model, prompts, max_tokens, timeout) -> dict:
    asks = [prompts[i % len(prompts)] + " " * (i // len(prompts)) for i in range(64)]

    def ask(i: int) -> str:
        return post(base + "/v1/completions", {"model": model, "prompt": asks[i], "max_tokens": max_tokens,
                                               "temperature": 0}, timeout)["choices"][0]["text"]

    solo = {p: ask(i) for i, p in enumerate(asks) if p not in asks[:i]}
    start = time.perf_counter()
    got = run_concurrent(ask, 64, timeout)
    wall = time.perf_counter() - start
    errors = [g for g in got if not isinstance(g, str)]
    same = sum(1 for i, g in enumerate(got) if g == solo[asks[i]])
    return {"case": "64 concurrent", "errors": len(errors), "identical_to_solo": same,
            "seconds": round(wall, 2), "tokens_per_s": round(64 * max_tokens / wall, 1),
            "first_error": repr(errors[0])[:200] if errors else None}


def attack_flood(base, model, prompts, max_tokens, timeout) -> dict:
    def ask(i: int) -> int:
        return post_status(base + "/v1/completions", {"model": model, "prompt": prompts[i % len(prompts)],
                                                      "max_tokens": max_tokens, "temperature": 0}, timeout)[0]

    start = time.perf_counter()
    codes = run_concurrent(ask, 400, timeout)
    wall = time.perf_counter() - start
    tally: dict = {}
    for c in codes:
        key = c if isinstance(c, int) else type(c).__name__
        tally[key] = tally.get(key, 0) + 1
    return {"case": "400 flooding", "seconds": round(wall, 2), "status_counts": tally,
            "429": tally.get(429, 0), "5xx": sum(v for k, v in tally.items() if isinstance(k, int) and k >= 500)}


def attack_disconnects(base, model, prompts, rss: RSS, rounds: int = 10) -> dict:
    host, port = urllib.parse.urlparse(base).hostname, urllib.parse.urlparse(base).port
    auth = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items()).encode()
    per_round, freed = [], []
    for r in range(rounds):
        socks = []
        for i in range(8):
            body = json.dumps({"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": 1000,
                               "temperature": 0, "stream": bool(i % 2)}).encode()
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + auth
                      + b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
            socks.append(s)
        time.sleep(0.5)
        for s in socks:
            s.close()
        freed.append(round(wait_idle(base, 30), 2))
        per_round.append(rss.now())
    return {"case": "10 disconnect rounds", "rss_mb_per_round": per_round, "seconds_to_free": freed}


def attack_half_open(base, model, prompts, timeout, n: int = 300) -> dict:
    host, port = urllib.parse.urlparse(base).hostname, urllib.parse.urlparse(base).port
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Ty")
            socks.append(s)
        start = time.perf_counter()
        status, _, _ = post_status(base + "/v1/completions", {"model": model, "prompt": prompts[0],
                                                              "max_tokens": 8, "temperature": 0}, timeout)
        return {"case": f"{n} half-open", "status": status, "seconds": round(time.perf_counter() - start, 3)}
    finally:
        for s in socks:
            s.close()


def attack_body(base, rss: RSS, megabytes: int = 20) -> dict:
    host, port = urllib.parse.urlparse(base).hostname, urllib.parse.urlparse(base).port
    size = megabytes << 20
    auth = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items()).encode()
    with rss:
        start = time.perf_counter()
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + auth
                  + b"Content-Type: application/json\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n")
        chunk, sent = b"[" + b"1," * (1 << 19), 0
        try:
            while sent < size:
                s.sendall(chunk[: size - sent])
                sent += len(chunk[: size - sent])
        except OSError:
            pass  # the server answered and closed: the rest is never read
        s.settimeout(30)
        try:
            answer = s.recv(200)
        except OSError:
            answer = b""
        seconds = time.perf_counter() - start
        s.close()
    status = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
    return {"case": f"{megabytes} MB body", "status": status, "seconds": round(seconds, 3),
            "bytes_sent_before_refusal": sent, "peak_rss_mb": rss.peak_mb or None}


def attack(base, model, prompts, args, pid: Optional[int]) -> list[dict]:
    rss = RSS(pid)
    started = time.perf_counter()
    out = []
    for name, run in (
        ("concurrent", lambda: attack_concurrent(base, model, prompts, args.max_tokens, args.timeout)),
        ("flood", lambda: attack_flood(base, model, prompts, args.max_tokens, args.timeout)),
        ("disconnects", lambda: attack_disconnects(base, model, prompts, rss)),
        ("half-open", lambda: attack_half_open(base, model, prompts, args.timeout)),
        ("body", lambda: attack_body(base, rss)),
    ):
        if time.perf_counter() - started > args.time_limit:
            out.append({"case": name, "skipped": f"--time-limit {args.time_limit:g} s reached"})
            continue
        wait_idle(base, 60)
        row = run()
        row["rss_mb_after"] = rss.now()
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def spawn(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # Through the CLI, as a user starts it: on Linux it preloads a system OpenBLAS first.
    cmd = [sys.executable, "-m", "specdec.kit.cli", "serve", "--port", str(port), "--target", args.target,
           "--max-batch", str(args.max_batch), "--k", str(args.k)]
    cmd += ["--plain"] if args.plain else []
    cmd += [] if args.fallback else ["--no-fallback"]
    cmd += ["--draft", args.draft] if args.draft else []
    cmd += ["--max-queue", str(args.max_queue)]
    env = dict(os.environ)
    if args.api_key:
        env["SPECDEC_API_KEY"] = args.api_key  # not on the command line, where ps shows it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    p.add_argument("--attack", action="store_true",
                   help="the bounded attack cases instead of load levels (see the module docstring)")
    p.add_argument("--api-key", default=None, help="send 'Authorization: Bearer KEY' (and --spawn with it)")
    p.add_argument("--max-queue", type=int, default=64, help="--spawn: the server's --max-queue (default 64)")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.spawn):
        p.error("pass exactly one of --url and --spawn")
    proc = None
    if args.api_key:
        HEADERS["Authorization"] = f"Bearer {args.api_key}"
    if args.spawn:
        proc, base = spawn(args)
    else:
        base = args.url.rstrip("/")
        if urllib.parse.urlparse(base).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error(f"--url {base}: this load test only talks to a local server (127.0.0.1)")
    try:
        model = get_json(base + "/v1/models")["data"][0]["id"]
        prompts = TOY_PROMPTS if model == "toy-llama" else CODE_PROMPTS
        if args.attack:
            attack(base, model, prompts, args, proc.pid if proc is not None else None)
            return 0
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
