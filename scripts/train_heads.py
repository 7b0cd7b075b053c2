#!/usr/bin/env python
"""Train Medusa heads for the embedded target (Week 5 Day 2) by self-distillation.

What this does
--------------
1. Corpus and split: exactly those of ``scripts/train_models.py`` (the standard library's
   ``.py`` files; a file is held out iff ``sha1(path) % 20 == 0``), tokenized with the
   target's own tokenizer. Training windows come from the training files only.
2. The target is frozen. Its final-normed hidden states on ``--windows`` training windows of
   ``--context`` tokens are computed ONCE, before training (``specdec.kit.features``); its
   next-token distributions are ``lm_head(hidden)``, recomputed per batch from them (cheaper
   than storing V = 4096 probabilities per token).
3. Heads: ``MedusaHeads(512, K)`` from the reference solution, zero-initialised (each head
   starts as the LM head), trained with ``medusa_loss`` (soft cross-entropy of head k at t
   against the target's law of token t + 1 + k), the sum over heads, AdamW, linear warmup +
   cosine decay, ``--epochs`` passes over the precomputed windows in a seeded order.
4. Evaluation on held-out windows: per-head top-1 agreement with the target's greedy token
   (head k at t against argmax of the target at t + k) — the greedy acceptance of head k's
   draft if every earlier draft was right — before training and every ``--eval-every`` steps.
5. Output (``--out``, default ``src/specdec/kit/assets/tiny-code-medusa``): heads.safetensors
   (float16), config.json (hidden size, K, settings) and training_log.json (loss per step,
   held-out per-head top-1 per evaluation).

``--bench`` instead measures the shipped heads on held-out prompts: per-head top-1 acceptance
in decoding, mean accepted length per round, and tokens/s of Medusa, plain greedy and the
draft-model path, interleaved prompt by prompt (the machine is shared: treat times as noisy).

Reproduce (CPU, float32, one BLAS thread)::

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1
    export PYTHONPATH=$PWD/src:$PWD/solutions
    nice -n 10 python -u scripts/train_heads.py
    nice -n 10 python -u scripts/train_heads.py --bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from train_models import EOS, encode_stream, load_corpus, windows  # noqa: E402

from specdec.kit.features import MEDUSA_HEADS, FeatureModel, load_heads, save_heads  # noqa: E402
from specdec.kit.loading import load_model, resolve_model_path  # noqa: E402
from specdec_ref.medusa import MedusaHeads, medusa_loss  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def token_windows(tokenizer_path: Path, context: int, train: bool = True, files: int = 0,
                  seed: int = 0):
    """(train windows or None, held-out windows) of context + 1 tokens, by the target's tokenizer.

    files > 0: encode only that many training files, drawn with `seed` (encoding all of them
    takes minutes on a busy machine, and a few hundred give more windows than we train on).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    train_files, heldout = load_corpus(256_000)
    if files and train:
        pick = np.random.default_rng(seed).choice(len(train_files), files, replace=False)
        train_files = [train_files[i] for i in sorted(pick)]
    train_win = windows(encode_stream(tok, [t for _, t in train_files]), context) if train else None
    val_win = windows(encode_stream(tok, [t for _, t in heldout]), context)
    return train_win, val_win


def features(fm: FeatureModel, tokens: np.ndarray, batch: int) -> mx.array:
    """The frozen target's hidden states [N, L, D] on N windows, computed once."""
    out = []
    for i in range(0, len(tokens), batch):
        fm(mx.array(tokens[i : i + batch]))
        mx.eval(fm.hidden)
        out.append(fm.hidden)
    return mx.concatenate(out)


def head_top1(heads, hidden: mx.array, lm_head) -> list[float]:
    """Per head k: fraction of positions t where head k's argmax at t == target's argmax at t+k."""
    target_top = mx.argmax(lm_head(hidden), axis=-1)  # [N, L]
    head_top = mx.argmax(heads(hidden, lm_head), axis=-1)  # [N, L, K]
    L = hidden.shape[1]
    return [
        (head_top[:, : L - k, k - 1] == target_top[:, k:]).astype(mx.float32).mean().item()
        for k in range(1, heads.num_heads + 1)
    ]


