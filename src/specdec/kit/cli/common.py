"""What `generate` and `bench` share: flags, settings, models, and the decoding streams.

One path from the command line to a run: `add_decoding_flags` declares the flags; `prepare`
picks the implementation (the student's, with the reference for unfinished tasks) and builds
its `SpeculativeConfig` (Week 4 Day 1) from the flags, so that the config's own validation, plus
the few checks of flags that are not settings, report every problem at once (CLIError, one line
each, naming the flag, the value and the fix); `load_models` loads the pair; `plain_stream`,
`speculative_stream` (fixed K, adaptive K, n-grams, trees, or the Week 4 Day 3 fallback
controller) and `run_batched` decode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

from specdec.kit.drafter_registry import DRAFTER_NAMES, DRAFTERS, DrafterError, DrafterOptions

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
    """A problem the user can fix: printed as `specdec: error: ...` lines, no traceback.

    Several problems found at once are one CLIError with one line each.
    """


# Fast BLAS on Linux ------------------------------------------------------------------------------
def maybe_reexec_with_openblas(args: list[str]) -> None:
    """Re-run this very command with a system OpenBLAS preloaded (Linux; generate and bench only).

    MLX's CPU wheel bundles a reference BLAS whose matmuls are tens of times slower than
    OpenBLAS, which makes a K-token verification cost about K single-token forwards and hides
    the whole point of speculative decoding. LD_PRELOAD only works at process start, hence exec.
    `bench` (and `bench --suite`) also gets OPENBLAS_NUM_THREADS=1 unless it is set, as the Week 4
    Day 5 rule table asks: a benchmark wants steady timings, not threads fighting over cores.
    """
    command = next((a for a in args if not a.startswith("-")), None)
    if command in ("generate", "bench", "serve"):
        reexec_for_speed("specdec.kit.cli", args, one_blas_thread=command == "bench")


def reexec_for_speed(module: str, args: list[str], one_blas_thread: bool) -> None:
    """`python -m module *args` again, with the system OpenBLAS preloaded (Linux) and, if
    `one_blas_thread`, OPENBLAS_NUM_THREADS=1 unless already set. Both are read only when a
    process starts, hence exec. Does nothing without a system OpenBLAS, off Linux, once already
    re-run, or with SPECDEC_NO_OPENBLAS=1."""
    from specdec.kit.timing import find_openblas

    if (not sys.platform.startswith("linux") or os.environ.get("SPECDEC_NO_OPENBLAS")
            or os.environ.get("SPECDEC_REEXEC")):
        return
    lib = find_openblas()
    preload = os.environ.get("LD_PRELOAD", "")
    if not lib:
        return
    set_threads = one_blas_thread and os.environ.get("OPENBLAS_NUM_THREADS") is None
    if lib in preload and not set_threads:
        return
    env = dict(os.environ, SPECDEC_REEXEC="1")
    if lib not in preload:
        env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    if set_threads:
        env["OPENBLAS_NUM_THREADS"] = "1"
    threads = f", OPENBLAS_NUM_THREADS={env['OPENBLAS_NUM_THREADS']}" if one_blas_thread else ""
    print(f"specdec: preloading {lib} for fast CPU matmuls{threads} (SPECDEC_NO_OPENBLAS=1 turns "
          "this off)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *args], env)


# Held-out prompts (bench and the suite) -----------------------------------------------------------------------------------------
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
    """n (name, text) prompts: held-out files first, then the built-in prompts, cycled."""
    prompts = heldout_prompts(target_name, n)
    i = 0
    while len(prompts) < n:
        prompts.append((f"builtin-{i % len(BUILTIN_PROMPTS)}", BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]))
        i += 1
    return prompts


# Flags, their checks, and the settings they make -------------------------------------------------
def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """The flags `generate` and `bench` share: implementation, models, and the decoding settings."""
    p.add_argument("--impl", choices=["ref", "student"], default="ref",
                   help="ref: the reference solution (default); student: your src/specdec, with the "
                        "reference standing in for tasks you have not implemented yet")
    p.add_argument("--target", default=None,
                   help=f"target model: tiny-code (default), a local mlx-lm dir, a hub id, or {TOY}")
    p.add_argument("--draft", default=None,
                   help="draft model (default: tiny-code-draft for tiny-code)")
    p.add_argument("--k", type=int, default=4,
                   help="draft length K (lookahead), default 4; with the fallback controller, the "
                        "largest K it may choose")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate, default 128")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed when sampling; for generate, a --seed given with --temperature > 0 "
                        "selects the coupled rule (Week 5 Day 1): the same text for any K, drafter or batch")
    p.add_argument("--adaptive", choices=["threshold", "heuristic", "goodput"], default=None,
                   help="adapt K between rounds with this policy (Week 3 Day 1)")
    p.add_argument("--drafter", choices=list(DRAFTER_NAMES), default="model",
                   help="model: the draft model (default); ngram: prompt lookup (Week 3 Day 3); "
                        "tree: token trees (Week 3 Day 4; greedy, or sampled with --seed: Week 5 "
                        "Day 1); medusa: Medusa heads on the target's hidden state (Week 5 Day 2; "
                        "--heads); eagle: the EAGLE drafter (Week 5 Day 3; --heads); layerskip: "
                        "the target with layers skipped (Week 5 Day 4; --skip-layers). All but "
                        "model and tree need no draft model")
    p.add_argument("--heads", default=None, metavar="DIR",
                   help="--drafter medusa|eagle: the trained weights (a directory written by "
                        "scripts/train_heads.py for Medusa); default: the ones shipped for the "
                        "embedded target (toy-llama: untrained Medusa heads, each a copy of the "
                        "LM head); they must match the target's hidden size")
    p.add_argument("--skip-layers", default="auto", metavar="SPEC",
                   help="--drafter layerskip: the layers to skip, e.g. 4 or 3,4; auto (default) "
                        "skips a quarter of the layers (at least one), auto:N skips N, chosen by "
                        "the measured greedy agreement of Week 5 Day 4's choose_layers_to_skip on "
                        "the built-in prompts")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="batched speculative decoding over N prompts (Week 3 Day 2; every --drafter "
                        "but tree: ngram, medusa and eagle through Week 4 Day 5's scheduler)")
    p.add_argument("--no-fallback", action="store_true",
                   help="turn off the fallback controller (Week 4 Day 3), which picks K in 0..--k "
                        "each round and decodes plainly while speculation does not pay: fixed K")


# SpeculativeConfig field -> the flag that sets it (config problems are reported in flag terms).
FLAG_OF_FIELD = {
    "lookahead": "--k", "min_lookahead": "--k", "max_lookahead": "--k", "adaptive": "--adaptive",
    "temperature": "--temperature", "max_tokens": "--max-tokens", "drafter": "--drafter",
    "batch_size": "--batch", "fallback": "--no-fallback", "seed": "--seed",
}


def fallback_off_reason(args: argparse.Namespace) -> Optional[str]:
    """Why the fallback controller is off for these flags, or None when it is on."""
    if getattr(args, "plain", False):
        return "plain decoding"
    if args.no_fallback:
        return "--no-fallback"
    if args.adaptive:
        return f"--adaptive {args.adaptive} chooses K itself"
    if args.drafter == "tree":
        return "--drafter tree: token trees run a loop of their own, with a fixed depth"
    return None


def config_fields(args: argparse.Namespace) -> dict:
    """The SpeculativeConfig fields the flags set (the rest keep their defaults)."""
    k = args.k
    return dict(
        lookahead=k,
        # Adaptive K moves in [min, max]; the course's default bounds are [2, 8], widened so
        # that any valid --k is a valid start.
        min_lookahead=max(1, min(2, k)) if args.adaptive else 1,
        max_lookahead=max(8, k),
        adaptive=args.adaptive,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        drafter=args.drafter,
        batch_size=args.batch if args.batch is not None else 1,
        fallback=fallback_off_reason(args) is None,
        seed=args.seed,
    )


def config_problems(error: Exception) -> list[str]:
    """The problems of a ConfigError, one line each, told in terms of the flags that set them.

    "lookahead 0 < 1: ..." becomes "--k (lookahead) 0 < 1: ...". --k sets three fields (K and
    its bounds): only the first of their problems is kept, the others repeat the same mistake.
    """
    lines = getattr(error, "problems", None)
    if lines is None:  # a ValueError of another kind: its lines, less a "N problems in ...:" header
        lines = [line.strip().lstrip("-").strip() for line in str(error).splitlines()
                 if line.strip() and not line.rstrip().endswith(":")]
    out, flags_seen = [], set()
    for line in map(str, lines):
        field = line.split(" ", 1)[0]
        flag = FLAG_OF_FIELD.get(field)
        if flag is None:
            out.append(line)
            continue
        if flag == "--k" and flag in flags_seen:
            continue
        flags_seen.add(flag)
        named = flag if flag == "--" + field else f"{flag} ({field})"
        out.append(named + line[len(field):])
    return out


def build_config(impl, args: argparse.Namespace):
    """(SpeculativeConfig from the flags, []) or (None, its problems): its own validation speaks."""
    SpeculativeConfig = feature(impl, "config", "SpeculativeConfig", "generate/bench")
    try:
        return SpeculativeConfig(**config_fields(args)), []
    except ValueError as e:  # ConfigError: every problem at once, one per line
        return None, config_problems(e)


def prepare(args: argparse.Namespace):
    """(impl, config) for `generate` / `bench`, or a CLIError listing every problem with the flags."""
    problems = cli_problems(args)
    impl = pick_impl(args.impl)
    config, more = build_config(impl, args)
    problems += [p for p in more if p not in problems]
    if problems:
        raise CLIError("\n".join(problems))
    return impl, config


def cli_problems(args: argparse.Namespace) -> list[str]:
    """Problems with the flags that are not decoding settings (SpeculativeConfig checks those)."""
    problems = []
    prompts = getattr(args, "prompts", None)
    if prompts is not None and prompts < 1:
        problems.append(f"--prompts must be >= 1, got {prompts}: the number of prompts to run "
                        "(try --prompts 5)")
    if getattr(args, "prompt", None) == "":
        problems.append("--prompt is empty: decoding starts from at least one token; "
                        "give some text, e.g. --prompt 'def fibonacci(n):'")
    for flag in ("target", "draft"):
        problem = model_name_problem(f"--{flag}", getattr(args, flag))
        if problem:
            problems.append(problem)
    problems += combination_problems(args)
    return problems


def combination_problems(args: argparse.Namespace) -> list[str]:
    """Flags that do not go together and are not settings of SpeculativeConfig (it checks those:
    trees are greedy and fixed-depth, a batch needs a drafter that drafts every row, fixed K)."""
    problems = []
    if args.batch and getattr(args, "plain", False):
        problems.append("--batch with --plain: use `specdec bench --batch N` to compare plain and "
                        "speculative batched decoding")
    if getattr(args, "heads", None) is not None and args.drafter not in ("medusa", "eagle"):
        problems.append(f"--heads {args.heads} with --drafter {args.drafter}: trained weights are "
                        "for --drafter medusa or eagle")
    if getattr(args, "skip_layers", "auto") != "auto" and args.drafter != "layerskip":
        problems.append(f"--skip-layers {args.skip_layers} with --drafter {args.drafter}: layers "
                        "are skipped by --drafter layerskip")
    return problems


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_name_problem(flag: str, name: Optional[str]) -> Optional[str]:
    """Why `name` cannot be a model, or None: an embedded name, toy-llama, a model dir, a hub id."""
    from specdec.kit.loading import EMBEDDED

    if name is None or name == TOY or name in EMBEDDED:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return (f"{flag} {name}: the directory has no config.json; an mlx-lm model directory "
                    "holds config.json, tokenizer files and *.safetensors")
        return None
    if path.exists():
        return f"{flag} {name}: a file, not a model directory; pass the directory that holds config.json"
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return None  # a hub id: mlx-lm downloads it (Mac) or reports why not
    known = ", ".join([*EMBEDDED, TOY])
    return (f"{flag} {name}: no such directory and not a known model; use one of {known}, "
            "a local mlx-lm directory, or a hub id such as mlx-community/Qwen3-0.6B-4bit")


# Models ------------------------------------------------------------------------------------------
@dataclass
class Models:
    target: Any
    draft: Any  # None when no draft model is needed (plain decoding, n-gram drafting)
    tokenizer: Any  # mlx-lm TokenizerWrapper, or None for toy-llama
    target_name: str
    draft_name: Optional[str]
    # What `prepare_drafter` settled once per run: loaded heads, the layers to skip.
    drafter_options: DrafterOptions = DrafterOptions()
    batched: Any = None  # (drafter name, what drafts for its --batch): built once per run

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
            raise CLIError(f"no --draft given for --target {target}: pass a draft model that "
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
    except Exception as e:  # a hub id mlx-lm could not fetch or read: say which and why
        names = " / ".join(n for n in (target, draft) if n)
        raise CLIError(f"could not load {names} ({type(e).__name__}: {e}); check the name, "
                       "or pass a local mlx-lm directory") from e
    return Models(target_model, draft_model, tokenizer, target, draft)


def needs_draft_model(drafter: str) -> bool:
    """Whether `--drafter NAME` drafts with a draft model (model, tree) or needs none."""
    return DRAFTERS[drafter].needs_draft_model


def calibration_tokens(models: Models, limit: int = 128) -> list[int]:
    """Short text to measure a drafter on before the run: the built-in prompts, encoded."""
    return models.encode("\n\n\n".join(BUILTIN_PROMPTS))[:limit]


def prepare_drafter(impl, models: Models, config, args: argparse.Namespace) -> list[str]:
    """Settle the drafter's options once for the run, into `models.drafter_options`: load the
    Medusa heads (--heads, the shipped ones, or for toy-llama untrained ones), choose the layers
    to skip (--skip-layers). Returns '# ...' lines saying what was chosen; CLIError on problems."""
    from specdec.kit.drafter_registry import choose_skip, load_medusa_heads, untrained_medusa_heads
    from specdec.kit.loading import DEFAULT_TARGET

    heads, notes = getattr(args, "heads", None), []
    options = DrafterOptions(max_ngram=config.max_ngram, min_ngram=config.min_ngram)
    if (config.drafter in ("medusa", "eagle") and heads is None
            and models.target_name not in (DEFAULT_TARGET, TOY)):
        script = "train_heads.py" if config.drafter == "medusa" else "train_eagle.py"
        raise CLIError(f"--drafter {config.drafter} with --target {models.target_name}: the shipped "
                       f"weights were trained for {DEFAULT_TARGET}; pass --heads DIR with weights "
                       f"trained for this target (scripts/{script} --out DIR)")
    try:
        if config.drafter == "medusa":
            if heads is None and models.target_name == TOY:
                loaded = untrained_medusa_heads(impl, models.target)
                where = "untrained (toy-llama: each head a copy of the LM head)"
            else:
                from specdec.kit.features import MEDUSA_HEADS

                loaded = load_medusa_heads(impl, models.target, heads)
                where = f"from {heads or MEDUSA_HEADS}"
            options = replace(options, heads=loaded)
            notes.append(f"# medusa: {loaded.num_heads} heads {where}; a round drafts "
                         f"min(K, {loaded.num_heads}) tokens")
        elif config.drafter == "eagle":
            options = replace(options, eagle=heads)
        elif config.drafter == "layerskip":
            from specdec.kit.layers import decoder_parts

            skip = choose_skip(impl, models.target, args.skip_layers, calibration_tokens(models))
            num_layers = len(decoder_parts(models.target).layers)
            how = (f"--skip-layers {args.skip_layers}: chosen by greedy agreement on the built-in "
                   "prompts" if str(args.skip_layers).startswith("auto") else "--skip-layers")
            notes.append(f"# layerskip: skipping layers {list(skip)} of {num_layers} ({how})")
            options = replace(options, skip_layers=tuple(skip))
    except DrafterError as e:
        raise CLIError(str(e)) from None
    models.drafter_options = options
    if config.drafter != "tree":
        make_decoder(impl, models, config)  # a drafter that cannot be built says so before the run
    return notes


def make_decoder(impl, models: Models, config):
    """A fresh decoder for `config.drafter` (not tree) and `config.lookahead`, through the
    registry (kit/drafter_registry.py), with the options `prepare_drafter` settled."""
    from specdec.kit.drafter_registry import build_decoder

    options = replace(models.drafter_options, max_ngram=config.max_ngram, min_ngram=config.min_ngram)
    try:
        return build_decoder(impl, config.drafter, models.target, models.draft,
                             lookahead=config.lookahead, options=options)
    except DrafterError as e:
        raise CLIError(str(e)) from None


def pick_impl(name: str):
    """The implementation to run; for "student", the reference stands in for unfinished tasks
    (`get_impl(..., fallback=True)` says which, in one line on stderr)."""
    from specdec.kit.impl import get_impl

    return get_impl(name, fallback=True)


def feature(impl: Any, module: str, name: str, flag: str) -> Any:
    """`impl.<module>.<name>`, or a clear error if this implementation does not have it yet."""
    try:
        return getattr(getattr(impl, module), name)
    except AttributeError:
        raise CLIError(f"{flag} needs {impl.package}.{module}.{name}, which the {impl.name!r} "
                       "implementation does not provide (yet); try --impl ref") from None


# Decoding ----------------------------------------------------------------------------------------
def make_key(config):
    import mlx.core as mx

    return mx.random.key(config.seed) if config.temperature > 0 else None


def make_controller(impl, config):
    """A fresh fallback controller for one run (None when the config turns fallback off).

    --k is the largest K it may choose; it starts there once it has timed a few plain rounds.
    """
    if not config.fallback:
        return None
    Controller = feature(impl, "fallback", "FallbackController", "the fallback controller")
    return Controller(max_lookahead=config.lookahead, window=config.fallback_window,
                      margin=config.fallback_margin, probe_every=config.probe_every,
                      initial_lookahead=config.lookahead, probe_budget=config.probe_budget)


def speculative_stream(impl, models: Models, prompt, config, stats, key, eos,
                       controller=None) -> Iterator[tuple[int, bool]]:
    """The (token, from_draft) stream for the chosen drafter / lookahead policy.

    controller: a fallback controller (`make_controller`) to run the fallback loop with; None
    runs the config's drafter with fixed K (or adaptive K).
    """
    if config.drafter == "tree":
        tree_generate = feature(impl, "tree", "tree_speculative_generate", "--drafter tree")
        return tree_generate(models.draft, models.target, prompt, config.max_tokens,
                             eos_token_ids=eos, stats=stats, branching=config.tree_branching,
                             depth=config.lookahead)
    decoder = make_decoder(impl, models, config)
    if controller is not None:
        fallback_generate = feature(impl, "fallback", "fallback_generate", "the fallback controller")
        return fallback_generate(decoder, controller, prompt, config.max_tokens,
                                 temperature=config.temperature, key=key, eos_token_ids=eos,
                                 stats=stats, memory_limit_mb=config.memory_limit_mb)
    if config.adaptive:
        Speculator = feature(impl, "adaptive", "AdaptiveSpeculator", "--adaptive")
        adaptive_generate = feature(impl, "adaptive", "adaptive_generate", "--adaptive")
        speculator = Speculator(policy=config.adaptive, initial_lookahead=config.lookahead,
                                min_lookahead=config.min_lookahead, max_lookahead=config.max_lookahead,
                                window=config.window, raise_above=config.raise_above,
                                lower_below=config.lower_below)
        return adaptive_generate(decoder, speculator, prompt, config.max_tokens,
                                 temperature=config.temperature, key=key, eos_token_ids=eos,
                                 stats=stats)
    return impl.speculative.speculative_generate(
        decoder, prompt, config.max_tokens, temperature=config.temperature, key=key,
        eos_token_ids=eos, stats=stats)


def plain_stream(impl, models: Models, prompt, config, key, eos) -> Iterator[tuple[int, bool]]:
    tokens = impl.generate.generate_tokens(models.target, prompt, config.max_tokens,
                                           temperature=config.temperature, key=key, eos_token_ids=eos)
    return ((t, False) for t in tokens)


SCHEDULED_DRAFTERS = ("ngram", "medusa", "eagle")  # batched through Week 4 Day 5's scheduler


def batched_drafter(impl, models: Models, config):
    """The draft model of `--batch` for --drafter model|layerskip|medusa|eagle, built once per
    run (`drafter_registry.batched_draft`; medusa and eagle: a kit/self_serving adapter)."""
    from specdec.kit.drafter_registry import DrafterError, batched_draft

    if models.batched is not None and models.batched[0] == config.drafter:
        return models.batched[1]
    try:
        draft = batched_draft(impl, config.drafter, models.target, models.draft, models.drafter_options)
    except DrafterError as e:
        raise CLIError(str(e)) from None
    models.batched = (config.drafter, draft)
    return draft


def run_batched(impl, models: Models, token_rows: list[list[int]], config, key, stats, eos,
                mode: str, controller=None, sampling=None):
    """Batched decoding of `token_rows`. mode: "plain" (greedy), "speculative" (fixed K) or
    "fallback" (K from `controller`, 0 = a plain round). --drafter ngram|medusa|eagle run in
    Week 4 Day 5's scheduler (kit/self_serving.py), and so does their plain baseline; there
    row i samples with seed config.seed + i under `sampling` (None: the scheduler's default)."""
    batch_prompts = [list(row) for row in token_rows]
    draft = models.draft
    if mode != "plain" and config.drafter != "model":
        draft = batched_drafter(impl, models, config)
        if config.drafter in SCHEDULED_DRAFTERS:  # kit/self_serving adapters: the scheduler
            from specdec.kit.self_serving import decode_batch

            Scheduler = feature(impl, "serving", "Scheduler", f"--batch with --drafter {config.drafter}")
            seeds = [config.seed + i for i in range(len(batch_prompts))]
            return decode_batch(Scheduler, draft, batch_prompts, config.max_tokens, config.lookahead,
                                config.temperature, seeds, eos, controller, stats, sampling)
    if mode == "fallback":
        decode = feature(impl, "fallback", "batched_fallback_decode", "--batch with fallback")
        return decode(batch_prompts, draft, models.target, controller,
                      max_tokens=config.max_tokens, temperature=config.temperature, key=key,
                      eos_token_ids=eos, stats=stats, memory_limit_mb=config.memory_limit_mb)
    if mode == "speculative":
        decode = feature(impl, "batched", "batched_speculative_decode", "--batch")
        return decode(batch_prompts, draft, models.target, config.max_tokens,
                      lookahead=config.lookahead, temperature=config.temperature, key=key,
                      eos_token_ids=eos, stats=stats)
    if config.drafter in SCHEDULED_DRAFTERS:  # like for like: the same scheduler, with no draft
        from specdec.kit.self_serving import decode_plain

        Scheduler = feature(impl, "serving", "Scheduler", f"--batch with --drafter {config.drafter}")
        return decode_plain(Scheduler, models.target, batch_prompts, config.max_tokens, eos)
    decode = feature(impl, "batched", "batched_plain_decode", "--batch")
    return decode(batch_prompts, models.target, config.max_tokens, eos_token_ids=eos)


def describe_mode(config, fallback_note: Optional[str] = None) -> str:
    """'speculative with fallback: K in 0..4 per round (0 = plain), drafter model' and the like."""
    if config.adaptive:
        parts = [f"speculative, adaptive K ({config.adaptive}) from {config.lookahead} "
                 f"in {config.min_lookahead}..{config.max_lookahead}"]
    elif config.drafter == "tree":
        parts = [f"speculative, token trees (branching {config.tree_branching}, "
                 f"depth {config.lookahead})"]
    elif config.fallback:
        parts = [f"speculative with fallback: K in 0..{config.lookahead} per round (0 = plain)"]
    else:
        parts = [f"speculative K={config.lookahead}"]
    parts.append(f"drafter {config.drafter}")
    if config.batch_size > 1:
        parts.append(f"batch {config.batch_size}")
    if not config.fallback:
        parts.append(f"fallback off ({fallback_note})" if fallback_note else "fallback off")
    return ", ".join(parts)


def acceptance_by_position(impl, stats_or_rounds) -> list[float]:
    """P(draft j accepted | the round reached draft j), j = 0, 1, ... (Week 4 Day 2 metrics:
    positions are 0-based, as in the book; j = 0 is each round's first draft).

    stats_or_rounds: a SpecStats, or a list of (K, accepted) rounds (several runs pooled).
    """
    per_position = feature(impl, "metrics", "acceptance_per_position", "per-position acceptance")
    return [float(r) for r in per_position(stats_or_rounds)]


def format_positions(rates: list[float], limit: int = 12) -> str:
    """'0: 92%  1: 85%  2: 71%  (position 0 = first draft)': the first `limit` positions, 0-based
    as in the book and `metrics.acceptance_per_position`, and the line says so."""
    shown = "  ".join(f"{j}: {r:.0%}" for j, r in enumerate(rates[:limit]))
    if not shown:
        return "no drafts"
    return shown + ("  ..." if len(rates) > limit else "") + "  (position 0 = first draft)"


def rounds_of(stats_list) -> list[tuple[int, int]]:
    """Every (K, accepted) round of several runs, pooled (for per-position acceptance)."""
    return [(k, n) for stats in stats_list
            for k, n in zip(stats.lookahead_per_round, stats.accepted_per_round)]


def blas_note() -> str:
    """'BLAS: <name>', with a pointer to `specdec doctor` when it is the slow one."""
    from specdec.kit.timing import blas_info

    name = blas_info()["blas"]
    return f"BLAS: {name}" + ("" if not name.startswith("MLX bundled") else "; see `specdec doctor`")
