"""Hidden states of an mlx-lm target, and Medusa heads on disk (provided code, not a task).

Week 5's drafters read the target's *features*: the final-normed hidden state that the LM head
turns into logits. mlx-lm's llama-family models split exactly there, in public code:

    hidden = model.model(tokens[None], cache=cache)       # [1, L, D], after the final norm
    logits = model.lm_head(hidden)                         # or embed_tokens.as_linear if tied

`FeatureModel` wraps such a model so that one call gives both: it returns the logits (so every
loop of the course, `tree_forward` included, can use it as the model) and keeps the hidden
states of that same call in `.hidden`. Nothing is forked or re-run.
Shapes: `B` batch, `L` sequence, `D` hidden size, `V` vocabulary, `K` heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from specdec.kit.layers import attention_mask, decoder_parts
from specdec.kit.loading import ASSETS

MEDUSA_HEADS = ASSETS / "tiny-code-medusa"  # the heads trained for the embedded target
EAGLE_DRAFTER = ASSETS / "tiny-code-eagle"  # the EAGLE drafter trained for the embedded target


def lm_head_of(model: Any) -> Callable[[mx.array], mx.array]:
    """The target's LM head as a function hidden [..., D] -> logits [..., V].

    `model.lm_head` when the model has its own, `model.model.embed_tokens.as_linear` when the
    input and output embeddings are tied (the embedded target ties them).
    """
    if isinstance(model, FeatureModel):
        model = model.model
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "embed_tokens"):
            raise ValueError(
                f"{type(model).__name__} has neither `lm_head` nor `model.embed_tokens`: Medusa "
                "heads need an mlx-lm llama-family model (llama, qwen2, mistral, ...)"
            )
        return inner.embed_tokens.as_linear
    return model.lm_head


def hidden_size_of(model: Any) -> int:
    """D, the width of the target's hidden states."""
    if isinstance(model, FeatureModel):
        model = model.model
    return int(model.args.hidden_size)


class FeatureModel:
    """An mlx-lm model that also keeps the hidden states of its last call.

        fm = FeatureModel(model)
        logits = fm(tokens[None], cache=cache)    # exactly model(tokens[None], cache=cache)
        fm.hidden                                  # [B, L, D]: the features behind those logits
        fm.calls                                   # forward calls so far

    `layers` is the wrapped model's, so `tree_forward(fm, ...)` scores a tree and keeps its
    hidden states too. `lm_head` is `lm_head_of(model)`.

    taps (EAGLE, Week 5 Day 3): layer numbers j in 1..num_layers whose outputs (the residual
    stream after layer j, before the final norm) are kept too, e.g. (2, 4, 6) for low, middle
    and high features. The forward then runs the model's public parts one layer at a time
    (`specdec.kit.layers.decoder_parts`: same operations, same logits) and `fm.features` is
    their concatenation [B, L, len(taps) * D]; without taps `fm.features` is `fm.hidden`.
    Every call of one row also logs `features[0]` by cache position (a call at cache offset o
    replaces what the log held from o on, as the cache itself does), so a drafter can read the
    target's features of any position it has computed: `known_features(lo, hi)`.
    """

    def __init__(self, model: Any, taps: Optional[Sequence[int]] = None):
        if isinstance(model, FeatureModel):
            raise ValueError("this model is already a FeatureModel: use it as it is")
        inner = getattr(model, "model", None)
        if inner is None or not callable(inner):
            raise ValueError(
                f"{type(model).__name__} has no `.model` backbone returning hidden states: "
                "hidden states need an mlx-lm llama-family model (llama, qwen2, mistral, ...)"
            )
        self.model, self.lm_head = model, lm_head_of(model)
        self.taps = tuple(int(j) for j in taps) if taps else ()
        if self.taps:
            num_layers = len(inner.layers)
            bad = [j for j in self.taps if not 1 <= j <= num_layers]
            if bad or list(self.taps) != sorted(set(self.taps)):
                raise ValueError(
                    f"taps {list(self.taps)} must be increasing layer numbers in 1..{num_layers} "
                    f"(this model has {num_layers} layers)")
        self.hidden: mx.array | None = None
        self.features: mx.array | None = None
        self.offset: int | None = 0  # cache position of the last call's first token
        self.calls = 0
        self._log: list[tuple[int, mx.array]] = []  # (first position, features [L, F*D]) per call

    @property
    def layers(self):
        return self.model.layers

    @property
    def args(self):
        return self.model.args

    @property
    def num_features(self) -> int:
        """F: how many D-wide features `fm.features` concatenates (1 without taps)."""
        return max(1, len(self.taps))

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        self.calls += 1
        offset = getattr(cache[0], "offset", 0) if cache else 0
        self.offset = offset if isinstance(offset, int) else None  # None: per-row (batch) caches
        if not self.taps:
            self.hidden = self.features = self.model.model(inputs, cache=cache)
        else:
            parts = decoder_parts(self.model)
            h = parts.embed(inputs)
            mask = attention_mask(h, cache[0] if cache else None)
            kept = []
            for j, layer in enumerate(parts.layers, start=1):
                h = layer(h, mask, cache=cache[j - 1] if cache else None)
                if j in self.taps:
                    kept.append(h)
            self.hidden = parts.norm(h)
            self.features = mx.concatenate(kept, axis=-1)
        if self.features.shape[0] == 1 and self.offset is not None:
            self._remember(self.offset, self.features[0])
        return self.lm_head(self.hidden)

    def _remember(self, start: int, features: mx.array) -> None:
        while self._log and self._log[-1][0] >= start:
            self._log.pop()
        if self._log:
            first, old = self._log[-1]
            if first + old.shape[0] > start:
                self._log[-1] = (first, old[: start - first])
        self._log.append((start, features))

    @property
    def num_known(self) -> int:
        """Positions 0 .. num_known - 1 have logged features (the end of the last call)."""
        return self._log[-1][0] + self._log[-1][1].shape[0] if self._log else 0

    def known_features(self, lo: int, hi: int) -> mx.array:
        """The logged features of positions lo .. hi - 1 of row 0, float [hi - lo, F * D].

        ValueError if a position was never computed (outside 0 .. num_known - 1).
        """
        if not 0 <= lo <= hi <= self.num_known:
            raise ValueError(f"features of positions {lo}..{hi - 1} are not known: the target "
                             f"has computed positions 0..{self.num_known - 1}")
        pieces, end = [], hi
        for first, chunk in reversed(self._log):
            if end <= lo:
                break
            if first < end:
                start = max(lo, first)
                pieces.append(chunk[start - first : end - first])
                end = start
        if end > lo:
            raise ValueError(f"features of positions {lo}..{end - 1} were not logged in one row")
        pieces.reverse()
        return mx.concatenate(pieces) if pieces else mx.zeros((0, self.num_features * hidden_size_of(self)))