def train(a) -> None:
    np.random.seed(a.seed)
    mx.random.seed(a.seed)
    target, _ = load_model("tiny-code", dtype=mx.float32)
    target.freeze()
    fm = FeatureModel(target)
    t0 = time.perf_counter()
    train_win, val_win = token_windows(Path(resolve_model_path("tiny-code")) / "tokenizer.json",
                                       a.context, files=a.files, seed=a.seed)
    rng = np.random.default_rng(a.seed)
    chosen = train_win[rng.choice(len(train_win), a.windows, replace=False)][:, :-1]
    val = val_win[np.linspace(0, len(val_win) - 1, a.val_windows).astype(int)][:, :-1]
    log(f"windows: {len(train_win)} train, {len(val_win)} held-out; using {a.windows} x "
        f"{a.context} = {a.windows * a.context} training tokens, {a.val_windows} held-out windows")
    hidden = features(fm, chosen, a.batch_size)
    val_hidden = features(fm, val, a.batch_size)
    log(f"target features precomputed in {time.perf_counter() - t0:.0f}s: {hidden.shape}")

    heads = MedusaHeads(target.args.hidden_size, a.num_heads)
    steps = a.epochs * (a.windows // a.batch_size)
    warmup = max(1, min(a.warmup, steps // 4))
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-7, a.lr, warmup), optim.cosine_decay(a.lr, steps - warmup)],
        [warmup])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.0)

    def loss_fn(heads, h):
        target_logprobs = nn.log_softmax(fm.lm_head(h), axis=-1)
        per_head = medusa_loss(heads, h, target_logprobs, fm.lm_head)
        return per_head.sum(), per_head

    step_fn = nn.value_and_grad(heads, loss_fn)
    history = {"step": [], "loss": [], "loss_per_head": []}
    evals = [{"step": 0, "top1_per_head": head_top1(heads, val_hidden, fm.lm_head)}]
    log(f"step 0: held-out top-1 per head {[round(x, 3) for x in evals[0]['top1_per_head']]}")
    step, t_train = 0, time.perf_counter()
    for epoch in range(a.epochs):
        order = rng.permutation(a.windows)
        for i in range(0, a.windows - a.batch_size + 1, a.batch_size):
            (loss, per_head), grads = step_fn(heads, hidden[mx.array(order[i : i + a.batch_size])])
            opt.update(heads, grads)
            mx.eval(heads.parameters(), opt.state, loss, per_head)
            step += 1
            history["step"].append(step)
            history["loss"].append(round(loss.item(), 5))
            history["loss_per_head"].append([round(x, 5) for x in per_head.tolist()])
            if step % a.log_every == 0:
                log(f"epoch {epoch} step {step}/{steps}: loss {loss.item():.4f} per head "
                    f"{[round(x, 3) for x in per_head.tolist()]} "
                    f"({time.perf_counter() - t_train:.0f}s)")
            if step % a.eval_every == 0 or step == steps:
                top1 = head_top1(heads, val_hidden, fm.lm_head)
                evals.append({"step": step, "top1_per_head": top1})
                log(f"step {step}: held-out top-1 per head {[round(x, 3) for x in top1]}")
    seconds = time.perf_counter() - t0
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "bench")}
    save_heads(heads, a.out, target="tiny-code",
               training=dict(settings, tokens=a.windows * a.context, steps=step,
                             seconds=round(seconds, 1),
                             heldout_top1_per_head=evals[-1]["top1_per_head"]))
    (Path(a.out) / "training_log.json").write_text(json.dumps(
        {"settings": settings, "train": history, "heldout": evals}, indent=0) + "\n")
    log(f"saved {a.out} ({seconds:.0f}s in all)")


def time_interleaved(runs: dict, picks, repeats: int):
    """Time every run of `runs` ({name: run(prompt, stats) -> token stream}) on every prompt of
    `picks`, `repeats` passes, after one warm-up call each (first calls compile kernels and grow
    buffers); the order rotates per prompt. Returns (seconds, stats, same): per run, its seconds
    per call, its SpecStats, and on how many prompts of the first pass its tokens equal "plain"'s.
    (Shared with scripts/train_eagle.py.)"""
    from specdec.kit.stats import SpecStats

    names = list(runs)
    seconds = {name: [] for name in runs}
    stats = {name: SpecStats() for name in runs}
    same = {name: 0 for name in runs}
    for name in names:
        list(runs[name](picks[0].tolist(), SpecStats()))
    for i, prompt in enumerate(list(picks) * repeats):
        prompt, outs = prompt.tolist(), {}
        for name in names[i % len(names):] + names[: i % len(names)]:
            t = time.perf_counter()
            outs[name] = [int(x if isinstance(x, int) else x[0]) for x in runs[name](prompt, stats[name])]
            seconds[name].append(time.perf_counter() - t)
        for name in names:
            same[name] += int(outs[name] == outs["plain"]) if i < len(picks) else 0
    return seconds, stats, same


