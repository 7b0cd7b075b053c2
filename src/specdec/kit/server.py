"""`specdec serve`: an OpenAI-compatible HTTP server over the Week 4 Day 4 scheduler (kit).

    python -m specdec.kit.server --port 8000                       # the embedded pair
    python -m specdec.kit.server --target toy-llama --port 8000    # random tiny llamas, 64 chars

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="tiny-code", prompt="def add(a, b):", max_tokens=32)

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template, or
--chat-template; 400 without one), GET /v1/models, GET /health, GET /metrics (Prometheus text).
`stream: true` answers with Server-Sent Events, one chunk per scheduler step that produced text.
Every response carries `usage` and a `speculative` object (the last chunk, when streaming).

One background thread owns the models and drives `Scheduler.step()` (the exercise: admission,
one batched round, eviction); the asyncio side only validates, tokenizes, queues requests and
turns the scheduler's events into responses. Bad input is a 4xx JSON error in OpenAI's shape,
naming the field (`error.param`); a request that fails inside the scheduler fails alone.
`--target toy-llama` serves `kit.models.tiny_llama_pair(seed=0)` with `CharTokenizer`: each of
its 64 token ids is one character, so text and tokens map one to one (the tests use it).
"""

import argparse
import asyncio
import json
import random
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Optional

