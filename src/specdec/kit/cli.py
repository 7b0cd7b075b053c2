"""The `specdec` command: generate, bench, grade, doctor.

    specdec generate                       # speculative decoding on the embedded pair, colour-coded
    specdec generate --plain               # the target alone, one token per call
    specdec generate --impl student        # the same with your own tree (src/specdec)
    specdec bench --prompts 10             # plain vs speculative: tokens/s, speedup, acceptance
    specdec grade --week 2                 # your scoreboard
    specdec doctor                         # MLX, device, BLAS, embedded models

Models: `--target` / `--draft` take an embedded name (`tiny-code`, `tiny-code-draft`), a local
mlx-lm directory or a hub id, or `toy-llama` (a seeded random tiny llama pair, no tokenizer:
token ids are printed). On Linux, `generate` and `bench` re-run themselves with a system OpenBLAS
preloaded when one is installed: MLX's bundled CPU BLAS is far slower (see `specdec doctor`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from specdec.kit.timing import blas_info

TOY = "toy-llama"
GREEN, RESET = "\x1b[32m", "\x1b[0m"
# The embedded pair learned from the standard library, half of which is tests: a test method is
# where its 21M-parameter target writes its most convincing Python.
DEFAULT_PROMPT = "import unittest\n\n\nclass TestList(unittest.TestCase):\n\n    def test_append(self):"

# Short Python beginnings for `--batch` and for `bench` when no held-out file list is around.
# Prompts end at the end of a line, *without* its newline: byte-level BPE merges a newline with
# the next line's indentation into one token, so a prompt ending in a bare "\n" ends on a token
# boundary the models rarely saw in training (it measurably lowers acceptance).
BUILTIN_PROMPTS = [
    "def fibonacci(n):",
    "import os\n\n\ndef list_python_files(root):",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "def is_prime(n):\n    if n < 2:\n        return False",
    "def read_lines(path):\n    with open(path) as f:",
    "import sys\n\n\ndef main(argv=None):\n    if argv is None:\n        argv = sys.argv[1:]",
    "def merge_sorted(a, b):\n    result = []\n    i = j = 0",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y",
    "def count_words(text):\n    counts = {}\n    for word in text.split():",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1",
]


class CLIError(Exception):
    """A problem the user can fix: printed as one message, no traceback."""


# Fast BLAS on Linux ------------------------------------------------------------------------------
def maybe_reexec_with_openblas(args: list[str]) -> None:
    """Re-run this very command with a system OpenBLAS preloaded (Linux; generate and bench only).

    MLX's CPU wheel bundles a reference BLAS whose matmuls are tens of times slower than
    OpenBLAS, which makes a K-token verification cost about K single-token forwards and hides
    the whole point of speculative decoding. LD_PRELOAD only works at process start, hence exec.
    """
    from specdec.kit.timing import find_openblas

    if not sys.platform.startswith("linux") or os.environ.get("SPECDEC_NO_OPENBLAS"):
        return
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in ("generate", "bench"):
        return
    lib = find_openblas()
    preload = os.environ.get("LD_PRELOAD", "")
    if not lib or lib in preload or os.environ.get("SPECDEC_REEXEC"):
        return
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}" if preload else lib, SPECDEC_REEXEC="1")
    print(f"specdec: preloading {lib} for fast CPU matmuls (SPECDEC_NO_OPENBLAS=1 turns this off)",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "specdec.kit.cli", *args], env)


# Models ------------------------------------------------------------------------------------------
@dataclass
class Models:
    target: Any
    draft: Any  # None when no draft model is needed (plain decoding, n-gram drafting)
    tokenizer: Any  # mlx-lm TokenizerWrapper, or None for toy-llama
    target_name: str
    draft_name: Optional[str]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:  # toy-llama: one token per byte, folded into its vocabulary
            from specdec.kit.models import model_vocab_size

            vocab = model_vocab_size(self.target)
            return [b % vocab for b in text.encode("utf-8")]
        return list(self.tokenizer.encode(text))

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(t) for t in tokens)
        return self.tokenizer.decode(tokens)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.tokenizer is None:
            return []
        return sorted(getattr(self.tokenizer, "eos_token_ids", None) or [])


def pick_names(target: Optional[str], draft: Optional[str], need_draft: bool) -> tuple[str, Optional[str]]:
    """Fill in default model names; fall back to toy-llama while the embedded pair is missing."""
    from specdec.kit.loading import DEFAULT_DRAFT, DEFAULT_TARGET, embedded_available

    if target is None:
        target = DEFAULT_TARGET
    if target in (DEFAULT_TARGET, DEFAULT_DRAFT) and not embedded_available():
        print(f"note: the embedded models are not installed; using {TOY!r} (random tiny llamas) "
              f"instead of {target!r}", file=sys.stderr)
        target = TOY
        if draft in (DEFAULT_TARGET, DEFAULT_DRAFT):
            draft = TOY
    if not need_draft:
        return target, None
    if draft is None:
        if target == TOY:
            draft = TOY
        elif target == DEFAULT_TARGET:
            draft = DEFAULT_DRAFT
        else:
            raise CLIError(f"no --draft given for target {target!r}: pass a draft model that "
                           "shares the target's tokenizer (or use --plain / --drafter ngram)")
    if (target == TOY) != (draft == TOY):
        raise CLIError(f"{TOY!r} can only be paired with itself (its vocabulary has 64 tokens): "
                       f"got --target {target} --draft {draft}")
    return target, draft


def load_models(target: Optional[str], draft: Optional[str], need_draft: bool = True) -> Models:
    from specdec.kit.loading import load_model, load_pair
    from specdec.kit.models import tiny_llama_pair

    target, draft = pick_names(target, draft, need_draft)
    try:
        if target == TOY:
            draft_model, target_model = tiny_llama_pair(seed=0)
            return Models(target_model, draft_model if need_draft else None, None, target, draft)
        if draft is None:
            target_model, tokenizer = load_model(target)
            return Models(target_model, None, tokenizer, target, None)
        target_model, draft_model, tokenizer = load_pair(target, draft)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e
    return Models(target_model, draft_model, tokenizer, target, draft)


def feature(impl: Any, module: str, name: str, flag: str) -> Any:
    """`impl.<module>.<name>`, or a clear error if this implementation does not have it yet."""
    try:
        return getattr(getattr(impl, module), name)
    except AttributeError:
        raise CLIError(f"{flag} needs {impl.package}.{module}.{name}, which the {impl.name!r} "
                       "implementation does not provide (yet): it belongs to Week 3 — see the book, "
                       "or try --impl ref") from None


# Decoding ----------------------------------------------------------------------------------------
def speculative_stream(impl, models: Models, prompt, args, stats, key, eos) -> Iterator[tuple[int, bool]]:
    """The (token, from_draft) stream for the chosen drafter / lookahead policy."""
    if args.drafter == "tree":
        if args.temperature > 0:
            raise CLIError("--drafter tree is greedy only: drop --temperature")
        if args.adaptive:
            raise CLIError("--drafter tree does not combine with --adaptive")
        tree_generate = feature(impl, "tree", "tree_speculative_generate", "--drafter tree")
        return tree_generate(models.draft, models.target, prompt, args.max_tokens,
                             eos_token_ids=eos, stats=stats)
    if args.drafter == "ngram":
        Decoder = feature(impl, "drafters", "DrafterDecoder", "--drafter ngram")
        Ngram = feature(impl, "drafters", "NgramDrafter", "--drafter ngram")
        decoder = Decoder(Ngram(), models.target, lookahead=args.k)
    else:
        decoder = impl.draft.SpeculativeDecoder(models.draft, models.target, lookahead=args.k)
    if args.adaptive:
        Speculator = feature(impl, "adaptive", "AdaptiveSpeculator", "--adaptive")
        adaptive_generate = feature(impl, "adaptive", "adaptive_generate", "--adaptive")
        # The course's default bounds are [2, 8]; widen them so any --k is a valid start.
        speculator = Speculator(policy=args.adaptive, initial_lookahead=args.k,
                                min_lookahead=min(2, args.k), max_lookahead=max(8, args.k))
        return adaptive_generate(decoder, speculator, prompt, args.max_tokens,
                                 temperature=args.temperature, key=key, eos_token_ids=eos,
                                 stats=stats)
    return impl.speculative.speculative_generate(
        decoder, prompt, args.max_tokens, temperature=args.temperature, key=key,
        eos_token_ids=eos, stats=stats)


def plain_stream(impl, models: Models, prompt, args, key, eos) -> Iterator[tuple[int, bool]]:
    tokens = impl.generate.generate_tokens(models.target, prompt, args.max_tokens,
                                           temperature=args.temperature, key=key, eos_token_ids=eos)
    return ((t, False) for t in tokens)


class Printer:
    """Streams text as tokens arrive; accepted draft tokens in green, target tokens plain."""

    def __init__(self, tokenizer, color: bool, out=None):
        self.out = out or sys.stdout
        self.color = color
        self.detok = tokenizer.detokenizer if tokenizer is not None else None
        self.count = 0

    def _write(self, text: str, green: bool) -> None:
        if text:
            self.out.write(f"{GREEN}{text}{RESET}" if green and self.color else text)
            self.out.flush()

    def prompt(self, tokens: list[int]) -> None:
        # Feeding the prompt through the detokenizer keeps spaces at the seam exactly right.
        if self.detok is None:
            self._write("prompt: " + " ".join(map(str, tokens)) + "\noutput:", False)
            return
        for t in tokens:
            self.detok.add_token(t)
        self.detok.finalize()
        self._write(self.detok.last_segment, False)

    def add(self, token: int, from_draft: bool) -> None:
        self.count += 1
        if self.detok is None:
            self._write(f" {token}", from_draft)
            return
        self.detok.add_token(token)
        self._write(self.detok.last_segment, from_draft)

    def finish(self) -> None:
        if self.detok is not None:
            self.detok.finalize()
            self._write(self.detok.last_segment, False)
        self.out.write("\n")
        self.out.flush()


def cmd_generate(args) -> int:
    import mlx.core as mx

    from specdec.kit.impl import get_impl
    from specdec.kit.stats import SpecStats

    impl = get_impl(args.impl)
    need_draft = not args.plain and args.drafter != "ngram"
    models = load_models(args.target, args.draft, need_draft)
    key = mx.random.key(args.seed) if args.temperature > 0 else None
    color = not args.no_color and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if args.batch:
        return generate_batch(impl, models, args, key)

    prompt_ids = models.encode(args.prompt)
    prompt = mx.array(prompt_ids, dtype=mx.int32)
    mode = "plain" if args.plain else describe_mode(args)
    print(f"# target {models.target_name}, draft {models.draft_name or '-'}, impl {impl.name}, "
          f"{mode}, temperature {args.temperature}")
    if color and not args.plain:
        print(f"# {GREEN}green{RESET}: draft tokens the target accepted; "
              "default colour: the target's own tokens (corrections and bonus tokens)")
    stats = SpecStats()
    start = time.perf_counter()
    # Built before printing anything: bad flag combinations fail here, with a clean message.
    if args.plain:
        stream = plain_stream(impl, models, prompt, args, key, models.eos_token_ids)
    else:
        stream = speculative_stream(impl, models, prompt, args, stats, key, models.eos_token_ids)
    printer = Printer(models.tokenizer, color)
    printer.prompt(prompt_ids)
    for token, from_draft in stream:
        printer.add(token, from_draft)
    wall = time.perf_counter() - start
    printer.finish()

    print("# ---")
    if args.plain:
        print(f"# {printer.count} tokens in {printer.count} target calls (plain decoding)")
    else:
        print(f"# {stats.summary()}")
        if args.adaptive and stats.lookahead_per_round:
            ks = stats.lookahead_per_round
            print(f"# lookahead per round: mean {statistics.mean(ks):.2f}, min {min(ks)}, max {max(ks)}")
    tps = printer.count / wall if wall > 0 else 0.0
    print(f"# {tps:.1f} tokens/s, wall {wall:.2f} s (prefill included); BLAS: {blas_info()['blas']}")
    return 0


def describe_mode(args) -> str:
    parts = [f"speculative K={args.k}", f"drafter {args.drafter}"]
    if args.adaptive:
        parts.append(f"adaptive ({args.adaptive})")
    if args.batch:
        parts.append(f"batch {args.batch}")
    return ", ".join(parts)


def batch_prompt_texts(first: str, n: int) -> list[str]:
    others = [p for p in BUILTIN_PROMPTS if p != first]
    return [first] + [others[i % len(others)] for i in range(n - 1)]


def run_batched(impl, models: Models, token_rows: list[list[int]], args, key, stats, speculative: bool):
    batch_prompts = [list(row) for row in token_rows]
    # `generate` honours EOS; `bench` ignores it unless --eos (equal lengths to compare).
    eos = models.eos_token_ids if getattr(args, "eos", True) else []
    if speculative:
        if args.drafter != "model" or args.adaptive:
            raise CLIError("--batch runs the model drafter with a fixed lookahead: "
                           "drop --drafter/--adaptive")
        decode = feature(impl, "batched", "batched_speculative_decode", "--batch")
        return decode(batch_prompts, models.draft, models.target, args.max_tokens,
                      lookahead=args.k, temperature=args.temperature, key=key,
                      eos_token_ids=eos, stats=stats)
    decode = feature(impl, "batched", "batched_plain_decode", "--batch")
    return decode(batch_prompts, models.target, args.max_tokens, eos_token_ids=eos)


def generate_batch(impl, models: Models, args, key) -> int:
    from specdec.kit.stats import SpecStats

    if args.plain:
        raise CLIError("--batch with --plain: use `specdec bench --batch N` to compare them")
    texts = batch_prompt_texts(args.prompt, args.batch)
    rows = [models.encode(t) for t in texts]
    print(f"# target {models.target_name}, draft {models.draft_name}, impl {impl.name}, "
          f"{describe_mode(args)}, temperature {args.temperature}")
    stats = SpecStats()
    start = time.perf_counter()
    outputs = run_batched(impl, models, rows, args, key, stats, speculative=True)
    wall = time.perf_counter() - start
    total = 0
    for i, (prompt_ids, out) in enumerate(zip(rows, outputs)):
        out = [int(t) for t in out]
        total += len(out)
        print(f"# --- row {i} ({len(out)} tokens)")
        if models.tokenizer is None:
            print(models.decode(prompt_ids) + " |" + " " + models.decode(out))
        else:
            print(models.decode(prompt_ids + out))
    print("# ---")
    # The batched loop records one round per live row per batched call: "target calls" in the
    # summary are row-rounds, so tokens/call reads per row, as in unbatched decoding.
    print(f"# per row: {stats.summary().replace('target calls', 'row-rounds')}")
    print(f"# {total} tokens over {len(rows)} rows, {total / wall:.1f} tokens/s, wall {wall:.2f} s; "
          f"BLAS: {blas_info()['blas']}")
    return 0


# Bench -------------------------------------------------------------------------------------------
_CODE_START = re.compile(r"^(import \w|from \S+ import |def \w|class \w+[(:]|@\w)")


def heldout_prompts(target_name: str, n: int, lines: int = 15) -> list[tuple[str, str]]:
    """(name, text) prompts from the held-out stdlib files the embedded models never trained on.

    Deterministic: files in the listed order; each prompt is `lines` lines starting at the
    file's first line of code (import/from/def/class/decorator), capped at 1200 characters.
    """
    from specdec.kit.loading import EMBEDDED

    path = EMBEDDED.get(target_name, Path(target_name))
    listing = Path(path) / "heldout_files.json"
    if not listing.is_file():
        return []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for rel in json.loads(listing.read_text()):
        try:
            text = (stdlib / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # another Python version may not have this file
        all_lines = text.splitlines()
        start = next((i for i, line in enumerate(all_lines) if _CODE_START.match(line)), 0)
        chunk = "\n".join(all_lines[start : start + lines])[:1200]
        if chunk.count("\n") >= 5:
            prompts.append((rel, chunk.rstrip()))  # no trailing newline: see BUILTIN_PROMPTS
        if len(prompts) == n:
            break
    return prompts


def bench_prompts(target_name: str, n: int) -> list[tuple[str, str]]:
    prompts = heldout_prompts(target_name, n)
    i = 0
    while len(prompts) < n:
        prompts.append((f"builtin-{i % len(BUILTIN_PROMPTS)}", BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]))
        i += 1
    return prompts


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_one(impl, models: Models, prompt_ids: list[int], args, max_tokens: int) -> dict:
    """One prompt: plain decoding, then speculative decoding, same settings."""
    import mlx.core as mx

    from specdec.kit.stats import SpecStats

    prompt = mx.array(prompt_ids, dtype=mx.int32)
    eos = models.eos_token_ids if args.eos else []
    greedy = args.temperature == 0
    key = None if greedy else mx.random.key(args.seed)
    run_args = argparse.Namespace(**{**vars(args), "max_tokens": max_tokens})
    plain, plain_s = timed(lambda: [t for t, _ in plain_stream(impl, models, prompt, run_args, key, eos)])
    stats = SpecStats()
    spec, spec_s = timed(
        lambda: [t for t, _ in speculative_stream(impl, models, prompt, run_args, stats, key, eos)])
    return bench_row(len(prompt_ids), len(plain), plain_s, len(spec), spec_s, stats,
                     (plain == spec) if greedy else None)


def bench_row(prompt_tokens: int, n_plain: int, plain_s: float, n_spec: int, spec_s: float,
              stats, identical: Optional[bool]) -> dict:
    """One line of the benchmark: throughput of both runs and the speculative run's stats."""
    plain_tps = n_plain / plain_s if plain_s > 0 else 0.0
    spec_tps = n_spec / spec_s if spec_s > 0 else 0.0
    return {
        "prompt_tokens": prompt_tokens,
        "plain_tokens": n_plain,
        "speculative_tokens": n_spec,
        "plain_tokens_per_s": plain_tps,
        "speculative_tokens_per_s": spec_tps,
        "speedup": spec_tps / plain_tps if plain_tps > 0 else 0.0,
        "acceptance_rate": stats.acceptance_rate,
        "alpha": stats.alpha_estimate,
        "mean_accepted_length": stats.mean_accepted_length,
        "tokens_per_target_call": stats.tokens_per_round,
        "identical": identical,
    }