def accept_at_position(spec: list) -> list:
    """Acceptance at draft position i given every earlier draft accepted, from (K, n) rounds."""
    depth = max(k for k, _ in spec)
    reached = [[n > i for k, n in spec if n >= i and k > i] for i in range(depth)]
    return [round(float(np.mean(r)), 3) if r else None for r in reached]


def bench(a) -> None:
    """Held-out prompts: Medusa vs plain vs the draft-model path, interleaved per prompt."""
    from specdec_ref.draft import SpeculativeDecoder
    from specdec_ref.generate import generate_tokens
    from specdec_ref.medusa import medusa_generate
    from specdec_ref.speculative import speculative_generate

    target, tokenizer = load_model("tiny-code", dtype=mx.float32)
    draft, _ = load_model("tiny-code-draft", dtype=mx.float32)
    heads = load_heads(a.out, MedusaHeads, target)
    _, val_win = token_windows(Path(resolve_model_path("tiny-code")) / "tokenizer.json", 64,
                               train=False)
    picks = val_win[np.linspace(0, len(val_win) - 1, a.prompts).astype(int)][:, :48]
    runs = {
        "plain": lambda p, s: generate_tokens(target, mx.array(p), a.max_tokens),
        "draft model K=4": lambda p, s: speculative_generate(
            SpeculativeDecoder(draft, target, lookahead=4), mx.array(p), a.max_tokens, stats=s),
    }
    for widths in ([1, 1, 1], [1, 1, 1, 1], [2, 2, 1]):
        runs[f"medusa {widths}"] = (lambda w: lambda p, s: medusa_generate(
            target, heads, p, a.max_tokens, stats=s, widths=w))(widths)
    chains = {"draft model K=4", "medusa [1, 1, 1]", "medusa [1, 1, 1, 1]"}
    seconds, stats, same = time_interleaved(runs, picks, a.repeats)
    result = {}
    for name in runs:
        st = stats[name]
        per_prompt = [a.max_tokens / s for s in seconds[name]]
        row = {"tokens_per_s_median": round(float(np.median(per_prompt)), 1),
               "ms_per_token": round(1e3 * float(np.mean(seconds[name])) / a.max_tokens, 2),
               "tokens_per_s_iqr": [round(float(np.percentile(per_prompt, q)), 1)
                                    for q in (25, 75)],
               "identical_to_plain": f"{same[name]}/{len(picks)}"}
        if st.rounds:
            spec = [(k, n) for k, n in zip(st.lookahead_per_round, st.accepted_per_round) if k]
            row["mean_accepted_per_round"] = round(float(np.mean([n for _, n in spec])), 3)
            row["tokens_per_target_call"] = round(st.emitted / st.rounds, 3)
            row["draft_time_share"] = round(st.draft_time_s / max(1e-9, sum(seconds[name])), 3)
            row["draft_ms_per_round"] = round(1e3 * st.draft_time_s / st.rounds, 2)
            row["verify_ms_per_round"] = round(1e3 * st.verify_time_s / st.rounds, 2)
            if name in chains:  # a tree's rounds have no single position i
                row["accept_at_position"] = accept_at_position(spec)
        result[name] = row
        log(f"{name:22s} {json.dumps(row)}")
    base = result["plain"]["tokens_per_s_median"]
    for name in runs:
        log(f"{name:22s} speed-up vs plain {result[name]['tokens_per_s_median'] / base:.2f}x")
    (Path(a.out) / "bench.json").write_text(json.dumps(
        {"prompts": a.prompts, "repeats": a.repeats, "max_tokens": a.max_tokens,
         "results": result}, indent=1) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=MEDUSA_HEADS)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--windows", type=int, default=384, help="training windows (precomputed)")
    p.add_argument("--files", type=int, default=300, help="training files to draw windows from")
    p.add_argument("--val-windows", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=12)
    p.add_argument("--bench", action="store_true", help="measure the heads in --out instead")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2, help="passes over the prompts")
    a = p.parse_args(argv)
    assert EOS  # the corpus separator the target was trained with
    bench(a) if a.bench else train(a)


if __name__ == "__main__":
    main()
