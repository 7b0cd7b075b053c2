"""The Markdown tables of Week 5 Day 5's chapter, from a bake-off report (bench_drafters.py's JSON).

    python scripts/bakeoff_tables.py [REPORT] [--figure book/src/images/week5-bakeoff.png]

Prints, in the chapter's order: acceptance by position, costs and the cost model's K, the timed
single-stream table, the cost model against the clock, batch 8, other devices, and the bars.
The prose around them is the chapter's; this only keeps the numbers in step with the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specdec.kit.impl import get_impl

DEFAULT = Path(__file__).resolve().parents[1] / "src/specdec/kit/assets/bakeoff/bakeoff.json"


def figure(r: dict, out: Path) -> None:
    """The chapter's figure: each drafter's curve (T = 0), and the predicted speed-up against K
    from that curve and the measured batch-1 costs, the timed run as a star, the A/A band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bake = get_impl("ref").bakeoff
    c1 = r["costs"]["batch 1"]
    v1 = {int(k): v for k, v in c1["v"].items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, by_t) in enumerate(r["curves"].items()):
        curve = by_t["T=0"]["curve"]
        left.plot(range(len(curve)), curve, "o-", color=f"C{i}", label=name)
    left.set(xlabel="draft position j (0 = first draft)", ylabel="P(accepted | reached)",
             title="acceptance by position, T = 0", ylim=(0, 1.05))
    left.legend(fontsize=8)
    aa = r["single_stream"]["plain (A/A)"]["noise"]
    right.axhspan(1 - aa, 1 + aa, color="gray", alpha=0.2, label=f"A/A drift (±{aa:.2f})")
    right.axhline(1.0, color="gray", lw=0.8, ls="--")
    for i, name in enumerate(r["curves"]):
        if name not in r["predictions"]:
            continue
        curve = r["curves"][name]["T=0"]["curve"]
        ks = [k for k in sorted(v1) if k <= len(curve)]
        right.plot(ks, [bake.predicted_speedup(curve, k, c1["c_token"][name], v1[k], c1["c_round"][name])
                        for k in ks], "o-", color=f"C{i}", label=f"{name}: predicted")
        p = r["predictions"][name]
        right.plot([p["K"]], [p["measured"]], "*", ms=15, color=f"C{i}", markeredgecolor="black")
    right.set(xlabel="K", ylabel="speed-up over plain", title="predicted (lines), measured (stars)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    args = sys.argv[1:]
    out = None
    if "--figure" in args:
        at = args.index("--figure")
        out, args = Path(args[at + 1]), args[:at] + args[at + 2:]
    path = Path(args[0]) if args else DEFAULT
    r = json.loads(path.read_text())
    if out is not None:
        figure(r, out)
    bake = get_impl("ref").bakeoff
    env = r["environment"]
    print(f"<!-- {path.name}: load {env['load_average_start']:.1f} -> {env['load_average_end']:.1f}, "
          f"{r['seconds']:.0f} s, {env['blas']} -->\n")

    print("#### Acceptance by position (tuning prompts, K = 6)\n")
    print("| drafter | T | " + " | ".join(f"a_{j}" for j in range(6)) + " | rounds | E(K) at its K |")
    print("|---|---|" + "---|" * 6 + "---|---|")
    for name, by_t in r["curves"].items():
        for t in ("T=0", "T=1"):
            c = by_t[t]["curve"]
            k = r["best_k"].get(name, {}).get("K", len(c))
            cells = [f"{x:.2f}" for x in c[:6]] + ["—"] * (6 - len(c[:6]))
            e = bake.expected_tokens_from_curve(c, min(k, len(c)))
            print(f"| {name} | {t[2:]} | " + " | ".join(cells) + f" | {by_t[t]['rounds']} | {e:.2f} (K={k}) |")

    print("\n#### Costs, and the cost model's K\n")
    c1, c8 = r["costs"]["batch 1"], r["costs"][f"batch {r['batch']['batch_size']}"] if "batch" in r else None
    print(f"target step {c1['target_step_ms']:.1f} ms at batch 1" + (
        f", {c8['target_step_ms']:.1f} ms at batch {r['batch']['batch_size']} (all rows)." if c8 else "."))
    ks = sorted(c1["v"], key=int)
    print("\n| | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for label, c in (("batch 1", c1), (f"batch {r['batch']['batch_size']}", c8)):
        if c:
            print(f"| v(K), {label} | " + " | ".join(f"{c['v'][k]:.2f}" for k in ks) + " |")
    print("\n| drafter | c_token (b=1) | c_round (b=1) | c_token (b=8) | c_round (b=8) | cost model's K | predicted | break-even c at that K |")
    print("|---|---|---|---|---|---|---|---|")
    for name, p in r["predictions"].items():
        b = r["best_k"][name]
        k = f"{b['K']} (0: plain)" if b.get("cost_model_says_plain") else str(b["K"])
        cb = (f"{c8['c_token'][name]:.3f} | {c8['c_round'][name]:.3f}"
              if c8 and c8["c_token"].get(name) is not None else "— | —")
        print(f"| {name} | {c1['c_token'][name]:.3f} | {c1['c_round'][name]:.3f} | {cb} | {k} | "
              f"{p['predicted_from_tuning']:.2f}x | {p['break_even_c_token']:.3f} |")

    print("\n#### Single stream, timed\n")
    print("| mode | tok/s (median) | range over prompts | speed-up (paired median) | per-prompt range | verdict vs A/A | tokens/call | accepted/round | identical to plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    n = len(r["timed_prompts"])
    for name, row in r["single_stream"].items():
        ident = row.get("identical_to_plain")
        ident = "—" if ident is None else (f"{n}/{n}" if ident else "no")
        acc = "—" if name.startswith("plain") else f"{row['mean_accepted_length']:.2f}"
        verdict = {"within noise": "within noise"}.get(row["verdict"], row["verdict"])
        print(f"| {name} | {row['tokens_per_s']:.1f} | {row['tokens_per_s_min']:.1f}–{row['tokens_per_s_max']:.1f} | "
              f"{row['speedup']:.2f}× | {row['low']:.2f}–{row['high']:.2f} | {verdict} (±{row['noise']:.2f}) | "
              f"{row['tokens_per_call']:.2f} | {acc} | {ident} |")

    print("\n#### The cost model against the clock\n")
    print("| drafter | K | predicted from tuning curve | predicted from this run's curve | measured |")
    print("|---|---|---|---|---|")
    for name, p in r["predictions"].items():
        print(f"| {name} | {p['K']} | {p['predicted_from_tuning']:.2f}× | {p['predicted_from_this_run_curve']:.2f}× | "
              f"{p['measured']:.2f}× |")

    if "batch" in r:
        b = r["batch"]
        print(f"\n#### Batch {b['batch_size']} (Week 3 Day 2's loop with the draft model; the cost model's predictions)\n")
        for name, m in b["measured"].items():
            groups = ", ".join(f"{x:.1f}" for x in m["per_group_tokens_per_s"])
            extra = f", speed-up {m['speedup']:.2f}×" if "speedup" in m else ""
            print(f"- measured, {name}: {m['tokens_per_s']:.1f} tok/s (groups: {groups}){extra}")
        print(f"- identical to batched plain: {b['identical_to_plain']}")
        for name, p in b["predicted"].items():
            print(f"- predicted, {name}: best K {p['best_K']} → {p['speedup']:.2f}×; at its single-stream K → "
                  f"{p['at_single_stream_K']:.2f}×")

    print("\n#### Other devices\n")
    names = list(r["predictions"])
    devices = {"this CPU (measured costs)": {"best": {n: dict(zip(("K", "speedup"), bake.best_lookahead(
        r["curves"][n]["T=0"]["curve"], c1["c_token"][n], {int(k): v for k, v in c1["v"].items()},
        c1["c_round"][n]))) for n in names}}}
    devices.update({"Apple silicon (assumed)": r["devices"]["apple_silicon"],
                    "GPU, launch-bound (assumed)": r["devices"]["gpu_launch_bound"]})
    print("| drafter | " + " | ".join(devices) + " |")
    print("|---|" + "---|" * len(devices))
    for name in names:
        cells = [f"K={d['best'][name]['K']}, {d['best'][name]['speedup']:.2f}×" if name in d["best"] else "—"
                 for d in devices.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nbars: {json.dumps(r['bars'])}")


if __name__ == "__main__":
    main()
