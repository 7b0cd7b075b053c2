"""The coupled rule with draft trees (src/specdec/kit/coupled_tree.py) against the coupled chain.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python scripts/bench_coupled_tree.py                 # 5 prompts x 2 seeds, 96 tokens

The embedded pair, the first held-out prompts (as scripts/bench_coupling.py), T = 0.8, EOS
ignored. For each mode: how many runs gave plain seeded decoding's text, tokens per target call,
accepted tokens and tree nodes per round (counts: the machine's load does not move them), and
tokens/s (load moves it: read small gaps as noise). Not a test.
"""

import argparse
import time

import mlx.core as mx

from specdec.kit.cli import bench_prompts
from specdec.kit.coupled_tree import coupled_tree_generate
from specdec.kit.loading import load_pair
from specdec.kit.stats import SpecStats
from specdec_ref.coupling import coupled_generate, seeded_generate
from specdec_ref.draft import SpeculativeDecoder

MODES = {"chain K=4 (coupled_generate)": None, "tree (1, 1, 1, 1)": (1, 1, 1, 1),
         "tree (2, 2, 1, 1)": (2, 2, 1, 1), "tree (3, 1, 1, 1)": (3, 1, 1, 1),
         "tree (2, 2, 2, 1)": (2, 2, 2, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()
    target, draft, tokenizer = load_pair("tiny-code", "tiny-code-draft")
    prompts = [list(tokenizer.encode(text)) for _, text in bench_prompts("tiny-code", args.prompts)]
    T, n = args.temperature, args.max_tokens
    print("| mode | identical to seeded | tokens per target call | accepted per round | "
          "nodes per round | tokens/s (noisy) |\n|---|---|---|---|---|---|")
    for name, widths in MODES.items():
        stats, same, runs, seconds = SpecStats(), 0, 0, 0.0
        for prompt in prompts:
            for seed in range(args.seeds):
                want = list(seeded_generate(target, mx.array(prompt), n, seed, T))
                start = time.perf_counter()
                if widths is None:
                    stream = coupled_generate(SpeculativeDecoder(draft, target, 4), mx.array(prompt),
                                              n, seed, T, stats=stats)
                else:
                    stream = coupled_tree_generate(draft, target, mx.array(prompt), n, seed, T,
                                                   widths=widths, stats=stats)
                got = [token for token, _ in stream]
                seconds += time.perf_counter() - start
                same, runs = same + (got == want), runs + 1
        print(f"| {name} | {same}/{runs} | {stats.emitted / stats.rounds:.2f} | "
              f"{stats.accepted / stats.rounds:.2f} | {stats.drafted / stats.rounds:.1f} | "
              f"{stats.emitted / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
