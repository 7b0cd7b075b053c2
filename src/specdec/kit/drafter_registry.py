"""Every drafter of the course by name: one place that turns a name into a decoder (provided code).

    from specdec.kit.drafter_registry import DRAFTERS, DrafterOptions, build_decoder
    decoder = build_decoder(impl, "medusa", target, lookahead=3)       # the shipped heads
    decoder = build_decoder(impl, "layerskip", target, options=DrafterOptions(skip_layers="4"))
    decoder = build_decoder(impl, "model", target, draft, lookahead=4)
    for token, from_draft in impl.speculative.speculative_generate(decoder, prompt, 64): ...

`build_decoder` returns the decoder Week 2's loops expect: a `SpeculativeDecoder` for the draft
model, a `DrafterDecoder` around any other `Drafter` (n-gram, Medusa heads, EAGLE, layer
skipping). So `speculative_generate`, `fallback_generate` with its controller, and the coupled
rule of Week 5 Day 1 drive every drafter unchanged. The token-tree drafter has a loop of its own
(`tree_speculative_generate`) and no decoder: it is listed for its name and help only.
`specdec generate|bench --drafter NAME` and the bake-off use this module; problems are
`DrafterError`s (a ValueError) naming the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from specdec.kit.config import BATCHED_DRAFTERS

HeadsSpec = Union[None, str, Path, Any]  # None: the shipped heads; a directory; a loaded module


class DrafterError(ValueError):
    """A drafter that cannot be built as asked: the message names the value and the fix."""


@dataclass(frozen=True)
class DrafterOptions:
    """The settings some drafters take (the others ignore them).

    max_ngram, min_ngram  ngram: the suffix lengths it looks up (Week 3 Day 3)
    heads                 medusa: None (the heads shipped for the embedded target), a directory
                          written by `save_heads`, or a loaded MedusaHeads
    eagle                 eagle: None (the shipped drafter) or its directory
    skip_layers           layerskip: "auto" (skip a quarter of the layers, at least one, chosen
                          by `choose_layers_to_skip` on `calibration`), "auto:N" (N layers, so
                          chosen), or explicit indices such as "3,4" or (3, 4)
    calibration           layerskip auto: held-out token ids to measure agreement on (>= 2)
    """

    max_ngram: int = 3
    min_ngram: int = 1
    heads: HeadsSpec = None
    eagle: Optional[Union[str, Path]] = None
    skip_layers: Union[str, Sequence[int]] = "auto"
    calibration: Optional[Sequence[int]] = None


@dataclass(frozen=True)
class DrafterSpec:
    """One drafter: its name, whether it needs a draft model, one line of help, its builder.

    build(impl, target, draft, lookahead, options) -> decoder (None for "tree").
    """

    name: str
    needs_draft_model: bool
    help: str
    build: Callable[..., Any]


def build_decoder(impl, name: str, target, draft=None, lookahead: int = 4,
                  options: Optional[DrafterOptions] = None):
    """The decoder for drafter `name` on `target` (and `draft`, for "model"): see the module doc.

    impl: `specdec.kit.impl.get_impl(...)`, whose exercise code runs. Raises DrafterError for an
    unknown name, "tree" (its own loop), or a drafter whose pieces are missing or do not fit.
    """
    spec = DRAFTERS.get(name)
    if spec is None:
        raise DrafterError(f"unknown drafter {name!r}: use one of {', '.join(DRAFTERS)}")
    if spec.needs_draft_model and draft is None:
        raise DrafterError(f"drafter {name!r} needs a draft model: pass draft=...")
    return spec.build(impl, target, draft, lookahead, options or DrafterOptions())


def _part(impl, module: str, name: str, drafter: str) -> Any:
    """`impl.<module>.<name>`, or a DrafterError naming what is missing."""
    try:
        return getattr(getattr(impl, module), name)
    except AttributeError:
        raise DrafterError(f"drafter {drafter!r} needs {impl.package}.{module}.{name}, which the "
                           f"{impl.name!r} implementation does not provide (yet); try --impl ref") from None


# The builders ------------------------------------------------------------------------------------
def _model(impl, target, draft, lookahead, options):
    return _part(impl, "draft", "SpeculativeDecoder", "model")(draft, target, lookahead=lookahead)


def _tree(impl, target, draft, lookahead, options):
    raise DrafterError("drafter 'tree' has a loop of its own (tree.tree_speculative_generate), "
                       "not a decoder: call it directly")


def _wrap(impl, drafter, target, lookahead: int, name: str):
    Decoder = _part(impl, "drafters", "DrafterDecoder", name)
    decoder = Decoder(drafter, target, lookahead=lookahead)
    # A drafter with a model of its own (layer skipping): the fallback controller times one
    # call of it for c's prior (`first_draft_step` reads `decoder.draft_model`).
    if getattr(drafter, "draft_model", None) is not None:
        decoder.draft_model = drafter.draft_model
    return decoder


def _ngram(impl, target, draft, lookahead, options):
    Ngram = _part(impl, "drafters", "NgramDrafter", "ngram")
    try:
        drafter = Ngram(max_ngram=options.max_ngram, min_ngram=options.min_ngram)
    except ValueError as e:
        raise DrafterError(str(e)) from None
    return _wrap(impl, drafter, target, lookahead, "ngram")


def load_medusa_heads(impl, target, heads: HeadsSpec = None):
    """MedusaHeads for `target`: loaded from a directory (None: the shipped ones), or as given.

    The heads must read the target's hidden size (DrafterError naming both sizes otherwise).
    """
    from specdec.kit.features import MEDUSA_HEADS, hidden_size_of, load_heads

    Heads = _part(impl, "medusa", "MedusaHeads", "medusa")
    if heads is None or isinstance(heads, (str, Path)):
        path = Path(heads) if heads is not None else MEDUSA_HEADS
        try:
            return load_heads(path, Heads, target)
        except FileNotFoundError as e:
            raise DrafterError(f"--heads {path}: {e}" if heads is not None else str(e)) from None
        except ValueError as e:
            shipped = "" if heads is not None else " (the shipped heads fit the embedded target)"
            raise DrafterError(f"{e}{shipped}; pass --heads DIR with heads trained for this "
                               "target (scripts/train_heads.py --out DIR)") from None
    size = hidden_size_of(target)
    if int(heads.hidden_size) != size:
        raise DrafterError(f"the Medusa heads read hidden size {heads.hidden_size}, but the "
                           f"target's hidden size is {size}: use heads trained for this target")
    return heads


def untrained_medusa_heads(impl, target, num_heads: int = 3):
    """Fresh MedusaHeads for `target` (toy-llama has no trained ones): zero-initialised, so every
    head is a copy of the LM head."""
    from specdec.kit.features import hidden_size_of

    return _part(impl, "medusa", "MedusaHeads", "medusa")(hidden_size_of(target), num_heads)


def _medusa(impl, target, draft, lookahead, options):
    from specdec.kit.features import feature_model
    from specdec.kit.self_drafters import MedusaDrafter

    fm = feature_model(target)
    heads = load_medusa_heads(impl, fm, options.heads)
    return _wrap(impl, MedusaDrafter(heads, fm), fm, lookahead, "medusa")


def parse_skip_layers(text: Union[str, Sequence[int]], num_layers: int) -> Union[int, tuple]:
    """"auto" -> how many layers auto skips; "auto:N" -> N; "3,4" or (3, 4) -> the tuple.

    DrafterError for anything else, or a count outside 1..num_layers - 1.
    """
    if not isinstance(text, str):
        return tuple(text)
    fix = (f"write auto, auto:N (1 <= N <= {num_layers - 1}) or comma-separated layer indices "
           f"in 0..{num_layers - 1} (keep at least one), such as {num_layers // 2}")
    text = text.strip()
    if text == "auto":
        return max(1, num_layers // 4)
    try:
        if text.startswith("auto:"):
            count = int(text[5:])
            if not 1 <= count <= num_layers - 1:
                raise DrafterError(f"--skip-layers {text}: the target has {num_layers} layers, "
                                   f"so skip 1..{num_layers - 1}; {fix}")
            return count
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as e:
        if isinstance(e, DrafterError):
            raise
        raise DrafterError(f"--skip-layers {text!r} is not a layer list: {fix}") from None


def choose_skip(impl, target, skip_layers, calibration) -> tuple:
    """The layers to skip: as given, or the end of `choose_layers_to_skip`'s greedy path."""
    from specdec.kit.layers import decoder_parts

    num_layers = len(decoder_parts(target).layers)
    if num_layers < 2:
        raise DrafterError(f"the target has {num_layers} layer: layer skipping needs at least 2 "
                           "(skip some, keep at least one)")
    choice = parse_skip_layers(skip_layers, num_layers)
    if isinstance(choice, tuple):
        return choice
    if calibration is None or len(calibration) < 2:
        raise DrafterError("--skip-layers auto needs calibration text (at least 2 tokens): pass "
                           "DrafterOptions(calibration=...) or explicit layers")
    import mlx.core as mx

    choose = _part(impl, "layerskip", "choose_layers_to_skip", "layerskip")
    return choose(target, mx.array(list(calibration), dtype=mx.int32), choice)[-1][0]