def feature_model(model: Any) -> FeatureModel:
    """`model` itself if it is a FeatureModel already, else `FeatureModel(model)`."""
    return model if isinstance(model, FeatureModel) else FeatureModel(model)


# Weights on disk: Medusa heads and EAGLE drafters ----------------------------------------------
def _save(module: Any, path: Path, weights_file: str, meta: dict) -> None:
    """`module`'s weights in float16 to path/weights_file, `meta` to path/config.json."""
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(module.parameters())}
    mx.save_safetensors(str(path / weights_file), weights)
    (path / "config.json").write_text(json.dumps(meta, indent=1) + "\n")


def _read_config(path: Path, missing: str) -> dict:
    """path/config.json, or FileNotFoundError saying `missing` (what is absent and how to make it)."""
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no {missing}")
    return json.loads((path / "config.json").read_text())


def _load_weights(module: Any, file: Path, dtype: Any) -> Any:
    """`module` with the weights of `file`, cast to `dtype` and evaluated."""
    weights = mx.load(str(file))
    module.update(tree_unflatten([(k, v.astype(dtype)) for k, v in weights.items()]))
    mx.eval(module.parameters())
    return module


def save_heads(heads: Any, path: str | Path, **config: Any) -> None:
    """Write `heads` (an nn.Module with `hidden_size` and `num_heads`) to a directory.

    heads.safetensors holds the weights in float16; config.json holds hidden_size, num_heads
    and whatever `config` adds (the target's name, the training settings).
    """
    meta = {"hidden_size": int(heads.hidden_size), "num_heads": int(heads.num_heads), **config}
    _save(heads, Path(path), "heads.safetensors", meta)


def load_heads(path: str | Path, heads_cls: Callable[[int, int], Any], target: Any = None,
               dtype: Any = mx.float32) -> Any:
    """Build `heads_cls(hidden_size, num_heads)` from a directory written by `save_heads`.

    target: if given, its hidden size must equal the heads' (ValueError naming both sizes).
    dtype: the weights' dtype once loaded (float32 by default: exact math on the CPU).
    """
    path = Path(path)
    config = _read_config(path, f"Medusa heads in {path} (config.json missing): train them with "
                                "`python scripts/train_heads.py --out DIR`")
    if target is not None and hidden_size_of(target) != config["hidden_size"]:
        raise ValueError(
            f"the heads in {path} read hidden size {config['hidden_size']}, but the target's "
            f"hidden size is {hidden_size_of(target)}: load heads trained for this target"
        )
    heads = heads_cls(config["hidden_size"], config["num_heads"])
    return _load_weights(heads, path / "heads.safetensors", dtype)


