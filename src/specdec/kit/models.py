"""Toy models that speak mlx-lm's language: `model(tokens[B, L], cache=cache) -> logits[B, L, V]`.

Two families, both built in-process from a seed (no files, no downloads):

- `MarkovLM`: the next-token distribution depends only on the current token (and, optionally,
  on its absolute position modulo a period). Tests know its exact distributions, so they can
  check sampling exactness and the analytic acceptance rate sum_x min(p(x|s), q(x|s)).
  Its cache is a real `mlx_lm.models.cache.KVCache` holding dummy keys, so `offset`, `trim`,
  `BatchKVCache` and friends behave exactly as they do for a transformer. The position
  dependence makes a cache whose offset is wrong produce *different tokens*, so cache bugs
  cannot hide behind a memoryless model.
- `tiny_llama`: a real `mlx_lm.models.llama.Model` with a few thousand random (seeded) weights.
  Same code path as any mlx-lm checkpoint: attention, RoPE, KV caches, masks.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache


class MarkovLM:
    """A language model whose next token depends on the current token (and position).

    transitions: float array [M, V, V]; row `transitions[m, s]` is the distribution of the next
        token after token `s` read at an absolute position `i` with `i % M == m`. Rows sum to 1.
    The logits are `log(transitions[...])` (so `softmax(logits)` recovers the rows exactly;
    impossible tokens have logit -inf).
    """

    def __init__(self, transitions: mx.array):
        transitions = mx.array(transitions, dtype=mx.float32)
        if transitions.ndim == 2:
            transitions = transitions[None]
        if transitions.ndim != 3 or transitions.shape[1] != transitions.shape[2]:
            raise ValueError(
                f"transitions must have shape [M, V, V] or [V, V], got {transitions.shape}"
            )
        self.transitions = transitions
        self.period = transitions.shape[0]
        self.vocab_size = transitions.shape[-1]
        self._log_transitions = mx.log(transitions)

    # The mlx-lm model interface -------------------------------------------------------------
    def __call__(self, inputs: mx.array, cache: Optional[list[Any]] = None) -> mx.array:
        B, L = inputs.shape
        offset = 0
        if cache is not None:
            c = cache[0]
            offset = c.offset
            # Store dummy keys so the cache's offset/trim/mask logic is the real mlx-lm one.
            dummy = mx.zeros((B, 1, L, 1), dtype=mx.float32)
            c.update_and_fetch(dummy, dummy)
        if isinstance(offset, mx.array) and offset.ndim == 1:  # BatchKVCache: per-row offsets
            positions = offset[:, None] + mx.arange(L)[None]
        else:
            positions = mx.broadcast_to(offset + mx.arange(L)[None], (B, L))
        phase = positions % self.period
        return self._log_transitions[phase, inputs]

    def make_cache(self) -> list[Any]:
        return [KVCache()]

    @property
    def layers(self) -> list[None]:
        return [None]

    # Exact distributions, for tests and notebooks ---------------------------------------------
    def next_token_probs(self, token: int, position: int) -> mx.array:
        """p(. | token read at absolute `position`), shape [V]."""
        return self.transitions[position % self.period, token]


def random_transitions(
    vocab_size: int, seed: int, period: int = 1, concentration: float = 0.3
) -> np.ndarray:
    """Seeded random transition tensor [period, V, V] with Dirichlet(concentration) rows.

    A small concentration gives peaked rows (predictable text), a large one flat rows.
    """
    rng = np.random.default_rng(seed)
    rows = rng.dirichlet(np.full(vocab_size, concentration), size=(period, vocab_size))
    return rows.astype(np.float32)


def markov_pair(
    vocab_size: int = 16,
    seed: int = 0,
    mix: float = 0.3,
    period: int = 1,
    concentration: float = 0.3,
) -> tuple[MarkovLM, MarkovLM]:
    """A (draft, target) pair: the draft is `(1 - mix) * target + mix * other` row by row.

    mix = 0 gives q = p (acceptance 1); mix = 1 gives an unrelated draft.
    """
    p = random_transitions(vocab_size, seed, period, concentration)
    other = random_transitions(vocab_size, seed + 1_000_003, period, concentration)
    q = (1.0 - mix) * p + mix * other
    q = q / q.sum(-1, keepdims=True)
    return MarkovLM(mx.array(q)), MarkovLM(mx.array(p))


def tiny_llama(
    seed: int = 0,
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
) -> llama.Model:
    """A real mlx-lm llama with seeded random float32 weights (a few thousand parameters)."""
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    model.update(tree_unflatten(_seeded_weights(model, mx.random.key(seed))))
    mx.eval(model.parameters())
    return model


def _seeded_weights(model, key: mx.array) -> list[tuple[str, mx.array]]:
    """Every weight drawn from an explicit key: the model never depends on global RNG state."""
    params = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(params))
    out = []
    for (name, w), k in zip(params, keys):
        if "norm" in name:
            out.append((name, mx.ones_like(w)))
        elif "embed_tokens" in name:
            out.append((name, mx.random.normal(w.shape, key=k)))
        elif "lm_head" in name:  # sharp next-token distributions: greedy ties are rare
            out.append((name, 4.0 * mx.random.normal(w.shape, key=k) / (w.shape[-1] ** 0.5)))
        else:  # Linear weight [out, in]: keep activations O(1)
            out.append((name, mx.random.normal(w.shape, key=k) / (w.shape[-1] ** 0.5)))
    return out


def tiny_llama_pair(
    seed: int = 0, noise: float = 0.2, **kwargs: Any
) -> tuple[llama.Model, llama.Model]:
    """A (draft, target) pair of tiny llamas: the draft is the target with seeded weight noise.

    noise = 0 gives an identical draft (every greedy draft accepted); larger noise, a worse draft.
    """
    target = tiny_llama(seed, **kwargs)
    draft = tiny_llama(seed, **kwargs)
    params = tree_flatten(target.parameters())
    keys = mx.random.split(mx.random.key(seed + 7919), len(params))
    noisy = [
        (name, w if "norm" in name else w + noise * mx.random.normal(w.shape, key=k) * w.std())
        for (name, w), k in zip(params, keys)
    ]
    draft.update(tree_unflatten(noisy))
    mx.eval(draft.parameters())
    return draft, target


def model_vocab_size(model: Any) -> int:
    """The size of the model's output vocabulary (the last axis of its logits)."""
    if hasattr(model, "vocab_size") and isinstance(model.vocab_size, int):
        return model.vocab_size
    args = getattr(model, "args", None)
    if args is not None and getattr(args, "vocab_size", None) is not None:
        return int(args.vocab_size)
    raise ValueError(
        f"cannot tell the vocabulary size of {type(model).__name__}: expected a `vocab_size` "
        "attribute or `args.vocab_size` (every mlx-lm model has the latter)"
    )
