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
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from specdec.kit.loading import ASSETS

MEDUSA_HEADS = ASSETS / "tiny-code-medusa"  # the heads trained for the embedded target


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
    """

    def __init__(self, model: Any):
        if isinstance(model, FeatureModel):
            raise ValueError("this model is already a FeatureModel: use it as it is")
        inner = getattr(model, "model", None)
        if inner is None or not callable(inner):
            raise ValueError(
                f"{type(model).__name__} has no `.model` backbone returning hidden states: "
                "hidden states need an mlx-lm llama-family model (llama, qwen2, mistral, ...)"
            )
        self.model, self.lm_head = model, lm_head_of(model)
        self.hidden: mx.array | None = None
        self.calls = 0

    @property
    def layers(self):
        return self.model.layers

    @property
    def args(self):
        return self.model.args

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        self.calls += 1
        self.hidden = self.model.model(inputs, cache=cache)
        return self.lm_head(self.hidden)


def feature_model(model: Any) -> FeatureModel:
    """`model` itself if it is a FeatureModel already, else `FeatureModel(model)`."""
    return model if isinstance(model, FeatureModel) else FeatureModel(model)


# Heads on disk ----------------------------------------------------------------------------------
def save_heads(heads: Any, path: str | Path, **config: Any) -> None:
    """Write `heads` (an nn.Module with `hidden_size` and `num_heads`) to a directory.

    heads.safetensors holds the weights in float16; config.json holds hidden_size, num_heads
    and whatever `config` adds (the target's name, the training settings).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(heads.parameters())}
    mx.save_safetensors(str(path / "heads.safetensors"), weights)
    meta = {"hidden_size": int(heads.hidden_size), "num_heads": int(heads.num_heads), **config}
    (path / "config.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_heads(path: str | Path, heads_cls: Callable[[int, int], Any], target: Any = None,
               dtype: Any = mx.float32) -> Any:
    """Build `heads_cls(hidden_size, num_heads)` from a directory written by `save_heads`.

    target: if given, its hidden size must equal the heads' (ValueError naming both sizes).
    dtype: the weights' dtype once loaded (float32 by default: exact math on the CPU).
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no Medusa heads in {path} (config.json missing): train them with "
            "`python scripts/train_heads.py --out DIR`"
        )
    config = json.loads((path / "config.json").read_text())
    if target is not None and hidden_size_of(target) != config["hidden_size"]:
        raise ValueError(
            f"the heads in {path} read hidden size {config['hidden_size']}, but the target's "
            f"hidden size is {hidden_size_of(target)}: load heads trained for this target"
        )
    heads = heads_cls(config["hidden_size"], config["num_heads"])
    weights = mx.load(str(path / "heads.safetensors"))
    heads.update(tree_unflatten([(k, v.astype(dtype)) for k, v in weights.items()]))
    mx.eval(heads.parameters())
    return heads