def bench_batch(impl, models: Models, rows: list[list[int]], args, max_tokens: int) -> dict:
    import mlx.core as mx

    from specdec.kit.stats import SpecStats

    greedy = args.temperature == 0
    key = None if greedy else mx.random.key(args.seed)
    run_args = argparse.Namespace(**{**vars(args), "max_tokens": max_tokens})
    plain, plain_s = timed(lambda: run_batched(impl, models, rows, run_args, None, None, False))
    stats = SpecStats()
    spec, spec_s = timed(lambda: run_batched(impl, models, rows, run_args, key, stats, True))
    plain = [[int(t) for t in r] for r in plain]
    spec = [[int(t) for t in r] for r in spec]
    return bench_row(sum(map(len, rows)), sum(map(len, plain)), plain_s, sum(map(len, spec)),
                     spec_s, stats, (plain == spec) if greedy else None)


MEDIAN_KEYS = ["plain_tokens_per_s", "speculative_tokens_per_s", "speedup", "acceptance_rate",
               "alpha", "mean_accepted_length", "tokens_per_target_call"]


def cmd_bench(args) -> int:
    from specdec.kit.impl import get_impl

    impl = get_impl(args.impl)
    models = load_models(args.target, args.draft, need_draft=args.drafter != "ngram")
    batch = args.batch or 0
    pool = bench_prompts(models.target_name, args.prompts * max(batch, 1))
    encoded = [(name, models.encode(text)) for name, text in pool]

    def run(i: int, max_tokens: int) -> dict:
        if batch:
            group = encoded[i * batch : (i + 1) * batch]
            return bench_batch(impl, models, [ids for _, ids in group], args, max_tokens)
        return bench_one(impl, models, encoded[i][1], args, max_tokens)

    if not args.json:
        print(f"# specdec bench: target {models.target_name}, draft {models.draft_name or '-'}, "
              f"impl {impl.name}, {describe_mode(args)}, temperature {args.temperature}, "
              f"{args.max_tokens} tokens per prompt, EOS {'honoured' if args.eos else 'ignored'}")
        print(f"# BLAS: {blas_info()['blas']}")
        print("# warm-up run ...", flush=True)
    run(0, min(args.max_tokens, 16))  # compiles kernels, fills allocator caches

    results = []
    for i in range(args.prompts):
        row = run(i, args.max_tokens)
        # A batch is named by its first prompt: "copy.py +3" is copy.py and the next 3.
        row["prompt"] = f"{encoded[i * batch][0]} +{batch - 1}" if batch else encoded[i][0]
        results.append(row)
        if not args.json:
            if i == 0:
                print(f"{'#':>3} {'prompt':<28} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>8} "
                      f"{'accept':>7} {'alpha':>6} {'mean acc':>8} {'tok/call':>8} {'identical':>9}")
            print(format_row(str(i + 1), row["prompt"], row), flush=True)
    median = {k: statistics.median(r[k] for r in results) for k in MEDIAN_KEYS}
    identical = [r["identical"] for r in results]
    median["all_identical"] = None if None in identical else all(identical)
    report = {
        "target": models.target_name,
        "draft": models.draft_name,
        "impl": impl.name,
        "k": args.k,
        "drafter": args.drafter,
        "adaptive": args.adaptive,
        "batch": batch or None,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "eos": args.eos,
        "blas": blas_info(),
        "prompts": results,
        "median": median,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_row("", "median", {**median, "identical": median["all_identical"]}))
    return 0


