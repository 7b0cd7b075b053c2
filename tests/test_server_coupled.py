"""Seeded serving requests use the coupled rule (issue 21, the server half): a request that gives
its seed (temperature > 0) returns exactly the text of plain seeded decoding
(`coupling.seeded_generate` with that seed), whatever its batch-mates, K, the controller's choices
(K = 0 included) or `--no-fallback`; a request without a seed keeps exact rejection sampling.

In-process: the reference `Scheduler` on the toy llamas, run on the CPU device (the promise is
token-for-token equality between batched K + 1-token verify calls and 1-token plain steps: exact
enough on the CPU, see `exact_arithmetic` in tests/test_week_5_day_1.py; the graded Markov version
is tests/test_week_4_day_4.py::test_task_4_coupled_rows_are_plain_seeded_decoding). One real
server on 127.0.0.1 with the default (fallback) controller, `--device cpu`. These tests check the
kit's rule and the server, not a task: the scheduler is the reference's (in-process), or the
implementation under test with the reference standing in for unfinished tasks (the server).
"""

from __future__ import annotations

import threading

import httpx
import mlx.core as mx
import pytest

from specdec.kit.impl import get_impl
from specdec.kit.serving import COUPLED, REJECTION
from support import mlx_lm_greedy
from support import start_server, stop_server
from test_server_hardening import toy, toy_text, wait_idle
from test_week_5_day_1 import ScriptedController  # K from a script, cycled; records its updates

PROMPT = [3, 9, 17, 4, 40]


@pytest.fixture
def on_cpu():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


def seeded(target, prompt, max_tokens, seed, temperature, top_p=1.0) -> list[int]:
    coupling = get_impl("ref").coupling
    return list(coupling.seeded_generate(target, mx.array(prompt), max_tokens, seed,
                                         temperature=temperature, top_p=top_p))


def serve(scheduler, arrivals: dict[int, list]) -> None:
    """Step until done; arrivals[s] = requests submitted just before step s."""
    steps = 0
    while scheduler.has_work or any(s >= steps for s in arrivals):
        for request in arrivals.pop(steps, []):
            scheduler.submit(request)
        scheduler.step()
        steps += 1
        assert steps < 2000, "the scheduler never finished"


@pytest.mark.parametrize("seed, temperature, top_p", [(0, 0.8, 1.0), (5, 1.0, 1.0), (123, 0.6, 0.9),
                                                       (2**32 - 1, 1.3, 1.0)])
def test_coupled_row_is_plain_seeded_decoding_alone_and_in_company(on_cpu, llama_models, seed,
                                                                    temperature, top_p):
    draft, target = llama_models
    S = get_impl("ref").serving
    want = seeded(target, PROMPT, 24, seed, temperature, top_p)
    runs = {}
    for name, K, script, company in [("alone, K = 3", 3, None, False),
                                     ("alone, K = 1", 1, None, False),
                                     ("in company, scripted K", 4, [2, 0, 5, 0, 0, 1, 3], True),
                                     ("in company, K = 6", 6, None, True)]:
        controller = ScriptedController(script) if script else None
        scheduler = S.Scheduler(target, draft, lookahead=K, max_batch=6, controller=controller)
        me = S.Request(list(PROMPT), max_tokens=24, temperature=temperature, top_p=top_p, seed=seed,
                       sampling=COUPLED)
        arrivals = {0: [me]}
        if company:  # join at different steps, leave before or after `me`
            arrivals[0].append(S.Request([7] * 9, max_tokens=5, temperature=0.9, seed=seed))
            arrivals[1] = [S.Request([1, 2], max_tokens=40)]
            arrivals[3] = [S.Request([30, 31, 32], max_tokens=30, temperature=1.1, seed=(seed + 1) % 2**32,
                                     sampling=COUPLED)]
        serve(scheduler, arrivals)
        runs[name] = me.output
        if script:
            assert {k for k, _ in controller.updates} >= {0, 2, 5}, "the script must switch K, 0 included"
    for name, output in runs.items():
        assert output == want, (
            f"seed {seed}, T = {temperature}, top_p = {top_p}, {name}: a coupled row must emit exactly "
            f"plain seeded decoding's tokens\n  want {want}\n  got  {output}")


