"""Measurement for Week 5 Day 4: self-speculation by layer skipping on the embedded target.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \
        python scripts/bench_layerskip.py --prompts 5 --max-tokens 96 --repeats 3 --out layerskip.json

What it measures (greedy; the reference `specdec_ref`, or `--impl student` for your own tree):
  1. acceptance of each single-layer skip, greedy agreement with the full target on held-out
     text that no timed prompt comes from (`greedy_agreement`, teacher forcing);
  2. the greedy search's path (`choose_layers_to_skip`): the skip set and alpha at every step;
  3. c, one draft step's time over one target step's (a decode step after a 64-token prefill,
     the modes interleaved, median of `--steps` runs), for every skip set on the path and for
     the embedded draft model;
  4. tokens/s of plain decoding, the draft-model path and layer skipping (each skip set on the
     path, K in --ks), interleaved per prompt and repeat, with SpecStats' mean accepted length
     and alpha; the draft model's row uses its best K. Every output is checked against plain
     greedy, token for token (the script stops if one differs).
Not a test: timings depend on the machine and on what else runs on it. Report the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from specdec.kit.cli import heldout_prompts
from specdec.kit.impl import get_impl
from specdec.kit.loading import load_model
from specdec.kit.stats import SpecStats


def step_seconds(model, prompt: mx.array, steps: int) -> list[float]:
    """Seconds of single-token decode steps after a prefill of `prompt` (one list per call)."""
    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    token = mx.array([[1]])
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(model(token, cache=cache))
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="ref", choices=["ref", "student"])
    p.add_argument("--prompts", type=int, default=5, help="timed held-out prompts")
    p.add_argument("--select", type=int, default=6, help="held-out files for choosing layers")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ks", default="1,2,3,4", help="lookaheads tried for every drafter")
    p.add_argument("--max-skip", type=int, default=4, help="longest skip set on the path")
    p.add_argument("--steps", type=int, default=40, help="decode steps timed for c")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args()
    impl = get_impl(args.impl)
    ls, spec = impl.layerskip, impl.speculative
    target, tokenizer = load_model("tiny-code")
    draft_model, _ = load_model("tiny-code-draft")
    ks = [int(k) for k in args.ks.split(",")]

    texts = heldout_prompts("tiny-code", args.prompts + args.select, lines=40)
    timed_prompts = [mx.array(tokenizer.encode(t)[:256], dtype=mx.int32) for _, t in texts[: args.prompts]]
    select_ids = sum((tokenizer.encode(t) for _, t in texts[args.prompts :]), [])[:1536]
    select = mx.array(select_ids, dtype=mx.int32)
    report = {"selection_tokens": int(select.size), "timed_prompts": [n for n, _ in texts[: args.prompts]]}
    num_layers = len(target.layers)

    # 1-2. Which layers: single skips, then the greedy path.
    single = {j: ls.greedy_agreement(target, ls.LayerSkipModel(target, [j]), select) for j in range(num_layers)}
    print("alpha of each single-layer skip:", {j: round(a, 3) for j, a in single.items()})
    path = ls.choose_layers_to_skip(target, select, args.max_skip)
    print("greedy path:", [(s, round(a, 3)) for s, a in path])
    report.update(single_skip_alpha=single, path=[[list(s), a] for s, a in path])

    # 3. c: draft step over target step, interleaved.
    models = {"target": target, "draft-model": draft_model}
    models.update({f"skip{list(s)}": ls.LayerSkipModel(target, s) for s, _ in path})
    prefill = timed_prompts[0][:64]
    times = {name: [] for name in models}
    for _ in range(3):
        for name, m in models.items():
            times[name] += step_seconds(m, prefill, args.steps)
    med = {name: statistics.median(t) for name, t in times.items()}
    c = {name: med[name] / med["target"] for name in models}
    print("step ms:", {n: round(1e3 * t, 2) for n, t in med.items()}, "c:", {n: round(v, 3) for n, v in c.items()})
    report.update(step_ms={n: 1e3 * t for n, t in med.items()}, c=c)

    # 4. Decoding, interleaved per prompt and repeat.
    modes = {"plain": None, "plain A/A": None}  # A/A: plain against itself, the noise floor
    modes.update({f"draft-model K={k}": (impl.drafters.ModelDrafter, (draft_model,), k) for k in ks})
    for s, _ in path:
        modes.update({f"skip{list(s)} K={k}": (ls.LayerSkipDrafter, (target, s), k) for k in ks})
    secs = {m: [] for m in modes}
    stats = {m: SpecStats() for m in modes}
    for r in range(args.repeats):
        for i, prompt in enumerate(timed_prompts):
            names = list(modes) if (r + i) % 2 == 0 else list(reversed(modes))
            for name in names:
                if modes[name] is None:
                    run = lambda: list(impl.generate.generate_tokens(target, prompt, args.max_tokens))
                    run_stats = None
                else:
                    cls, cargs, k = modes[name]
                    decoder = impl.drafters.DrafterDecoder(cls(*cargs), target, k)
                    run_stats = stats[name] if r == 0 else None  # SpecStats accumulates
                    run = lambda: [t for t, _ in spec.speculative_generate(
                        decoder, prompt, args.max_tokens, stats=run_stats)]
                start = time.perf_counter()
                out = run()
                secs[name].append(time.perf_counter() - start)
                outputs = report.setdefault("outputs", {}).setdefault(str(i), {})
                outputs[name] = out
        for i in range(len(timed_prompts)):
            outs = report["outputs"][str(i)]
            bad = [n for n, o in outs.items() if o != outs["plain"]]
            if bad:
                raise SystemExit(f"prompt {i}: {bad} differ from plain greedy")
    report.pop("outputs")
    tokens = args.max_tokens * len(timed_prompts)
    rows = {}
    for name in modes:
        per_repeat = [sum(secs[name][r * len(timed_prompts) : (r + 1) * len(timed_prompts)])
                      for r in range(args.repeats)]
        tps = tokens / statistics.median(per_repeat)
        st = stats[name]
        rows[name] = {"tokens_per_s": tps, "tokens_per_s_min": tokens / max(per_repeat),
                      "tokens_per_s_max": tokens / min(per_repeat),
                      "mean_accepted_length": st.mean_accepted_length if st.rounds else None,
                      "alpha": st.alpha_estimate if st.rounds else None,
                      "tokens_per_round": st.tokens_per_round if st.rounds else 1.0}
    plain = rows["plain"]["tokens_per_s"]
    best_model = max((n for n in rows if n.startswith("draft-model")), key=lambda n: rows[n]["tokens_per_s"])
    for name, row in rows.items():
        row["vs_plain"] = row["tokens_per_s"] / plain
        row["vs_draft_model"] = row["tokens_per_s"] / rows[best_model]["tokens_per_s"]
        mal = row["mean_accepted_length"]
        print(f"{name:22s} {row['tokens_per_s']:7.1f} tok/s [{row['tokens_per_s_min']:.1f}, "
              f"{row['tokens_per_s_max']:.1f}]  x{row['vs_plain']:.2f} plain  x{row['vs_draft_model']:.2f} "
              f"{best_model}  accepted/round {mal if mal is None else round(mal, 2)}  "
              f"alpha {row['alpha'] if row['alpha'] is None else round(row['alpha'], 3)}")
    report.update(rows=rows, best_draft_model=best_model, greedy_identical=True, args=vars(args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