def format_row(index: str, name: str, r: dict) -> str:
    same = {True: "yes", False: "NO", None: "n/a"}[r["identical"]]
    name = name if len(name) <= 28 else "…" + name[-27:]
    return (f"{index:>3} {name:<28} {r['plain_tokens_per_s']:>11.1f} {r['speculative_tokens_per_s']:>10.1f} "
            f"{r['speedup']:>7.2f}x {r['acceptance_rate']:>7.1%} {r['alpha']:>6.3f} "
            f"{r['mean_accepted_length']:>8.2f} "
            f"{r['tokens_per_target_call']:>8.2f} {same:>9}")


# Doctor ------------------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    import platform

    import mlx.core as mx
    import numpy as np

    from specdec.kit.loading import EMBEDDED, embedded_available
    from specdec.kit.timing import find_openblas, median_time

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

    # A 512x512 float32 matmul on the CPU: MLX vs numpy tells a slow BLAS at a glance.
    a = mx.random.normal((512, 512), key=mx.random.key(0))
    b = np.asarray(a)
    with mx.stream(mx.cpu):
        t_mlx = median_time(lambda: mx.eval(a @ a), repeats=5)
    t_np = median_time(lambda: b @ b, repeats=5)
    print(f"matmul       512x512 float32 on CPU: MLX {t_mlx * 1e3:.2f} ms, numpy {t_np * 1e3:.2f} ms")

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


