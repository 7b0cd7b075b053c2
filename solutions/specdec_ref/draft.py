"""Week 2 Day 1 — draft integration: a decoder that owns a draft and a target model.

Shapes: `K` draft length (lookahead), `V` vocabulary. Both models follow mlx-lm:
`model(tokens[None], cache=cache) -> logits[1, L, V]`.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from specdec.kit.models import model_vocab_size

from .sampling import make_probs, sample_token


class SpeculativeDecoder:
    """A draft model, a target model, and their KV caches.

    Attributes every later day relies on (set by `__init__`):
        draft_model, target_model   the two models
        lookahead                   K, the number of tokens drafted per round (int >= 1)
        vocab_size                  V, shared by both models
        draft_cache, target_cache   lists of per-layer KV caches (`make_prompt_cache`)

    Cache invariant between rounds: each cache holds a prefix of the committed sequence; the
    tokens it has not seen yet are fed on the next call.
    """

    def __init__(self, draft_model, target_model, lookahead: int = 4):
        """Store the models and K, check they can work together, and create fresh caches.

        Raises ValueError, naming the values and the fix, when:
          - lookahead < 1;
          - the vocabularies differ (`model_vocab_size`), e.g. "draft vocab 32000 != target vocab
            32064: the draft must share the target's tokenizer";
          - a cache layer of either model is not trimmable (rejected drafts must be rolled back).
        Creates the caches with `self.reset()`.
        """
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        draft_vocab, target_vocab = model_vocab_size(draft_model), model_vocab_size(target_model)
        if draft_vocab != target_vocab:
            raise ValueError(
                f"draft vocab {draft_vocab} != target vocab {target_vocab}: "
                "the draft must share the target's tokenizer"
            )
        self.draft_model, self.target_model = draft_model, target_model
        self.lookahead, self.vocab_size = lookahead, target_vocab
        self.reset()
        for role, cache in (("draft", self.draft_cache), ("target", self.target_cache)):
            stuck = [type(c).__name__ for c in cache if not c.is_trimmable()]
            if stuck:
                raise ValueError(
                    f"the {role} model's cache has layers that cannot be trimmed ({stuck[0]}): "
                    "speculative decoding must roll back rejected drafts; use a model whose "
                    "layers all use trimmable caches such as mlx_lm's KVCache"
                )

    def reset(self) -> None:
        """Fresh, empty caches for a new prompt (provided)."""
        self.draft_cache = make_prompt_cache(self.draft_model)
        self.target_cache = make_prompt_cache(self.target_model)

    def draft_generation(
        self,
        prompt_tokens: mx.array,
        num_tokens: int,
        temperature: float = 0.0,
        key: Optional[mx.array] = None,
    ) -> tuple[mx.array, mx.array]:
        """Propose `num_tokens` tokens with the draft model, one draft call per token.

        prompt_tokens: int [L], L >= 1 — the tokens the draft cache has not seen yet (the whole
            prompt on the first call; afterwards the newest committed token or two).
        num_tokens: K >= 1. temperature: 0 is greedy; > 0 samples and needs `key` (split it
            once per token).
        Returns (draft_tokens, q_draft):
            draft_tokens  int32 [K]      the proposals
            q_draft       float32 [K, V] q_draft[i] is the distribution draft_tokens[i] was drawn
                                         from: `make_probs(logits_i, temperature)` (one-hot when
                                         temperature == 0). Verification needs it for exactness.
        Cache: afterwards the draft cache has grown by L + K - 1: it holds prompt_tokens and
        draft_tokens[:-1] (the last proposal is never fed — if accepted, the next call feeds it).
        """
        prompt_tokens = mx.array(prompt_tokens, dtype=mx.int32).reshape(-1)
        if prompt_tokens.size == 0:
            raise ValueError("draft_generation needs at least one unseen token to feed the draft")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if temperature > 0 and key is None:
            raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=mx.random.key(seed)")
        keys = mx.random.split(key, num_tokens) if temperature > 0 else [None] * num_tokens
        tokens, probs = [], []
        inputs = prompt_tokens
        for i in range(num_tokens):
            logits = self.draft_model(inputs[None], cache=self.draft_cache)[0, -1]
            q = make_probs(logits, temperature)
            token = mx.argmax(logits) if temperature == 0 else sample_token(q, keys[i])
            token = token.astype(mx.int32)
            tokens.append(token)
            probs.append(q)
            # Start computing this step while Python builds the next one (no host sync).
            mx.async_eval(token)
            inputs = token.reshape(1)
        return mx.stack(tokens), mx.stack(probs)
