"""Startup of `specdec serve` (kit): flags, models, limits, and uvicorn with its own guards.

Connections are bounded three ways: uvicorn's `limit_concurrency` (a request beyond it is a
503), `timeout_keep_alive` (an idle kept-alive connection closes) and
`h11_max_incomplete_event_size` (the most header bytes); and `GuardedH11Protocol` adds what
uvicorn lacks: a connection that has not sent its request line and headers within
--header-timeout seconds is closed, and past --max-connections the oldest such connection makes
room for the new one, so half-open connections can neither pile up, exhaust file descriptors,
nor lock real clients out.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional

from specdec.kit.config import BATCHED_DRAFTERS
from specdec.kit.drafter_registry import DRAFTER_NAMES

TOY = "toy-llama"
API_KEY_ENV = "SPECDEC_API_KEY"
SERVED_DRAFTERS = BATCHED_DRAFTERS  # drafters that draft every row of the batch in one call
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def build_parser() -> argparse.ArgumentParser:
    from specdec.kit.loading import DEFAULT_DRAFT, DEFAULT_TARGET

    p = argparse.ArgumentParser(prog="specdec serve", description=(
        "An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
        "/health, /metrics) with continuous batching over batched speculative decoding."))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"target model: embedded name, mlx-lm directory, or {TOY} (default {DEFAULT_TARGET})")
    p.add_argument("--draft", default=None,
                   help=f"draft model (default: {DEFAULT_DRAFT} for {DEFAULT_TARGET}, {TOY} for {TOY})")
    p.add_argument("--impl", choices=["ref", "student"], default="ref",
                   help="whose scheduler runs: ref, or student (the reference stands in for "
                        "unfinished tasks)")
    p.add_argument("--k", type=int, default=4, help="lookahead K (the largest K with fallback; default 4)")
    p.add_argument("--plain", action="store_true", help="plain batched decoding (no draft model, K = 0)")
    p.add_argument("--drafter", choices=list(DRAFTER_NAMES), default="model",
                   help="model: the draft model (default); layerskip: the target with layers "
                        "skipped (Week 5 Day 4, --skip-layers); medusa: heads on the target's "
                        "hidden state (Week 5 Day 2); eagle: a one-layer drafter on its features "
                        "(Week 5 Day 3) -- both shipped for the embedded target, or --heads DIR; "
                        "ngram: prompt lookup in each row's own text (Week 3 Day 3). tree is "
                        "refused (each row would verify a tree of its own): `specdec "
                        "generate|bench --drafter tree` runs it")
    p.add_argument("--heads", default=None, metavar="DIR",
                   help="--drafter medusa|eagle: the trained weights (default: the ones shipped "
                        "for the embedded target)")
    p.add_argument("--skip-layers", default="auto", metavar="SPEC",
                   help="--drafter layerskip: layers to skip, e.g. 4 or 3,4; auto (default) skips "
                        "a quarter (at least one), auto:N skips N, chosen by measured agreement")
    p.add_argument("--no-fallback", action="store_true",
                   help="fixed K every round (default: the Week 4 Day 3 fallback controller picks K); "
                        "a request with a seed gives the same text either way (the coupled rule)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (default 8)")
    p.add_argument("--context", type=int, default=None,
                   help="context length in tokens (default: the target's max_position_embeddings)")
    p.add_argument("--chat-max-tokens", type=int, default=256,
                   help="max_tokens of a chat request that sets none (default 256)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (string or file) for a tokenizer without one")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --target)")
    g = p.add_argument_group("access", "who may talk to the server")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: "
                        f"${API_KEY_ENV} if set, else no key)")
    g.add_argument("--allowed-hosts", nargs="*", default=None,
                   help="Host header names accepted (default: --host, plus localhost names for a "
                        "loopback host; any when bound to 0.0.0.0 or :: without this flag)")
    g.add_argument("--allowed-origins", nargs="*", default=[],
                   help="web origins allowed by CORS (default none: browsers may not call it)")
    g = p.add_argument_group("limits", "what one client may ask for (see the serving chapter)")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens (default: the context - 1)")
    g.add_argument("--max-stop", type=int, default=4, help="most stop strings per request (default 4)")
    g.add_argument("--max-stop-length", type=int, default=64,
                   help="longest stop string in characters (default 64)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a row; beyond it, 429 with Retry-After (default 64)")
    g.add_argument("--max-connections", type=int, default=1000,
                   help="most open connections (uvicorn's limit_concurrency; default 1000)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a new connection has to send its request headers (default 10)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request has to send its body (default 30)")
    g.add_argument("--keep-alive", type=int, default=5,
                   help="seconds an idle kept-alive connection stays open (default 5)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    p.add_argument("--device", choices=["default", "cpu", "gpu"], default="default",
                   help="where the models run (default: MLX's default device). A GPU may compute "
                        "float32 matmuls in lower precision, which can flip a near-tie between a "
                        "batched and a solo call: cpu keeps seeded texts identical everywhere")
    return p


def check_args(args) -> list[str]:
    problems = []
    if args.k < 1:
        problems.append(f"--k {args.k}: the lookahead must be >= 1 (use --plain for K = 0)")
    if args.max_batch < 1:
        problems.append(f"--max-batch {args.max_batch}: must be >= 1")
    if args.context is not None and args.context < 2:
        problems.append(f"--context {args.context}: must be >= 2 tokens")
    if args.chat_max_tokens < 1:
        problems.append(f"--chat-max-tokens {args.chat_max_tokens}: must be >= 1")
    if not 0 <= args.port < 65536:
        problems.append(f"--port {args.port}: must be in [0, 65535]")
    if not args.plain and args.draft is not None and (args.target == TOY) != (args.draft == TOY):
        problems.append(f"{TOY!r} can only be paired with itself: got --target {args.target} --draft {args.draft}")
    for flag, value, low in (("--max-body-bytes", args.max_body_bytes, 64), ("--max-stop", args.max_stop, 0),
                             ("--max-stop-length", args.max_stop_length, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-connections", args.max_connections, 1), ("--keep-alive", args.keep_alive, 1)):
        if value < low:
            problems.append(f"{flag} {value}: must be >= {low}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        problems.append(f"--max-prompt-tokens {args.max_prompt_tokens}: must be >= 1")
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not value > 0:
            problems.append(f"{flag} {value}: must be > 0 seconds")
    if args.drafter not in SERVED_DRAFTERS and not args.plain:
        problems.append(f"--drafter {args.drafter}: the server drafts for every row of the batch "
                        f"in one call, and {args.drafter} drafts one sequence at a time; serve with "
                        f"--drafter {' | '.join(SERVED_DRAFTERS)}, or run `specdec generate|bench "
                        f"--drafter {args.drafter}` for single streams")
    if args.heads is not None and args.drafter not in ("medusa", "eagle"):
        problems.append(f"--heads {args.heads} with --drafter {args.drafter}: trained weights are "
                        "read by --drafter medusa or eagle")
    if args.skip_layers != "auto" and args.drafter != "layerskip":
        problems.append(f"--skip-layers {args.skip_layers} with --drafter {args.drafter}: layers are "
                        "skipped by --drafter layerskip")
    if args.api_key is not None and not args.api_key.strip():
        problems.append("--api-key is empty: give a key, or leave the flag out")
    return problems


def load(args):
    """(target, draft or None, TextCodec, context) for the flags."""
    from pathlib import Path

    from specdec.kit.loading import DEFAULT_DRAFT, DEFAULT_TARGET, load_model, load_pair
    from specdec.kit.models import model_vocab_size, tiny_llama_pair

    from .codec import CharTokenizer, TextCodec

    template = args.chat_template
    if template and len(template) < 4096 and Path(template).is_file():
        template = Path(template).read_text()
    if args.target == TOY:
        draft, target = tiny_llama_pair(seed=0)
        codec = TextCodec(CharTokenizer(model_vocab_size(target), template))
    elif args.plain or args.drafter != "model":  # no draft model to load
        target, tokenizer = load_model(args.target)
        draft, codec = None, TextCodec(tokenizer, template)
    else:
        draft_name = args.draft or (DEFAULT_DRAFT if args.target == DEFAULT_TARGET else None)
        if draft_name is None:
            raise ValueError(f"no --draft for --target {args.target}: pass a draft model that "
                             "shares its tokenizer, or use --plain")
        target, draft, tokenizer = load_pair(args.target, draft_name)
        codec = TextCodec(tokenizer, template)
    if args.plain:
        draft = None
    context = args.context or getattr(getattr(target, "args", None), "max_position_embeddings", None) or 2048
    return target, draft, codec, int(context)


def make_controller(impl, args):
    """The Week 4 Day 3 fallback controller, or None (--no-fallback, --plain, or not available)."""
    if args.no_fallback or args.plain:
        return None
    try:
        return impl.fallback.FallbackController(max_lookahead=args.k, initial_lookahead=args.k)
    except Exception as e:  # noqa: BLE001 — serve with a fixed K rather than not at all
        print(f"specdec serve: no fallback controller ({type(e).__name__}: {e}); fixed K = {args.k}",
              file=sys.stderr)
        return None


def allowed_hosts(args) -> Optional[set]:
    if args.allowed_hosts is not None:
        return {h.lower() for h in args.allowed_hosts} or None
    if args.host in ("0.0.0.0", "::", ""):
        return None
    hosts = {args.host.lower()}
    if args.host in LOCAL_HOSTS:
        hosts |= LOCAL_HOSTS
    return hosts


def guarded_protocol(max_connections: int, header_timeout_s: float):
    """uvicorn's h11 protocol, plus a header timeout and a cap on open connections.

    Past the cap, the oldest connection still waiting for its request headers is closed to make
    room (a flood of half-open connections cannot lock real clients out); only when every
    connection is busy with a request is the new one refused. The cap sits a little below
    uvicorn's `limit_concurrency`, so waiting connections never turn real requests into 503s.
    """
    from collections import OrderedDict

    from uvicorn.protocols.http.h11_impl import H11Protocol

    cap = max(1, max_connections - 8)
    waiting_for_headers: OrderedDict = OrderedDict()  # protocols without a request yet, oldest first

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            while len(self.connections) > cap and waiting_for_headers:
                oldest, _ = waiting_for_headers.popitem(last=False)
                if oldest.cycle is None and not oldest.transport.is_closing():
                    oldest.transport.close()
                    self.connections.discard(oldest)
            if len(self.connections) > cap:  # every other connection is serving a request
                transport.abort()
                return
            waiting_for_headers[self] = None
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            waiting_for_headers.pop(self, None)
            if self.cycle is None and not self.transport.is_closing():  # no request yet
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None:
                waiting_for_headers.pop(self, None)

        def connection_lost(self, exc) -> None:
            waiting_for_headers.pop(self, None)
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def raise_file_limit() -> None:
    """Use the hard limit on open files, so connections fail on our cap, not on EMFILE."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 16) if hard != resource.RLIM_INFINITY
                                                        else 1 << 16, hard))
    except (ImportError, ValueError, OSError):
        pass


