"""Week 2 Days 2–3 — verifying K draft tokens with one target call.

The target is called once on [last committed token, d_1 .. d_K] and returns K + 1 rows of
logits: row i (0-based) is the target's distribution for the position of d_{i+1}; row K is the
position after d_K (the "bonus" token). Shapes: `K` draft length, `V` vocabulary.
"""

from typing import Optional

import mlx.core as mx

from .sampling import make_probs, sample_token


def verify_greedy(draft_tokens: mx.array, target_logits: mx.array) -> tuple[int, list[int]]:
    """Greedy verification: accept the longest prefix of drafts the target agrees with.

    draft_tokens: int [K]. target_logits: float [K + 1, V].
    Returns (n, tokens): n in [0, K] is the length of the longest prefix with
    draft_tokens[i] == argmax(target_logits[i]); tokens (python ints, length n + 1) are the
    accepted drafts followed by argmax(target_logits[n]) — the target's correction at the first
    mismatch, or the bonus token when all K were accepted.
    """
    drafts = mx.array(draft_tokens).reshape(-1)
    choices = mx.argmax(target_logits, axis=-1)
    mx.eval(drafts, choices)  # one host sync for the whole round: drafts and target together
    drafts, choices = drafts.tolist(), choices.tolist()
    n = 0
    while n < len(drafts) and drafts[n] == choices[n]:
        n += 1
    return n, drafts[:n] + [choices[n]]


def residual_distribution(p_target: mx.array, q_draft: mx.array) -> mx.array:
    """The distribution to resample from after a rejection: normalise(max(0, p - q)).

    p_target, q_draft: float [..., V], rows summing to 1. Returns float32 [..., V], rows summing
    to 1. Where p == q the residual is all zero (and a rejection cannot happen); return p_target
    for such rows instead of dividing by zero.
    """
    residual = mx.maximum(p_target.astype(mx.float32) - q_draft.astype(mx.float32), 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    return mx.where(mass > 0, residual / mx.where(mass > 0, mass, 1.0), p_target)


def verify_speculation(
    draft_tokens: mx.array,
    target_logits: mx.array,
    q_draft: mx.array,
    temperature: float = 1.0,
    key: Optional[mx.array] = None,
) -> tuple[int, list[int]]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): exact for any draft.

    draft_tokens: int [K], drawn from q_draft. target_logits: float [K + 1, V].
    q_draft: float32 [K, V], the draft's probabilities (as returned by `draft_generation`).
    temperature: applied to the target as `make_probs(target_logits, temperature)` — the same
    transform that made q_draft, so p and q are comparable. key: PRNG key, required when
    temperature > 0; all randomness comes from it.
    For i = 0 .. K-1: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)) (reject if
    q_i(d_i) == 0). On the first rejection, sample the replacement from
    residual_distribution(p_i, q_i) and stop. If all K are accepted, sample a bonus token from
    p_K. Returns (n, tokens) as `verify_greedy` does: n accepted drafts, tokens of length n + 1.
    At temperature 0 this must agree with `verify_greedy`.
    """
    if temperature == 0:
        # p is one-hot at the target's argmax: accept iff the draft matches; no randomness.
        return verify_greedy(draft_tokens, target_logits)
    if key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=mx.random.key(seed)")
    draft_tokens = mx.array(draft_tokens, dtype=mx.int32).reshape(-1)
    K = draft_tokens.shape[0]
    p_target = make_probs(target_logits, temperature)  # [K + 1, V]
    rows = mx.arange(K)
    p_of_draft = p_target[rows, draft_tokens]  # p_i(d_i), [K]
    q_of_draft = q_draft[rows, draft_tokens]  # q_i(d_i), [K]
    key_accept, key_resample = mx.random.split(key)
    u = mx.random.uniform(shape=(K,), key=key_accept)
    # u < p/q without dividing by zero; a draft the draft model could not produce is rejected.
    accepted = (q_of_draft > 0) & (u * q_of_draft < p_of_draft)
    # n = index of the first rejection, or K if none: argmax finds the first True.
    n = mx.argmax(mx.concatenate([~accepted, mx.array([True])]))
    # Row n of [residuals; p_K] is where the next token comes from: a correction or the bonus.
    candidates = mx.concatenate([residual_distribution(p_target[:K], q_draft), p_target[K:]])
    new_token = sample_token(candidates[n], key_resample)
    mx.eval(n, new_token)  # the round's single host sync
    n = n.item()
    return n, draft_tokens[:n].tolist() + [new_token.item()]
