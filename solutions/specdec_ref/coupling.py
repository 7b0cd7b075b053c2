"""Week 5 Day 1 — drafter-invariant speculative sampling: a seed means the same text.

Exact rejection sampling (Week 2 Day 3) makes speculative output *distributed* as the target's,
but which tokens one seed gives depends on the draft, on K, on the batch and on the controller.
Here the target samples the token at position t as argmax(log p_t + g_t) (Gumbel-max), with
noise g_t that depends only on (seed, t); the draft proposes argmax(log q_t + g_t) with the
*same* noise, and a draft is accepted exactly when it equals the target's own token. Every
emitted token is then the plain seeded token, whatever proposed the drafts (Daliri, Musco and
Suresh 2024). Shapes: `B` batch, `L` tokens fed, `K` draft length, `V` vocabulary. A position
t is absolute: the index of the token in its row's sequence, prompt included (0-based).
"""

import time
from typing import Iterator, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from specdec.kit.models import model_vocab_size
from specdec.kit.stats import SpecStats

from .batched import SHARED_PADDING_LIMIT, filter_rows, left_pad, make_batch_cache, rollback_rows
from .sampling import make_probs
from .speculative import commit_round


def gumbel_noise(seed: int, positions: Sequence[int], vocab_size: int) -> mx.array:
    """Standard Gumbel noise for absolute positions: float32 [N, V], N = len(positions).

    Row j depends only on (seed, positions[j]) (and V): never on the other positions asked for,
    on their order, or on who asks (round, K, row, batch) — and never on global random state.
    Different seeds or positions give independent rows, each V independent Gumbel(0, 1) draws.
    Raises ValueError unless 0 <= seed < 2**32 and 0 <= t < 2**32 for every position t.
    """
    positions = [int(t) for t in positions]
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed} is out of range: the coupled rule takes 0 <= seed < 2**32")
    bad = [t for t in positions if not 0 <= t < 2**32]
    if bad:
        raise ValueError(f"position {bad[0]} is out of range: positions are 0 <= t < 2**32")
    if not positions:
        return mx.zeros((0, vocab_size), dtype=mx.float32)
    # A PRNG key is two 32-bit words: (seed, t) names the position's own stream.
    keys = mx.array([[seed, t] for t in positions], dtype=mx.uint32)
    return mx.vmap(lambda key: mx.random.gumbel((vocab_size,), key=key))(keys)


def gumbel_sample(probs: mx.array, noise: mx.array) -> mx.array:
    """Gumbel-max sampling: argmax(log probs + noise) over the last axis.

    probs: float [..., V], rows summing to 1, from `make_probs(logits, temperature, top_k,
    top_p)`: a token that temperature 0, top-k or top-p filtered out has probability 0, log 0 =
    -inf, and is never chosen. noise: float [..., V] standard Gumbel (`gumbel_noise`).
    Returns int32 [...]. With independent noise per call the token is distributed exactly as
    probs (the law of `sample_token`); a one-hot row returns its hot index whatever the noise.
    """
    return mx.argmax(mx.log(probs) + noise, axis=-1).astype(mx.int32)


