"""Every drafter in the product: kit/self_drafters.py, kit/drafter_registry.py and
`specdec generate|bench|serve --drafter ...` (not graded: these test the kit, on the reference).

Toy llama target (hidden size 32, V = 64), untrained or seeded random Medusa heads, oracle heads
that know the greedy text: a few seconds in all. The promises: greedy output is plain greedy
output for every drafter, fallback controller on or off; a seeded sampled run is plain seeded
decoding's text (the coupled rule); the Medusa drafter reads the hidden state of the last
verified position from the verifying call and makes no model call; errors name the value and
the fix.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from specdec.kit import drafter_registry
from specdec.kit.cli import main
from specdec.kit.drafter_registry import DRAFTERS, DrafterError, DrafterOptions, build_decoder
from specdec.kit.features import FeatureModel, feature_model, save_heads
from specdec.kit.impl import get_impl
from specdec.kit.models import tiny_llama
from specdec.kit.self_drafters import MedusaDrafter
from specdec.kit.stats import SpecStats
from support import forced, mlx_lm_greedy, pooled_chisquare_p, raises
from test_cli import test_bad_input_is_one_error_line_naming_the_value as one_error_line

REF = get_impl("ref")
TOY = ["--target", "toy-llama"]
D, V = 32, 64
PROMPT = [3, 9, 2, 7, 11, 4]


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0)


def random_heads(num_heads: int = 3, seed: int = 5, hidden_size: int = D):
    """Reference MedusaHeads with seeded random weights (fresh heads are LM-head copies)."""
    heads = REF.medusa.MedusaHeads(hidden_size, num_heads)
    params = tree_flatten(heads.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    heads.update(tree_unflatten([(name, mx.random.normal(w.shape, key=k) / hidden_size**0.5)
                                 for (name, w), k in zip(params, keys)]))
    mx.eval(heads.parameters())
    return heads


class OracleHeads:
    """Heads that know the greedy text: at the hidden state of position p they draft the true
    tokens p + 2, p + 3, ... except where (p + k) % 3 == 0 (a wrong one), so rounds end on
    rejections and on full acceptance. They record how far each hidden state they are fed is
    from the nearest true one (0 when the drafter reads the right row)."""

    def __init__(self, text, hidden, num_heads=3):
        self.text, self.hidden, self.num_heads, self.hidden_size = text, hidden, num_heads, D
        self.positions, self.distances = [], []

    def __call__(self, hidden, lm_head):
        d = ((self.hidden - hidden.reshape(1, -1)) ** 2).sum(-1)
        p = int(mx.argmin(d).item())
        self.positions.append(p)
        self.distances.append(float(d[p].item()))
        logits = np.zeros((self.num_heads, V), dtype=np.float32)
        for k in range(1, self.num_heads + 1):
            token = self.text[min(p + 1 + k, len(self.text) - 1)]
            logits[k - 1, token if (p + k) % 3 else (token + 1) % V] = 10.0
        return mx.array(logits)


def output_tokens(out: str) -> list[str]:
    return out.split("output:")[1].splitlines()[0].split()


def run_cli(capsys, *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, f"specdec {' '.join(argv)} exited {code}:\n{captured.err}"
    return captured.out


# The Medusa drafter ------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", ["speculative", "fallback"])
def test_medusa_drafter_reads_the_last_verified_hidden_state(target, loop):
    """Drafting reads fm.hidden of the target's previous call, at the last verified position,
    whether that call verified drafts or was a plain round of the controller (here K follows a
    fixed schedule with plain rounds between, so the check does not depend on the clock); no
    model call."""
    max_tokens = 30
    plain = mlx_lm_greedy(target, PROMPT, max_tokens + 4)
    text = PROMPT + plain
    heads = OracleHeads(text, target.model(mx.array(text)[None])[0])
    fm = feature_model(target)
    decoder = REF.drafters.DrafterDecoder(MedusaDrafter(heads, fm), fm, lookahead=3)
    stats = SpecStats()
    if loop == "speculative":
        stream = REF.speculative.speculative_generate(decoder, mx.array(PROMPT), max_tokens, stats=stats)
    else:
        controller = forced(REF, [3, 0, 0, 2, 3, 0, 1], max_lookahead=3, initial_lookahead=3)
        stream = REF.fallback.fallback_generate(decoder, controller, mx.array(PROMPT), max_tokens,
                                                stats=stats)
    tokens = [int(t) for t, _ in stream]
    assert tokens == plain[:max_tokens], f"{loop}: greedy output must be plain greedy output"
    assert heads.distances and max(heads.distances) < 1e-6, (
        f"{loop}: each draft must read the target's hidden state of the last verified position, "
        f"from the previous call; squared distances to the nearest true state: {heads.distances}")
    assert fm.calls == stats.rounds, f"{loop}: one target call per round, none to draft"
    assert stats.accepted > stats.drafted / 2, (
        f"{loop}: oracle heads read at the right position get most drafts accepted: "
        f"{stats.accepted}/{stats.drafted}")


def test_medusa_drafter_samples_from_its_q(target):
    """At temperature T a draft is drawn from q = softmax(head logits / T), the q it returns
    (what makes verification exact). 2000 draws of head 1's draft against its q: chi-square at
    p < 1e-3, so one seeded run in a thousand of a correct drafter would fail (fixed seeds)."""
    fm = feature_model(target)
    drafter = MedusaDrafter(random_heads(2, seed=1), fm)
    drafter.vocab_size = V
    fm(mx.array(PROMPT[:-1])[None])  # as a plain round would: the target predicted PROMPT[-1]
    counts, q = np.zeros(V), None
    for key in mx.random.split(mx.random.key(7), 2000):
        cache = drafter.cache[0]
        cache.trim(cache.offset)  # the same position every time: the whole prompt is unseen
        tokens, q_draft = drafter.draft(mx.array(PROMPT), 2, temperature=1.5, key=key)
        assert tokens.shape == (2,) and q_draft.shape == (2, V)
        counts[int(tokens[0].item())] += 1
        q = np.array(q_draft[0], dtype=np.float64)
    assert abs(q.sum() - 1) < 1e-4, "q rows are distributions"
    q = q / q.sum()  # float32 softmax: renormalise for the test
    assert pooled_chisquare_p(counts, q) > 1e-3, "drafts must be drawn from the q returned"


def test_medusa_drafter_errors(target):
    with raises(TypeError, "the drafter needs the FeatureModel it reads hidden states from"):
        MedusaDrafter(random_heads(), target)
    with raises(ValueError, "heads of hidden size 16 on a target of hidden size 32", match=r"16.*32"):
        MedusaDrafter(random_heads(hidden_size=16), FeatureModel(target))


# The registry ------------------------------------------------------------------------------------
def test_registry_builds_a_decoder_for_every_chain_drafter(target):
    """build_decoder(impl, name, target, ...) for each name: the loops run it unchanged."""
    from specdec.kit.models import tiny_llama_pair

    draft, _ = tiny_llama_pair(seed=0)
    want = mlx_lm_greedy(target, PROMPT, 12)
    options = DrafterOptions(heads=random_heads(), skip_layers="1")
    for name in ("model", "ngram", "medusa", "layerskip"):
        decoder = build_decoder(REF, name, target, draft, lookahead=3, options=options)
        got = [int(t) for t, _ in REF.speculative.speculative_generate(decoder, mx.array(PROMPT), 12)]
        assert got == want, f"drafter {name}: greedy output must be plain greedy output"
    auto = build_decoder(REF, "layerskip", target, options=DrafterOptions(calibration=PROMPT * 4))
    assert auto.drafter.skip in ((0,), (1,)), "auto skips a quarter of the layers, at least one"
    with raises(DrafterError, "tree has its own loop", match="tree_speculative_generate"):
        build_decoder(REF, "tree", target, draft)
    with raises(DrafterError, "an unknown name lists the drafters", match="medusa"):
        build_decoder(REF, "magic", target)
    assert set(DRAFTERS) == {"model", "ngram", "tree", "medusa", "eagle", "layerskip"}


# The CLI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads")
    save_heads(random_heads(3), path, target="toy-llama")
    return str(path)


@pytest.mark.parametrize("flags", [
    ["--drafter", "medusa"],
    ["--drafter", "medusa", "--heads", "HEADS", "--no-fallback", "--k", "3"],
    ["--drafter", "medusa", "--heads", "HEADS", "--k", "2"],
    ["--drafter", "layerskip"],
    ["--drafter", "layerskip", "--skip-layers", "0", "--no-fallback"],
    ["--drafter", "ngram"],
], ids=lambda f: " ".join(f).replace("HEADS", "DIR"))
def test_generate_greedy_is_plain_for_every_drafter(flags, heads_dir, capsys):
    flags = [heads_dir if f == "HEADS" else f for f in flags]
    plain = output_tokens(run_cli(capsys, "generate", *TOY, "--max-tokens", "16", "--no-color", "--plain"))
    out = run_cli(capsys, "generate", *TOY, "--max-tokens", "16", "--no-color", *flags)
    assert output_tokens(out) == plain, f"{' '.join(flags)}: greedy output must be plain's\n{out}"
    header = out.splitlines()[0]
    assert f"drafter {flags[1]}" in header and "draft -" in header, header
    if "--no-fallback" not in flags:
        assert "with fallback" in header and "# fallback: " in out, (
            f"the fallback controller drives --drafter {flags[1]} by default:\n{out}")
    if flags[1] == "layerskip":
        assert "# layerskip: skipping layers [" in out, "say which layers are skipped"
    if flags[1] == "medusa":
        assert "# medusa: 3 heads" in out, "say which heads draft"


@pytest.mark.parametrize("drafter", ["medusa", "layerskip"])
def test_generate_seeded_sampling_is_plain_seeded_text(drafter, heads_dir, capsys):
    """Week 5 Day 1's coupled rule: --seed with --temperature gives --plain's text, controller on
    or off; without --seed and with --no-fallback one run repeats exactly."""
    args = ["generate", *TOY, "--max-tokens", "14", "--no-color", "--temperature", "0.9"]
    extra = ["--heads", heads_dir] if drafter == "medusa" else []
    want = output_tokens(run_cli(capsys, *args, "--seed", "4", "--plain"))
    for more in ([], ["--no-fallback", "--k", "2"]):
        out = run_cli(capsys, *args, "--seed", "4", "--drafter", drafter, *extra, *more)
        assert "sampling rule: coupled" in out and output_tokens(out) == want, (
            f"--drafter {drafter} {' '.join(more)} --seed 4: plain seeded decoding's text\n{out}")
    runs = [output_tokens(run_cli(capsys, *args, "--no-fallback", "--drafter", drafter, *extra))
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 14, "exact rejection sampling, seed 0: repeatable"


def test_bench_json_with_a_self_drafter(heads_dir, capsys):
    out = run_cli(capsys, "bench", *TOY, "--draft", "toy-llama", "--prompts", "1", "--max-tokens",
                  "12", "--json", "--drafter", "medusa", "--heads", heads_dir)
    report = json.loads(out)
    assert report["modes"] == ["plain", "speculative", "fallback"], report["modes"]
    assert report["drafter"]["name"] == "medusa" and report["drafter"]["notes"], report["drafter"]
    for mode in ("speculative", "fallback"):
        assert report["median"][mode]["identical"] is True, f"{mode}: greedy output equals plain's"


BAD = [
    (["--drafter", "medusa", "--heads", "HEADS16"], ["hidden size 16", "32", "--heads"]),
    (["--drafter", "medusa", "--heads", "/no/such/heads"], ["/no/such/heads", "train_heads.py"]),
    (["--drafter", "model", "--heads", "HEADS16"], ["--heads", "medusa or eagle"]),
    (["--drafter", "medusa", "--skip-layers", "1"], ["--skip-layers 1", "layerskip"]),
    (["--drafter", "layerskip", "--skip-layers", "7"], ["layer 7", "0..1"]),
    (["--drafter", "layerskip", "--skip-layers", "0,1"], ["skips all 2 layers", "keep at least one"]),
    (["--drafter", "layerskip", "--skip-layers", "auto:5"], ["auto:5", "1..1"]),
    (["--drafter", "layerskip", "--skip-layers", "x"], ["'x'", "auto:N"]),
    (["--drafter", "tree", "--batch", "2"], ["--batch", "'tree'"]),
    (["--target", "tiny-code-draft", "--drafter", "medusa"], ["tiny-code-draft", "--heads DIR"]),
]


@pytest.mark.parametrize("flags, words", BAD, ids=[" ".join(flags) for flags, _ in BAD])
def test_bad_drafter_flags_are_one_error_line_naming_the_value(flags, words, tmp_path, capsys):
    if "HEADS16" in flags:
        save_heads(random_heads(hidden_size=16), tmp_path)
        flags = [str(tmp_path) if f == "HEADS16" else f for f in flags]
    one_error_line(["generate", *TOY, "--max-tokens", "4", *flags], words, capsys)


def test_eagle_runs_through_the_registry_when_the_course_has_it(target, tmp_path, capsys):
    """Week 5 Day 3 provides EagleDrafter and the kit's load_eagle: then --drafter eagle keeps
    greedy output exact (an untrained drafter for the toy target); without them, a clear error."""
    argv = ["generate", *TOY, "--max-tokens", "12", "--no-color", "--drafter", "eagle"]
    try:
        layer_cls = REF.eagle.EagleLayer
    except AttributeError:
        layer_cls = None
    if drafter_registry.eagle_parts() is None or layer_cls is None:
        assert main(argv) == 2
        assert "--drafter eagle is not available" in capsys.readouterr().err
        return
    from specdec.kit.features import save_eagle

    layer = layer_cls(target.args, ())
    mx.eval(layer.parameters())
    save_eagle(layer, tmp_path, target.args)
    plain = output_tokens(run_cli(capsys, *argv[:-2], "--plain"))
    for extra in ([], ["--no-fallback"]):
        out = run_cli(capsys, *argv, "--heads", str(tmp_path), *extra)
        assert output_tokens(out) == plain, f"--drafter eagle {extra}: greedy output is plain's\n{out}"


def test_eagle_says_when_it_is_not_available(monkeypatch, capsys):
    monkeypatch.setattr(drafter_registry, "eagle_parts", lambda: None)
    assert main(["generate", *TOY, "--max-tokens", "4", "--drafter", "eagle"]) == 2
    err = capsys.readouterr().err
    assert "--drafter eagle is not available" in err and "medusa" in err, err


# The server --------------------------------------------------------------------------------------
def test_serve_refuses_drafters_of_one_sequence(capsys):
    assert main(["serve", *TOY, "--drafter", "tree"]) == 2
    err = capsys.readouterr().err
    assert "--drafter tree" in err and "medusa" in err and "generate|bench" in err, err


def test_serve_layerskip_is_exact(target):
    """`specdec serve --drafter layerskip`: the skipped target (`layerskip_draft`, as the server
    builds it) drafts for the whole batch in the reference scheduler; greedy rows are plain
    greedy decoding's whoever shares the batch. In-process: no HTTP, same models."""
    from specdec.kit.server import CharTokenizer
    from specdec.kit.server.codec import TextCodec
    from specdec.kit.server.startup import layerskip_draft

    draft, note = layerskip_draft(REF, target, "auto", TextCodec(CharTokenizer(V)))
    assert "skipping layers [" in note and draft.kept, note
    prompts = [PROMPT, [5], [60, 1, 33], PROMPT[::-1], [7, 7, 7, 7]]
    scheduler = REF.serving.Scheduler(target, draft, lookahead=3, max_batch=3)
    requests = [REF.serving.Request(p, max_tokens=9, temperature=0.0) for p in prompts]
    for r in requests:
        scheduler.submit(r)
    while scheduler.has_work:
        scheduler.step()
    for p, r in zip(prompts, requests):
        assert r.output == mlx_lm_greedy(target, p, 9), f"prompt {p}: greedy serving is exact"
    assert scheduler.stats.drafted > 0, "the skipped target drafted"