def test_mixed_batch_keeps_each_rows_rule(on_cpu, llama_models):
    """Greedy rows stay greedy, rejection rows are unchanged by coupled batch-mates, and each
    request's `speculative.sampling` names its rule."""
    from specdec.kit.server import speculative_summary

    draft, target = llama_models
    S = get_impl("ref").serving

    def run(with_coupled: bool):
        scheduler = S.Scheduler(target, draft, lookahead=3, max_batch=8)
        greedy = S.Request([5, 6, 7], max_tokens=20)
        rejection = S.Request([8, 9], max_tokens=20, temperature=0.9, seed=77)
        rows = [greedy, rejection]
        if with_coupled:
            rows += [S.Request([1 + i, 2], max_tokens=10 + 5 * i, temperature=0.8, seed=i, sampling=COUPLED)
                     for i in range(3)]
        serve(scheduler, {0: rows})
        return rows

    alone, mixed = run(False), run(True)
    assert mixed[0].output == mlx_lm_greedy(target, [5, 6, 7], 20), "a greedy row stays exactly greedy"
    assert mixed[1].output == alone[1].output, (
        "a rejection-sampled row draws from its own keys: coupled batch-mates must not change its "
        f"tokens (fixed K): alone {alone[1].output}, mixed {mixed[1].output}")
    names = [speculative_summary(r)["sampling"] for r in mixed]
    assert names == ["greedy", "rejection", "coupled", "coupled", "coupled"], names
    assert mixed[1].sampling is REJECTION, "a request without a rule keeps exact rejection sampling"


def test_coupled_rows_let_k_be_capped_and_need_a_32_bit_seed(llama_models):
    draft, target = llama_models
    S = get_impl("ref").serving
    scheduler = S.Scheduler(target, draft, lookahead=4, max_batch=4)
    coupled = S.Request([1, 2], max_tokens=2, temperature=0.7, seed=1, sampling=COUPLED)
    scheduler.rows = [coupled]
    assert scheduler.next_lookahead() == 1, (
        "coupled rows give the same tokens for every K: K is capped at the tokens still wanted - 1")
    scheduler.rows = [coupled, S.Request([1, 2], max_tokens=2, temperature=0.7)]
    assert scheduler.next_lookahead() == 4, "a rejection-sampled row still forbids the cap"
    for seed in (-1, 2**32):
        with pytest.raises(ValueError, match="seed"):
            scheduler.submit(S.Request([1, 2], temperature=0.5, seed=seed, sampling=COUPLED))
    scheduler.submit(S.Request([1, 2], temperature=0.0, seed=2**40, sampling=COUPLED))  # greedy: no noise


def test_server_seeded_request_is_plain_seeded_decoding_with_the_default_controller(request, on_cpu,
                                                                                    llama_models):
    """The default server (fallback controller: K from timings, 0 included): the same seeded
    request alone, again, and beside concurrent batch-mates gives one text, plain seeded
    decoding's; `speculative.sampling` says "coupled"; no seed: "rejection"."""
    _, target = llama_models
    proc, base = start_server(request.config.getoption("--impl"), "--device", "cpu",
                              "--max-batch", "4")
    try:
        def post(**fields) -> dict:
            body = {"model": "toy-llama", "prompt": "seeded", "max_tokens": 24, **fields}
            r = httpx.post(base + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text[:300]
            return r.json()

        me = dict(temperature=0.8, seed=42)
        solo = post(**me)
        wait_idle(base)
        results: dict[int, dict] = {}

        def mate(i: int) -> None:
            results[i] = post(prompt="mate" * (i + 1), max_tokens=4 + 9 * i, temperature=0.5 + 0.4 * i,
                              **({"seed": 1000 + i} if i else {}))

        threads = [threading.Thread(target=mate, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        crowded = post(**me)
        for t in threads:
            t.join(timeout=60)
        want = toy_text(seeded(target, toy("seeded"), 24, 42, 0.8))
        texts = [solo["choices"][0]["text"], crowded["choices"][0]["text"]]
        assert texts == [want, want], (
            f"a seeded request must return plain seeded decoding's text {want!r} whatever K the "
            f"controller picks and whoever shares its batch: solo {texts[0]!r}, with batch-mates {texts[1]!r}")
        assert solo["speculative"]["sampling"] == crowded["speculative"]["sampling"] == "coupled", (
            f"the speculative object names the rule that ran: {solo['speculative']}")
        assert results[0]["speculative"]["sampling"] == "rejection", (
            f"a request without a seed keeps exact rejection sampling: {results[0]['speculative']}")
        assert results[1]["speculative"]["sampling"] == "coupled"
        r = httpx.post(base + "/v1/completions", json={"model": "toy-llama", "prompt": "x", "seed": 2**32,
                                                       "temperature": 0.5}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", (
            f"the coupled rule keys its noise by a 32-bit seed: a larger one is a 400 naming seed; {r.text[:200]}")
    finally:
        stop_server(proc)