# Grade -------------------------------------------------------------------------------------------
def cmd_grade(args) -> int:
    from specdec.kit.grade import grade

    return grade(week=args.week, day=args.day, verbose=args.verbose)


# Entry point -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculate: speculative decoding on MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--impl", choices=["ref", "student"], default="ref",
                       help="ref: the reference solution (default); student: your src/specdec")
        p.add_argument("--target", default=None,
                       help=f"target model: tiny-code (default), a local mlx-lm dir, a hub id, or {TOY}")
        p.add_argument("--draft", default=None,
                       help="draft model (default: tiny-code-draft for tiny-code)")
        p.add_argument("--k", type=int, default=4, help="draft length K (lookahead), default 4")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--seed", type=int, default=0, help="PRNG seed when sampling")
        p.add_argument("--adaptive", choices=["threshold", "heuristic", "goodput"], default=None,
                       help="adapt K between rounds with this policy (Week 3 Day 1)")
        p.add_argument("--drafter", choices=["model", "ngram", "tree"], default="model",
                       help="model: the draft model (default); ngram: prompt lookup (Week 3 Day 3); "
                            "tree: token trees (Week 3 Day 4, greedy)")
        p.add_argument("--batch", type=int, default=None, metavar="N",
                       help="batched speculative decoding over N prompts (Week 3 Day 2)")

    g = sub.add_parser("generate", help="decode one prompt, colour-coding draft vs target tokens")
    model_flags(g)
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--plain", action="store_true", help="plain target decoding (no draft)")
    g.add_argument("--no-color", action="store_true", help="no ANSI colours")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="plain vs speculative decoding over held-out code prompts")
    model_flags(b)
    b.add_argument("--prompts", type=int, default=10, help="prompts (batches with --batch), default 10")
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--eos", action="store_true", help="stop at EOS (default: ignore it, equal lengths)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench)

    gr = sub.add_parser("grade", help="run the graded tests on your tree and print a scoreboard")
    gr.add_argument("--week", type=int, default=None)
    gr.add_argument("--day", type=int, default=None)
    gr.add_argument("-v", "--verbose", action="store_true", help="show pytest's failure details")
    gr.set_defaults(func=cmd_grade)

    d = sub.add_parser("doctor", help="MLX version, device, BLAS, embedded models")
    d.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None:  # a real command line (not a test calling main): maybe get a fast BLAS first
        maybe_reexec_with_openblas(sys.argv[1:])
        argv = sys.argv[1:]
    args = build_parser().parse_args(argv)
    for flag in ("k", "max_tokens", "prompts", "batch"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            print(f"specdec: error: --{flag.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except CLIError as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"\nspecdec: {e}\nThat is one of your exercises: finish it, or run with --impl ref to "
              "use the reference solution.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `specdec bench --json | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