def _layerskip(impl, target, draft, lookahead, options):
    skip = choose_skip(impl, target, options.skip_layers, options.calibration)
    Drafter = _part(impl, "layerskip", "LayerSkipDrafter", "layerskip")
    try:
        drafter = Drafter(target, skip)
    except ValueError as e:
        raise DrafterError(f"--skip-layers: {e}") from None
    return _wrap(impl, drafter, target, lookahead, "layerskip")


def eagle_parts():
    """(load_eagle, EAGLE_DRAFTER) from the kit (Week 5 Day 3), or None while it has none."""
    import importlib

    for module in ("specdec.kit.features", "specdec.kit.eagle_io"):
        try:
            kit = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(kit, "load_eagle"):
            return kit.load_eagle, getattr(kit, "EAGLE_DRAFTER", None)
    return None


def load_eagle_layer(impl, target, path=None):
    """The EagleLayer of `impl` loaded from `path` (None: the shipped one) for `target`;
    DrafterError when this install has no EAGLE or the weights do not fit the target."""
    parts = eagle_parts()
    module = getattr(impl, "eagle", None) if parts is not None else None
    if getattr(module, "EagleDrafter", None) is None:
        raise DrafterError("--drafter eagle is not available in this install (Week 5 Day 3 "
                           "provides it: the kit's load_eagle and eagle.EagleDrafter); use "
                           "--drafter medusa or layerskip")
    load_eagle, default = parts
    try:
        return load_eagle(path or default, target=target, drafter_cls=getattr(module, "EagleLayer", None))
    except FileNotFoundError as e:
        raise DrafterError(f"--heads {path}: {e}" if path else str(e)) from None
    except ValueError as e:
        shipped = "" if path else " (the shipped drafter fits the embedded target)"
        raise DrafterError(f"{e}{shipped}; pass --heads DIR with an EAGLE drafter trained for "
                           "this target (scripts/train_eagle.py --out DIR)") from None