TOY = "toy-llama"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# Toy tokenizer -----------------------------------------------------------------------------------
class CharTokenizer:
    """One character per token id, for the 64-token toy llamas (no EOS, no chat template unless
    one is given: a Jinja template over `messages`, as Hugging Face tokenizers use)."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:?!\n01234"  # 64

    def __init__(self, vocab_size: int = 64, chat_template: Optional[str] = None):
        if vocab_size > len(self.ALPHABET):
            raise ValueError(f"CharTokenizer has {len(self.ALPHABET)} characters, the model needs {vocab_size}")
        self.chars = self.ALPHABET[:vocab_size]
        self.ids = {c: i for i, c in enumerate(self.chars)}
        self.chat_template = chat_template
        self.eos_token_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        bad = sorted({c for c in text if c not in self.ids})
        if bad:
            raise ValueError(f"characters {''.join(bad)!r} are not in the toy vocabulary "
                             f"{self.chars!r}")
        return [self.ids[c] for c in text]

    def decode(self, tokens: list[int]) -> str:
        return "".join(self.chars[t] for t in tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        return jinja2.Template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)


class TextCodec:
    """encode / decode / chat for an mlx-lm tokenizer or a CharTokenizer, in one shape."""

    def __init__(self, tokenizer: Any, chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        ids = getattr(tokenizer, "eos_token_ids", None) or []
        self.eos_token_ids = sorted(int(i) for i in ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def chat(self, messages: list[dict]) -> list[int]:
        if isinstance(self.tokenizer, CharTokenizer):
            return self.encode(self.tokenizer.apply_chat_template(messages))
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        tokens = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        return list(tokens) if not isinstance(tokens, str) else self.encode(tokens)


# Errors ------------------------------------------------------------------------------------------
class APIError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}


# Request validation --------------------------------------------------------------------------------
@dataclass
class Parsed:
    prompt: list[int]
    max_tokens: int
    temperature: float
    seed: int
    stop: list[str]
    stream: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Validator:
    """Turns a JSON body into a `Parsed`, or raises APIError naming the field."""

    def __init__(self, codec: TextCodec, model_name: str, vocab_size: int, context: int,
                 chat_max_tokens: int):
        self.codec, self.model_name, self.vocab_size = codec, model_name, vocab_size
        self.context, self.chat_max_tokens = context, chat_max_tokens

    def common(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", "body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model is required: a string, e.g. "
                           f"{self.model_name!r} (see GET /v1/models)", "model")
        if model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist: this server serves "
                           f"{self.model_name!r} (see GET /v1/models)", "model", "not_found_error")
        for name, allowed in (("n", 1), ("best_of", 1), ("top_p", 1)):
            value = body.get(name)
            if value is not None and value != allowed:
                raise APIError(400, f"{name}={value!r} is not supported: leave it out or use {allowed}", name)

    def tokens_of(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty: send at least one character", "prompt")
            try:
                tokens = self.codec.encode(prompt)
            except ValueError as e:
                raise APIError(400, f"prompt cannot be tokenized: {e}", "prompt") from None
        elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
            tokens = list(prompt)
            bad = [t for t in tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"prompt has token ids outside [0, {self.vocab_size}): "
                               f"{bad[:5]}", "prompt")
        else:
            raise APIError(400, "prompt must be a string or a list of token ids (one prompt "
                           "per request)", "prompt")
        if not tokens:
            raise APIError(400, "prompt is empty: it must hold at least one token", "prompt")
        return tokens

    def options(self, body: dict, prompt: list[int], default_max: Optional[int]) -> Parsed:
        if len(prompt) >= self.context:
            raise APIError(400, f"prompt has {len(prompt)} tokens but the context is "
                           f"{self.context}: shorten the prompt", "prompt")
        room = self.context - len(prompt)
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None:
            max_tokens = min(default_max, room) if default_max else room
        if not _is_int(max_tokens) or max_tokens <= 0:
            raise APIError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
        if len(prompt) + max_tokens > self.context:
            raise APIError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) "
                           f"exceeds the context of {self.context} tokens: ask for at most "
                           f"{room}", "max_tokens")
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if not _is_number(temperature) or temperature < 0:
            raise APIError(400, f"temperature must be a number >= 0, got {temperature!r}", "temperature")
        seed = body.get("seed")
        if seed is None:
            seed = random.getrandbits(31)
        elif not _is_int(seed):
            raise APIError(400, f"seed must be an integer, got {seed!r}", "seed")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, f"stop must be a non-empty string or a list of at most 4, got {stop!r}", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
        return Parsed(prompt, max_tokens, float(temperature), seed % 2**63, stop, stream)

    def completion(self, body: Any) -> Parsed:
        self.common(body)
        if "prompt" not in body:
            raise APIError(400, "prompt is required", "prompt")
        return self.options(body, self.tokens_of(body["prompt"]), DEFAULT_MAX_TOKENS)

    def chat(self, body: Any) -> Parsed:
        self.common(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise APIError(400, "messages must be a non-empty list of {role, content} objects "
                           "with string content", "messages")
        if not self.codec.chat_template:
            raise APIError(400, f"model {self.model_name!r} has no chat template: use "
                           "/v1/completions, or start the server with --chat-template", "messages")
        try:
            tokens = self.codec.chat(messages)
        except Exception as e:  # noqa: BLE001 — a template that cannot render these messages
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
        if not tokens:
            raise APIError(400, "the chat template produced an empty prompt", "messages")
        if any(not 0 <= t < self.vocab_size for t in tokens):
            raise APIError(400, "the chat template produced token ids outside the vocabulary", "messages")
        return self.options(body, tokens, self.chat_max_tokens)


# Metrics ---------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus counters and gauges for everything served (names in vLLM's spirit)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: counters and gauges only
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specdec_requests", "finished requests by finish_reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("specdec_rejected_requests", "requests refused with a 4xx", registry=r)
        self.prompt_tokens = Counter("specdec_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("specdec_generation_tokens", "tokens generated", registry=r)
        self.num_drafts = Counter("specdec_spec_decode_num_drafts", "speculative row-rounds (K > 0)", registry=r)
        self.num_draft_tokens = Counter("specdec_spec_decode_num_draft_tokens", "draft tokens proposed", registry=r)
        self.num_accepted = Counter("specdec_spec_decode_num_accepted_tokens", "draft tokens accepted", registry=r)
        self.fallback_rounds = Counter("specdec_fallback_rounds", "row-rounds decoded plainly (K = 0)", registry=r)
        self.running = Gauge("specdec_num_requests_running", "rows in the running batch", registry=r)
        self.waiting = Gauge("specdec_num_requests_waiting", "requests waiting to join", registry=r)
        self.latency = Histogram("specdec_request_latency_seconds", "request latency", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def finished(self, request, seconds: float) -> None:
        s = request.stats
        self.requests.labels(request.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(request.prompt))
        self.generation_tokens.inc(len(request.output))
        self.num_drafts.inc(sum(1 for k in s.lookahead_per_round if k > 0))
        self.num_draft_tokens.inc(s.drafted)
        self.num_accepted.inc(s.accepted)
        self.fallback_rounds.inc(sum(1 for k in s.lookahead_per_round if k == 0))
        self.latency.observe(seconds)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def speculative_summary(request, lookahead: int) -> dict:
    s = request.stats
    return {
        "drafted": s.drafted,
        "accepted": s.accepted,
        "acceptance_rate": round(s.acceptance_rate, 4),
        "target_calls": s.rounds,
        "tokens_per_target_call": round(s.tokens_per_round, 4),
        "lookahead": lookahead,
        "fallback_rounds": sum(1 for k in s.lookahead_per_round if k == 0),
    }


# The engine: one thread drives the scheduler ---------------------------------------------------------
class Engine:
    """Owns the scheduler; `step()` runs in one background thread, events go back to asyncio."""

    def __init__(self, make_scheduler, metrics: Metrics):
        self.make_scheduler = make_scheduler
        self.scheduler = make_scheduler()
        self.metrics = metrics
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, float]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="specdec-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def submit(self, request) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.sinks[id(request)] = (loop, queue, time.perf_counter())
        try:
            self.scheduler.submit(request)  # a deque append: safe while step() runs
        except ValueError as e:
            del self.sinks[id(request)]
            raise APIError(400, str(e), None) from None
        self.wake.set()
        return queue

    def cancel(self, request) -> None:
        request.cancel()
        self.wake.set()

    def counts(self) -> tuple[int, int]:
        s = self.scheduler
        return len(s.rows), len(s.waiting)

    def deliver(self, event) -> None:
        request = event.request
        sink = self.sinks.get(id(request))
        if sink is None:
            return
        loop, queue, started = sink
        if event.finish_reason is not None:
            del self.sinks[id(request)]
            self.metrics.finished(request, time.perf_counter() - started)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutting down)
            pass

    def run(self) -> None:
        while not self.stopping:
            if not self.scheduler.has_work:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                with self.lock:
                    events = self.scheduler.step()
            except Exception as error:  # noqa: BLE001 — a bug in step: fail its rows, keep serving
                traceback.print_exc()
                events = self.reset(f"the scheduler failed: {type(error).__name__}: {error}")
            for event in events:
                self.deliver(event)
            rows, waiting = self.counts()
            self.metrics.running.set(rows)
            self.metrics.waiting.set(waiting)

    def reset(self, message: str) -> list:
        """Fail every running and waiting request with `message`; start a fresh scheduler."""
        old = self.scheduler
        events = []
        with self.lock:
            self.scheduler = self.make_scheduler()
            for request in list(old.rows) + list(old.waiting):
                events.append(old.finish(request, "error", message))
        return events


# The HTTP layer ----------------------------------------------------------------------------------------
def build_app(engine: Engine, validator: Validator, metrics: Metrics, model_name: str,
              lookahead: int, request_class):
    """The FastAPI app; `request_class` is the serving module's `Request`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="specdec serve", version="1")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        if error.status < 500:
            metrics.rejected.inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, error):
        return JSONResponse(APIError(400, str(error), "body").body(), status_code=400)

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", "body") from None

    @app.get("/health")
    async def health():
        rows, waiting = engine.counts()
        return {"status": "ok", "model": model_name, "running": rows, "waiting": waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "specdec"}]}

    @app.get("/metrics")
    async def prometheus():
        rows, waiting = engine.counts()
        metrics.running.set(rows)
        metrics.waiting.set(waiting)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def usage(request) -> dict:
        return {"prompt_tokens": len(request.prompt), "completion_tokens": len(request.output),
                "total_tokens": len(request.prompt) + len(request.output)}

    async def serve(http: Request, parsed: Parsed, chat: bool):
        request = request_class(parsed.prompt, max_tokens=parsed.max_tokens, temperature=parsed.temperature,
                      seed=parsed.seed, stop=tuple(parsed.stop),
                      request_id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24])
        queue = engine.submit(request)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": request.request_id, "created": int(time.time()), "model": model_name}

        def choice(text: str, finish: Optional[str], delta: bool) -> dict:
            if chat and delta:
                return {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish}
            if chat:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        def failure(event) -> APIError:
            return APIError(500, request.error or "the request failed", None, "server_error")

        if parsed.stream:
            async def chunks():
                done = False
                try:
                    while True:
                        event = await queue.get()
                        if event.finish_reason in ("error", "cancelled"):
                            yield f"data: {json.dumps(failure(event).body())}\n\n"
                            break
                        chunk = dict(head, object=kind + (".chunk" if chat else ""),
                                     choices=[choice(event.text, event.finish_reason, True)])
                        if event.finish_reason is not None:
                            chunk["usage"] = usage(request)
                            chunk["speculative"] = speculative_summary(request, lookahead)
                        if event.text or event.finish_reason is not None:
                            yield f"data: {json.dumps(chunk)}\n\n"
                        if event.finish_reason is not None:
                            break
                    done = True
                    yield "data: [DONE]\n\n"
                finally:
                    if not done or request.finish_reason is None:
                        engine.cancel(request)  # the client went away: free the row

            return StreamingResponse(chunks(), media_type="text/event-stream")

        text = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        engine.cancel(request)
                        return Response(status_code=499)
                    continue
                text.append(event.text)
                if event.finish_reason is not None:
                    break
        except asyncio.CancelledError:
            engine.cancel(request)
            raise
        if event.finish_reason in ("error", "cancelled"):
            raise failure(event)
        return dict(head, object=kind, choices=[choice("".join(text), event.finish_reason, False)],
                    usage=usage(request), speculative=speculative_summary(request, lookahead))

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await serve(http, validator.completion(await read_json(http)), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await serve(http, validator.chat(await read_json(http)), chat=True)

    return app


# Command line ------------------------------------------------------------------------------------------
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
    p.add_argument("--no-fallback", action="store_true",
                   help="fixed K every round (default: the Week 4 Day 3 fallback controller picks K)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (default 8)")
    p.add_argument("--context", type=int, default=None,
                   help="context length in tokens (default: the target's max_position_embeddings)")
    p.add_argument("--chat-max-tokens", type=int, default=256,
                   help="max_tokens of a chat request that sets none (default 256)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (string or file) for a tokenizer without one")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --target)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
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
    return problems