# An EAGLE drafter on disk (Week 5 Day 3) ----------------------------------------------------------
_EAGLE_ARGS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "rms_norm_eps", "rope_theta", "vocab_size")


def save_eagle(layer: Any, path: str | Path, target_args: Any, **config: Any) -> None:
    """Write an EAGLE drafter (the `EagleLayer` of either tree) to a directory.

    target_args: the model args the layer was built from (the target's). drafter.safetensors
    holds the weights in float16; config.json holds those sizes (`args`), the target layers the
    drafter reads (`taps`) and whatever `config` adds (the target's name, training settings).
    """
    args = {name: getattr(target_args, name, None) for name in _EAGLE_ARGS}
    args["num_key_value_heads"] = args["num_key_value_heads"] or args["num_attention_heads"]
    args["rope_theta"] = args["rope_theta"] or 10000.0
    meta = {"args": args, "taps": list(layer.taps), **config}
    _save(layer, Path(path), "drafter.safetensors", meta)


def load_eagle(path: str | Path = EAGLE_DRAFTER, target: Any = None, drafter_cls: Any = None,
               dtype: Any = mx.float32) -> Any:
    """Build the EAGLE drafter saved in `path` (default: the one trained for the embedded target).

    target: if given, its hidden size must equal the drafter's (ValueError naming both sizes).
    drafter_cls: the `EagleLayer` class to build (default: the reference's; the student's
    class loads the same files). dtype: the weights' dtype once loaded (float32: exact math).
    Wrap it for decoding: `EagleDrafter(target, load_eagle(path, target))`.
    """
    from types import SimpleNamespace

    path = Path(path)
    config = _read_config(path, f"EAGLE drafter in {path} (config.json missing): train one with "
                                "`python scripts/train_eagle.py --out DIR`")
    args = SimpleNamespace(**config["args"])
    if target is not None and hidden_size_of(target) != args.hidden_size:
        raise ValueError(
            f"the EAGLE drafter in {path} reads hidden size {args.hidden_size}, but the target's "
            f"hidden size is {hidden_size_of(target)}: load a drafter trained for this target"
        )
    if drafter_cls is None:
        from specdec_ref.eagle import EagleLayer as drafter_cls
    return _load_weights(drafter_cls(args, tuple(config["taps"])), path / "drafter.safetensors", dtype)


def check_eagle_fits(layer: Any, fm: FeatureModel) -> None:
    """ValueError, naming both, if the FeatureModel keeps other taps than the EAGLE layer reads,
    or the layer's hidden size is not the target's."""
    if fm.taps != tuple(layer.taps):
        raise ValueError(f"the target's FeatureModel keeps taps {list(fm.taps)} but the "
                         f"drafter reads taps {list(layer.taps)}: use FeatureModel(model, "
                         "taps=layer.taps), or pass the bare model")
    if hidden_size_of(fm) != layer.hidden_size:
        raise ValueError(f"the drafter's hidden size {layer.hidden_size} != the target's "
                         f"{hidden_size_of(fm)}: load a drafter trained for this target")


class EagleDrafterBase:
    """`EagleDrafter`'s constructor and `reset` (provided); each tree's `EagleDrafter` adds `draft`.

        drafter = EagleDrafter(target, load_eagle(EAGLE_DRAFTER, target))
        decoder = DrafterDecoder(drafter, drafter.target_model, lookahead=4)

    Attributes: layer (the EagleLayer), target_model (the `FeatureModel` the decoder must verify
    with: the drafter reads the features of its calls), vocab_size, cache ([KVCache] of the
    one layer), tokens (the token of each cache entry, at least as long as the cache), num_true
    (how many leading cache entries were fed the target's true features).
    """

    def __init__(self, target_model: Any, layer: Any):
        """target_model: an mlx-lm llama-family model, or a `FeatureModel` of it with the
        layer's taps (a bare model is wrapped: `FeatureModel(target_model, layer.taps)`).
        ValueError, naming both, if a FeatureModel's taps or the hidden size differ from the
        layer's. vocab_size: the target's. Starts reset.
        """
        from specdec.kit.models import model_vocab_size

        fm = target_model
        if not isinstance(fm, FeatureModel):
            fm = FeatureModel(target_model, layer.taps)
        check_eagle_fits(layer, fm)
        self.layer, self.target_model = layer, fm
        self.vocab_size = model_vocab_size(fm.model)
        self.reset()

    def reset(self) -> None:
        """An empty cache and history. Features the target logged before now belong to an
        earlier text: `calls_at_reset` remembers its call count, so `draft` can tell."""
        from mlx_lm.models.cache import KVCache

        self.cache, self.tokens, self.num_true = [KVCache()], [], 0
        self.calls_at_reset = self.target_model.calls