def seeded_generate(
    model,
    prompt_tokens: mx.array,
    max_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Plain seeded decoding: the text a seed means, which every coupled loop must reproduce.

    prompt_tokens: int [L], L >= 1 (ValueError if empty). One prefill call, then one call per
    token. The token at absolute position t (t = L + j for the j-th output) is
    gumbel_sample(make_probs(logits_t, temperature, top_k, top_p), gumbel_noise(seed, [t], V)[0]).
    Stops after max_tokens tokens, or right after yielding one of eos_token_ids. Yields ints.
    """
    prompt_tokens = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1)
    if prompt_tokens.size == 0:
        raise ValueError("the prompt is empty: decoding needs at least one token")
    cache, eos = make_prompt_cache(model), set(eos_token_ids)

    def choose(inputs: mx.array, position: int) -> mx.array:
        # Lazy: the graph of the token at `position`; nothing is computed yet.
        logits = model(inputs[None], cache=cache)[0, -1]
        noise = gumbel_noise(seed, [position], logits.shape[-1])[0]
        return gumbel_sample(make_probs(logits, temperature, top_k, top_p), noise)

    if max_tokens <= 0:
        return
    position = prompt_tokens.size
    token = choose(prompt_tokens, position)
    mx.async_eval(token)
    for n in range(max_tokens):
        token_id = token.item()  # the one host sync per token
        last = n + 1 == max_tokens or token_id in eos
        if not last:  # queue the next step before handing this token out (as generate_tokens)
            position += 1
            token = choose(token.reshape(1), position)
            mx.async_eval(token)
        yield token_id
        if last:
            return


def coupled_draft(
    draft_model,
    cache: list,
    inputs: mx.array,
    noise: mx.array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> mx.array:
    """Propose K = noise.shape[-2] tokens per row with the target's noise: one draft call each.

    inputs: int [B, U], U >= 1, every row's unseen tokens, right-aligned (B = 1 for a single
    stream on a plain cache; a `BatchKVCache` for several rows). noise: float [B, K, V], row b's
    noise for the positions of its K drafts. Draft i of row b is
    gumbel_sample(make_probs(draft logits, temperature, top_k, top_p), noise[b, i]).
    Returns int32 [B, K]. Cache: grows by U + K - 1 — inputs, then the drafts except the last
    (as Week 2's `draft_generation`: if accepted, the next round feeds it).
    """
    tokens = []
    inputs = mx.array(inputs, dtype=mx.int32)
    for i in range(noise.shape[-2]):
        logits = draft_model(inputs, cache=cache)[:, -1]  # [B, V]
        token = gumbel_sample(make_probs(logits, temperature, top_k, top_p), noise[:, i])
        tokens.append(token)
        mx.async_eval(token)
        inputs = token[:, None]
    return mx.stack(tokens, axis=1)


def verify_coupled(
    draft_tokens: mx.array,
    target_logits: mx.array,
    noise: mx.array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[int, list[int]]:
    """The coupled accept rule: keep a draft exactly when the target's own token agrees.

    draft_tokens: int [K] (from any drafter). target_logits: float [K + 1, V], row i for the
    position of d_(i+1), row K the bonus position. noise: float [K + 1, V], the noise of those
    K + 1 positions. The target's token at row i is y_i = gumbel_sample(make_probs(
    target_logits[i], temperature, top_k, top_p), noise[i]). Returns (n, tokens): n in [0, K] the
    longest prefix with d_i == y_i; tokens = [y_0, ..., y_n] (python ints, length n + 1): the
    accepted drafts, then the target's token at the first disagreement, or the bonus y_K.
    """
    drafts = mx.array(draft_tokens, dtype=mx.int32).reshape(-1)
    chosen = gumbel_sample(make_probs(target_logits, temperature, top_k, top_p), noise)
    mx.eval(drafts, chosen)  # one host sync for the round
    drafts, chosen = drafts.tolist(), chosen.tolist()
    n = 0
    while n < len(drafts) and drafts[n] == chosen[n]:
        n += 1
    return n, chosen[: n + 1]


def coupled_generate(
    decoder,
    prompt_tokens: mx.array,
    max_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    controller=None,
    stats: Optional[SpecStats] = None,
) -> Iterator[tuple[int, bool]]:
    """Speculative decoding whose output is `seeded_generate`'s, token for token.

    decoder: a `SpeculativeDecoder` or a `DrafterDecoder` (caches `reset()` first). With a draft
    model, draft with `coupled_draft` on the round's noise; any other drafter (n-gram: it keeps
    no model) is asked for its proposals with `decoder.draft_generation(unseen, K, 0.0)`; its q
    is never needed. controller: None (K = decoder.lookahead every round) or an object with
    `lookahead` and `update(K, n, draft_s, verify_s)` (a FallbackController; K = 0 is a plain
    round: one target call, one token, update(0, 0, None, seconds)); a plain first round goes to
    its `observe_prefill(L, seconds)` when it has one; draft seconds are None in a round where
    the draft caught up on more than 2 tokens (prefill time is not K draft steps).
    Each round: t = len(committed); K = min(chosen K, tokens still wanted - 1); noise =
    gumbel_noise(seed, [t .. t + K], V); the draft catches up on every committed token its cache
    lacks; one target call; `verify_coupled`; `commit_round`. Yields (token, from_draft) as
    `speculative_generate`; stops at max_tokens or right after an EOS. stats: as there
    (record_round per round, plain rounds as record_round(0, 0, 1)).
    """
    prompt_tokens = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1)
    if prompt_tokens.size == 0:
        raise ValueError("the prompt is empty: decoding needs at least one token")
    decoder.reset()
    committed, eos, emitted = prompt_tokens.tolist(), set(eos_token_ids), 0
    # A SpeculativeDecoder has a draft_model; a DrafterDecoder's ModelDrafter too; n-gram: None.
    draft_model = getattr(decoder, "draft_model", None) or getattr(
        getattr(decoder, "drafter", None), "draft_model", None)
    prefilled = False
    while emitted < max_tokens:
        K = controller.lookahead if controller is not None else decoder.lookahead
        K = max(0, min(K, max_tokens - emitted - 1))
        t = len(committed)
        noise = gumbel_noise(seed, range(t, t + K + 1), decoder.vocab_size)
        start = time.perf_counter()
        draft_tokens, caught_up = mx.zeros((0,), dtype=mx.int32), False
        if K > 0:
            unseen = mx.array(committed[decoder.draft_cache[0].offset :], dtype=mx.int32)
            if draft_model is not None:
                draft_tokens = coupled_draft(draft_model, decoder.draft_cache, unseen[None],
                                             noise[None, :K], temperature, top_k, top_p)[0]
            else:
                draft_tokens, _ = decoder.draft_generation(unseen, K, 0.0)
            K, caught_up = draft_tokens.shape[0], unseen.size > 2  # a drafter may propose fewer
            mx.eval(draft_tokens)
        drafted = time.perf_counter()
        target_inputs = mx.array(committed[decoder.target_cache[0].offset :], dtype=mx.int32)
        logits = decoder.target_model(mx.concatenate([target_inputs, draft_tokens])[None],
                                      cache=decoder.target_cache)
        n, tokens = verify_coupled(draft_tokens, logits[0, -(K + 1) :], noise[: K + 1],
                                   temperature, top_k, top_p)
        verified = time.perf_counter()
        if K > 0:
            commit_round(decoder, draft_tokens.tolist(), n, tokens[-1])
        out = []
        for i, token in enumerate(tokens[: max_tokens - emitted]):
            out.append((token, i < n))
            if token in eos:
                break
        committed += [token for token, _ in out]
        emitted += len(out)
        if controller is not None:
            if K == 0 and not prefilled and hasattr(controller, "observe_prefill"):
                controller.observe_prefill(len(target_inputs), verified - drafted)
            else:
                draft_s = drafted - start if K and not caught_up else None
                controller.update(K, n, draft_s, verified - drafted)
        prefilled = True
        if stats is not None:
            stats.record_round(K, n, len(out))
            stats.draft_calls += K
            stats.draft_time_s += drafted - start
            stats.verify_time_s += verified - drafted
        yield from out
        if out[-1][0] in eos:
            return


def batched_coupled_decode(
    batch_prompts: list[list[int]],
    seeds: Sequence[int],
    draft_model,
    target_model,
    max_tokens: int = 100,
    lookahead: int = 4,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    controller=None,
    stats: Optional[SpecStats] = None,
) -> list[list[int]]:
    """Batched coupled decoding: row i is `seeded_generate(batch_prompts[i], seed=seeds[i])`.

    B >= 1 non-empty prompts (`left_pad`), one seed per row (ValueError if the counts differ),
    whatever the batch-mates. Caches: `make_batch_cache` for both models; per round the target
    holds each row's committed sequence C minus its last token, the draft C minus its last
    `lag` tokens (lag = 2, plus one per plain round since the last speculative one — the same
    for every row, so the draft's catch-up inputs are rectangular [B, lag]). K = controller's
    lookahead (None: `lookahead`), at most r - 1 (r = the most tokens a live row still wants);
    K = 0 is a plain batched round (a plain first round also feeds the draft the padded prompts,
    so that its cache is never empty). The first round prefills the padded prompts.
    Speculative round: row b's noise for its positions t_b .. t_b + K (t_b = the length of its
    committed sequence), `coupled_draft`, one target call on [newest token, drafts],
    `verify_coupled` per row, `rollback_rows` by K - n_b on both caches. Rows leave at EOS or
    max_tokens (`filter_rows`). controller.update(K, [n_b ...], ...) per speculative round
    (draft seconds None while the draft catches up on more than 2 tokens), update(0, 0, None,
    seconds) per plain one — observe_prefill(L, seconds) instead for a plain first round, when
    the controller has it. stats: one record_round per live row per round. Returns B lists of ints, in the order of batch_prompts.
    """
    if len(seeds) != len(batch_prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(batch_prompts)} prompts: pass one seed per row")
    tokens, left_padding = left_pad(batch_prompts)
    V, eos = model_vocab_size(target_model), set(eos_token_ids)
    outputs: list[list[int]] = [[] for _ in batch_prompts]
    if max_tokens <= 0:
        return outputs
    draft_cache = make_batch_cache(draft_model, left_padding)
    target_cache = make_batch_cache(target_model, left_padding)
    rows = list(range(len(batch_prompts)))  # the original index of each live row
    target_inputs, lag = tokens, None  # lag None: the draft has seen nothing yet

    def sequence(r: int) -> list[int]:
        return list(batch_prompts[r]) + outputs[r]

    while rows:
        K = controller.lookahead if controller is not None else lookahead
        K = max(0, min(K, max(max_tokens - len(outputs[r]) for r in rows) - 1))
        starts = [len(sequence(r)) for r in rows]  # each row's next position t_b
        noise = mx.stack([gumbel_noise(seeds[r], range(t, t + K + 1), V)
                          for r, t in zip(rows, starts)])  # [B, K + 1, V]
        start = time.perf_counter()
        draft_inputs = tokens if lag is None else mx.array([sequence(r)[-lag:] for r in rows])
        draft_tokens = mx.zeros((len(rows), 0), dtype=mx.int32)
        if K > 0:
            draft_tokens = coupled_draft(draft_model, draft_cache, draft_inputs, noise[:, :K],
                                         temperature, top_k, top_p)
        elif lag is None:  # a plain first round: the draft still reads the prompts
            draft_model(draft_inputs, cache=draft_cache)
        mx.eval(draft_tokens)
        drafted = time.perf_counter()
        inputs = mx.concatenate([target_inputs, draft_tokens], axis=1)
        logits = target_model(inputs, cache=target_cache)[:, -(K + 1) :]
        keep, drops, counts = [], [], []
        for b, r in enumerate(rows):
            n, new = verify_coupled(draft_tokens[b], logits[b], noise[b], temperature, top_k, top_p)
            out = []
            for token in new[: max_tokens - len(outputs[r])]:
                out.append(token)
                if token in eos:
                    break
            outputs[r] += out
            counts.append(n)
            if stats is not None:
                stats.record_round(K, n, len(out))
            if len(outputs[r]) < max_tokens and out[-1] not in eos:
                keep.append(b)
                drops.append(K - n)
        verified = time.perf_counter()
        if controller is not None and K == 0 and lag is None and hasattr(controller, "observe_prefill"):
            controller.observe_prefill(tokens.shape[1], verified - drafted)
        elif controller is not None:
            caught_up = lag is None or lag > 2
            controller.update(K, counts if K else 0, None if not K or caught_up else drafted - start,
                              verified - drafted)
        if stats is not None:
            stats.draft_calls += K
            stats.draft_time_s += drafted - start
            stats.verify_time_s += verified - drafted
        if not keep:
            break
        if len(keep) < len(rows):
            for cache in (draft_cache, target_cache):
                filter_rows(cache, keep)
            rows = [rows[b] for b in keep]
        # Target held C[:-1] + d_1..d_K, draft C + d_1..d_(K-1): both drop K - n_b. A plain
        # round leaves the draft one more token behind.
        if K > 0:
            rollback_rows(target_cache, drops)
            rollback_rows(draft_cache, drops)
        lag = 2 if K > 0 else (1 if lag is None else lag + 1)
        if min(target_cache[0].left_padding.tolist()) >= SHARED_PADDING_LIMIT:
            for cache in (draft_cache, target_cache):
                filter_rows(cache, list(range(len(rows))))
        target_inputs = mx.array([sequence(r)[-1:] for r in rows], dtype=mx.int32)
    return outputs
