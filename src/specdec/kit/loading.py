"""Load models for the course: any mlx-lm model directory or hub id, or the embedded pair.

The embedded pair (`tiny-code` target, `tiny-code-draft` draft) ships as package data under
`specdec/kit/assets/`; see the book's appendix for how it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {
    "tiny-code": ASSETS / "tiny-code",
    "tiny-code-draft": ASSETS / "tiny-code-draft",
}
DEFAULT_TARGET = "tiny-code"
DEFAULT_DRAFT = "tiny-code-draft"


def resolve_model_path(name_or_path: str) -> str:
    """An embedded model's short name -> its directory; anything else is passed to mlx-lm."""
    if name_or_path in EMBEDDED:
        path = EMBEDDED[name_or_path]
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"embedded model {name_or_path!r} is missing from {path}: reinstall the package "
                "or retrain it with `python scripts/train_models.py`"
            )
        return str(path)
    return name_or_path


def embedded_available() -> bool:
    return all((p / "config.json").exists() for p in EMBEDDED.values())


def load_model(name_or_path: str, dtype: Any = None) -> tuple[Any, Any]:
    """`mlx_lm.load` plus the dtype policy: float32 on CPU (fast there), as stored on GPU."""
    from mlx_lm import load

    model, tokenizer = load(resolve_model_path(name_or_path))
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
    if dtype is not None:
        model.set_dtype(dtype)
        mx.eval(model.parameters())
    return model, tokenizer


def load_pair(target: str, draft: str) -> tuple[Any, Any, Any]:
    """Load a (target, draft) pair and return (target_model, draft_model, tokenizer).

    The tokenizer is the target's. The decoder itself checks that the vocabularies match.
    """
    target_model, tokenizer = load_model(target)
    draft_model, draft_tokenizer = load_model(draft)
    if len(draft_tokenizer.vocab) != len(tokenizer.vocab):
        raise ValueError(
            f"draft tokenizer has {len(draft_tokenizer.vocab)} tokens, target tokenizer has "
            f"{len(tokenizer.vocab)}: the draft must share the target's tokenizer"
        )
    return target_model, draft_model, tokenizer
