"""Week 5 Day 5 — the bake-off: every drafter through one cost model, compared fairly.

A drafter is summed up by two measured things: its acceptance curve a_j = P(draft j accepted |
drafts 0..j-1 accepted), j = 0-based position (Week 4 Day 2's `acceptance_per_position`), and
its costs in units of one single-token target step: c_token per drafted token (a draft model's
or a layer-skip model's step), c_round per round whatever K is (Medusa's heads: one call for
every head), and v(K) for the target call that verifies K drafts (Week 1 Day 3).
Shapes: `K` draft length.
"""

import statistics
from typing import Mapping, Sequence


def expected_tokens_from_curve(accept_curve: Sequence[float], k: int) -> float:
    """Tokens one round of a K-draft chain commits, on average: E(K) = 1 + sum_{i<K} prod_{j<=i} a_j.

    accept_curve: a_0, a_1, ... with a_j = P(draft j accepted | drafts 0..j-1 accepted), each in
    [0, 1]; it needs at least k entries. k: K >= 0 drafts per round.
    The (i+1)-th draft is accepted iff drafts 0..i all are (probability a_0 a_1 ... a_i), and
    every round also commits one target token. A constant curve alpha gives Week 2 Day 5's
    (1 - alpha^(K+1)) / (1 - alpha). Returns a float in [1, K + 1].
    Raises ValueError if k < 0, if the curve has fewer than k entries (naming both), or if an
    entry among the first k is outside [0, 1] (naming its position).
    """
    if k < 0:
        raise ValueError(f"k (drafts per round) must be >= 0, got {k}")
    if len(accept_curve) < k:
        raise ValueError(f"the acceptance curve has {len(accept_curve)} positions, fewer than "
                         f"k={k}: measure it with at least K drafts per round")
    tokens, reach = 1.0, 1.0  # the target's own token; P(all drafts so far accepted)
    for j, a in enumerate(accept_curve[:k]):
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"acceptance at position {j} is {a}: a probability must be in [0, 1]")
        reach *= a
        tokens += reach
    return tokens


def predicted_speedup(
    accept_curve: Sequence[float], k: int, c_token: float, v: float, c_round: float = 0.0
) -> float:
    """Tokens/s over plain decoding's, predicted: E(K) / (c_round + K c_token + v).

    E(K) from `expected_tokens_from_curve`. Costs in target steps: c_token >= 0 per drafted
    token, c_round >= 0 per round (0 for a draft model; the heads' one call for Medusa), and
    v = v(K) > 0 for the verify call. K = 0 is plain decoding: E = 1 for 1 step, 1.0 exactly
    (whatever the costs: no draft, no verify overhead).
    Raises ValueError if c_token < 0, c_round < 0 or v <= 0 (and as expected_tokens_from_curve).
    """
    if c_token < 0 or c_round < 0:
        raise ValueError(f"draft costs must be >= 0 target steps, got c_token={c_token}, "
                         f"c_round={c_round}")
    if v <= 0:
        raise ValueError(f"v (verify call / target step) must be > 0, got {v}")
    tokens = expected_tokens_from_curve(accept_curve, k)
    if k == 0:
        return 1.0  # plain decoding is the unit
    return tokens / (c_round + k * c_token + v)


def best_lookahead(
    accept_curve: Sequence[float], c_token: float, v_curve: Mapping[int, float],
    c_round: float = 0.0,
) -> tuple[int, float]:
    """The K with the highest `predicted_speedup`, and that speed-up.

    v_curve: {K: v(K)} for the K measured (K >= 1); only K <= len(accept_curve) are tried (a
    curve says nothing beyond the positions it measured). K = 0 (plain, speed-up 1.0) is always
    a candidate, so a drafter that cannot win gets (0, 1.0): the fallback controller's answer.
    Ties go to the smaller K. Errors as `predicted_speedup`.
    """
    best = (0, 1.0)
    for k in sorted(v_curve):
        if 1 <= k <= len(accept_curve):
            speedup = predicted_speedup(accept_curve, k, c_token, v_curve[k], c_round)
            if speedup > best[1]:
                best = (k, speedup)
    return best


def break_even_draft_cost(
    accept_curve: Sequence[float], k: int, v: float, c_round: float = 0.0
) -> float:
    """The largest c_token at which K drafts per round still match plain decoding (speed-up 1).

    Solves E(K) = c_round + K c + v for c: (E(K) - v - c_round) / K. Any cheaper draft wins,
    any dearer one loses; a negative answer means even a free draft loses (verification and
    the per-round cost already eat the tokens). k >= 1 (ValueError otherwise); v > 0 and
    c_round >= 0 as in `predicted_speedup`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 drafts per round for a break-even draft cost, got {k}")
    if v <= 0 or c_round < 0:
        raise ValueError(f"need v > 0 and c_round >= 0 target steps, got v={v}, c_round={c_round}")
    return (expected_tokens_from_curve(accept_curve, k) - v - c_round) / k


def paired_comparison(
    candidate_tps: Sequence[float], baseline_tps: Sequence[float], control_tps: Sequence[float]
) -> dict:
    """A fair verdict on a speed-up: per-prompt ratios, and an A/A control as the noise floor.

    All three: tokens/s per prompt, entry i of each measured on the same prompt i (same
    length, same run). control_tps is the baseline timed a second time (A/A): its ratios to
    the baseline show how far two identical runs drift apart on this machine.
    Returns {"speedup": median_i candidate[i] / baseline[i] (pair first, then the median),
             "low": min of those ratios, "high": their max,
             "noise": max_i |control[i] / baseline[i] - 1|, the A/A drift,
             "verdict": "faster" if speedup > 1 + noise, "slower" if speedup < 1 - noise,
                        else "within noise"}.
    Raises ValueError if the lengths differ or are 0 (naming them), or a value is <= 0.
    """
    sizes = (len(candidate_tps), len(baseline_tps), len(control_tps))
    if len(set(sizes)) != 1 or sizes[0] == 0:
        raise ValueError(f"candidate, baseline and control must hold one tokens/s per prompt "
                         f"for the same prompts, got lengths {sizes}")
    if min(min(candidate_tps), min(baseline_tps), min(control_tps)) <= 0:
        raise ValueError("tokens/s must be > 0: a run that produced nothing cannot be compared")
    # Pair first: prompt i's two runs saw the same text and the same moment of the machine.
    ratios = [c / b for c, b in zip(candidate_tps, baseline_tps)]
    noise = max(abs(a / b - 1.0) for a, b in zip(control_tps, baseline_tps))
    speedup = statistics.median(ratios)
    verdict = ("faster" if speedup > 1.0 + noise else "slower" if speedup < 1.0 - noise
               else "within noise")
    return {"speedup": speedup, "low": min(ratios), "high": max(ratios), "noise": noise,
            "verdict": verdict}