def load(args):
    """(target, draft or None, TextCodec, context) for the flags."""
    from pathlib import Path

    from specdec.kit.loading import DEFAULT_DRAFT, DEFAULT_TARGET, load_model, load_pair
    from specdec.kit.models import model_vocab_size, tiny_llama_pair

    template = args.chat_template
    if template and Path(template).is_file():
        template = Path(template).read_text()
    if args.target == TOY:
        draft, target = tiny_llama_pair(seed=0)
        codec = TextCodec(CharTokenizer(model_vocab_size(target), template))
    elif args.plain:
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


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problems = check_args(args)
    if problems:
        for problem in problems:
            print(f"specdec serve: error: {problem}", file=sys.stderr)
        return 2
    import uvicorn

    from specdec.kit.impl import get_impl
    from specdec.kit.models import model_vocab_size

    impl = get_impl(args.impl, fallback=True)
    try:
        target, draft, codec, context = load(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"specdec serve: error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or args.target
    lookahead = 0 if args.plain else args.k

    def make_scheduler():
        return impl.serving.Scheduler(
            target, draft, lookahead=lookahead, max_batch=args.max_batch,
            eos_token_ids=codec.eos_token_ids, decode=codec.decode,
            controller=make_controller(impl, args))

    metrics = Metrics()
    engine = Engine(make_scheduler, metrics)
    validator = Validator(codec, name, model_vocab_size(target), context, args.chat_max_tokens)
    app = build_app(engine, validator, metrics, name, lookahead, impl.serving.Request)
    engine.start()
    mode = "plain" if args.plain else f"K = {args.k}" + ("" if args.no_fallback or draft is None else " with fallback")
    print(f"specdec serve: {name} ({mode}, max batch {args.max_batch}, context {context}, "
          f"{impl.package}) on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