def _eagle(impl, target, draft, lookahead, options):
    """Week 5 Day 3's API: `EagleDrafter(target, load_eagle(path, target))`, verified with
    `drafter.target_model` (a FeatureModel with the layer's taps)."""
    from specdec.kit.features import FeatureModel

    layer = load_eagle_layer(impl, target, options.eagle)
    # A bare target: the drafter wraps it in a FeatureModel with the layer's taps.
    bare = target.model if isinstance(target, FeatureModel) else target
    drafter = impl.eagle.EagleDrafter(bare, layer)
    return _wrap(impl, drafter, drafter.target_model, lookahead, "eagle")


def batched_draft(impl, name: str, target, draft=None, options: Optional[DrafterOptions] = None):
    """What drafts for a batch of rows (`--batch`, `specdec serve`): a draft model the batched
    loops and the scheduler call once per drafted position for every row.

    model: `draft` itself; layerskip: Week 5 Day 4's `LayerSkipModel` of the target; ngram,
    medusa and eagle: a `specdec.kit.self_serving` adapter (`NgramDraftModel`,
    `HeadsDraftModel`, `EagleDraftModel`; the last two read the features of `adapter.target`,
    the FeatureModel the scheduler must verify with) — run those through
    `self_serving.self_draft_scheduler`. DrafterError for other names (the tree).
    """
    from specdec.kit.features import FeatureModel

    options = options or DrafterOptions()
    bare = target.model if isinstance(target, FeatureModel) else target
    if name == "model":
        return draft
    if name == "layerskip":
        skip = choose_skip(impl, bare, options.skip_layers, options.calibration)
        return _part(impl, "layerskip", "LayerSkipModel", "layerskip")(bare, skip)
    from specdec.kit import self_serving

    if name == "ngram":
        find = _part(impl, "drafters", "find_ngram_continuation", "ngram")
        try:
            return self_serving.NgramDraftModel(bare, find, options.max_ngram, options.min_ngram)
        except ValueError as e:
            raise DrafterError(str(e)) from None
    if name == "medusa":
        fm = FeatureModel(bare)
        return self_serving.HeadsDraftModel(load_medusa_heads(impl, fm, options.heads), fm)
    if name == "eagle":
        layer = load_eagle_layer(impl, bare, options.eagle)
        return self_serving.EagleDraftModel(layer, FeatureModel(bare, layer.taps))
    raise DrafterError(f"--drafter {name} cannot draft for a batch: each row would verify a tree of its own; "
                       f"batch with one of {', '.join(BATCHED_DRAFTERS)}")


DRAFTERS: dict[str, DrafterSpec] = {spec.name: spec for spec in (
    DrafterSpec("model", True, "the draft model (Week 2)", _model),
    DrafterSpec("ngram", False, "prompt lookup, no model (Week 3 Day 3)", _ngram),
    DrafterSpec("tree", True, "token trees of the draft model (Week 3 Day 4)", _tree),
    DrafterSpec("medusa", False, "Medusa heads on the target's hidden state (Week 5 Day 2)", _medusa),
    DrafterSpec("eagle", False, "EAGLE, a one-layer drafter on the target's features (Week 5 Day 3)",
                _eagle),
    DrafterSpec("layerskip", False, "the target with layers skipped (Week 5 Day 4)", _layerskip),
)}
DRAFTER_NAMES = tuple(DRAFTERS)