def layerskip_draft(impl, target, skip_layers: str, codec):
    """(LayerSkipModel of the target, a line saying which layers it skips): Week 5 Day 4's
    skipped target is a draft model, so the batched scheduler drafts with it as with any other.
    ValueError (a DrafterError) for a bad --skip-layers."""
    from specdec.kit.cli.common import BUILTIN_PROMPTS
    from specdec.kit.drafter_registry import choose_skip

    text = "\n\n\n".join(BUILTIN_PROMPTS)
    try:
        calibration = codec.encode(text)[:128]
    except ValueError:  # a small vocabulary (toy-llama's): calibrate on the characters it has
        calibration = codec.encode(re.sub(r"[^A-Za-z0-9 .,:\n]", " ", text))[:128]
    skip = choose_skip(impl, target, skip_layers, calibration)
    model = impl.layerskip.LayerSkipModel(target, skip)
    return model, (f"drafter layerskip: skipping layers {list(model.skip)} of "
                   f"{len(model.skip) + len(model.kept)} (--skip-layers {skip_layers})")


def self_drafter(impl, target, args):
    """(make(**scheduler settings) -> a scheduler drafting by prompt lookup, with Medusa heads or
    with EAGLE, a line saying what was loaded). Weights load once; each scheduler gets its own
    adapter (`specdec.kit.self_serving`). ValueError (a DrafterError) when they do not fit."""
    from specdec.kit.drafter_registry import load_eagle_layer, load_medusa_heads, untrained_medusa_heads
    from specdec.kit.features import EAGLE_DRAFTER, MEDUSA_HEADS, FeatureModel
    from specdec.kit.self_serving import (EagleDraftModel, HeadsDraftModel, NgramDraftModel,
                                          self_draft_scheduler)

    Scheduler = self_draft_scheduler(impl.serving.Scheduler)
    if args.drafter == "ngram":
        find = impl.drafters.find_ngram_continuation
        return (lambda **settings: Scheduler(NgramDraftModel(target, find), **settings),
                "drafter ngram: prompt lookup in each row's text (n-grams of 3 down to 1 token)")
    if args.drafter == "medusa":
        if args.target == TOY and args.heads is None:
            heads, where = untrained_medusa_heads(impl, target), "untrained (toy-llama)"
        else:
            heads, where = load_medusa_heads(impl, target, args.heads), args.heads or MEDUSA_HEADS
        return (lambda **settings: Scheduler(HeadsDraftModel(heads, FeatureModel(target)), **settings),
                f"drafter medusa: {heads.num_heads} Medusa heads from {where}")
    layer = load_eagle_layer(impl, target, args.heads)
    return (lambda **settings: Scheduler(EagleDraftModel(layer, FeatureModel(target, layer.taps)), **settings),
            f"drafter eagle: the EAGLE drafter from {args.heads or EAGLE_DRAFTER}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    problems = check_args(args)
    if problems:
        for problem in problems:
            print(f"specdec serve: error: {problem}", file=sys.stderr)
        return 2
    import uvicorn

    from specdec.kit.impl import get_impl
    from specdec.kit.models import model_vocab_size

    from .api import Security, build_app
    from .engine import Engine
    from .metrics import Metrics
    from .validation import Limits, Validator

    impl = get_impl(args.impl, fallback=True)
    device = None
    if args.device != "default":
        import mlx.core as mx

        device = getattr(mx, args.device)
        mx.set_default_device(device)
    try:
        target, draft, codec, context = load(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"specdec serve: error: {e}", file=sys.stderr)
        return 2
    if args.drafter == "layerskip" and not args.plain:
        try:
            draft, note = layerskip_draft(impl, target, args.skip_layers, codec)
        except ValueError as e:
            print(f"specdec serve: error: {e}", file=sys.stderr)
            return 2
        print(f"specdec serve: {note}", file=sys.stderr, flush=True)
    self_draft = None
    if args.drafter in ("ngram", "medusa", "eagle") and not args.plain:
        try:
            self_draft, note = self_drafter(impl, target, args)
        except ValueError as e:
            print(f"specdec serve: error: {e}", file=sys.stderr)
            return 2
        print(f"specdec serve: {note}", file=sys.stderr, flush=True)
    name = args.served_model_name or args.target
    lookahead = 0 if args.plain else args.k

    def make_scheduler():
        settings = dict(lookahead=lookahead, max_batch=args.max_batch, eos_token_ids=codec.eos_token_ids,
                        decode=codec.decode, controller=make_controller(impl, args))
        if self_draft is not None:  # a fresh adapter (and its FeatureModel) per scheduler
            return self_draft(**settings)
        return impl.serving.Scheduler(target, draft, **settings)

    limits = Limits(args.max_body_bytes, args.max_prompt_tokens, args.max_stop, args.max_stop_length)
    metrics = Metrics()
    engine = Engine(make_scheduler, metrics, max_queue=args.max_queue, device=device)
    validator = Validator(codec, name, model_vocab_size(target), context, args.chat_max_tokens, limits)
    security = Security(args.api_key, allowed_hosts(args), list(args.allowed_origins))
    app = build_app(engine, validator, metrics, name, impl.serving.Request, security, args.body_timeout)
    raise_file_limit()
    engine.start()
    mode = "plain" if args.plain else f"K = {args.k}, drafter {args.drafter}" + ("" if args.no_fallback or draft is None else " with fallback")
    access = "API key required" if args.api_key else "no API key"
    print(f"specdec serve: {name} ({mode}, max batch {args.max_batch}, context {context}, "
          f"{impl.package}, {access}) on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"specdec serve: warning: listening on {args.host} without --api-key: anyone who can "
              "reach this port can use the model", file=sys.stderr, flush=True)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        http=guarded_protocol(args.max_connections, args.header_timeout),
        limit_concurrency=args.max_connections, timeout_keep_alive=args.keep_alive,
        h11_max_incomplete_event_size=64 * 1024, backlog=256)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop()
    return 0
