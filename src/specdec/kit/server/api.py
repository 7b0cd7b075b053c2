"""The HTTP API of `specdec serve` (kit): OpenAI-shaped routes, and the guard in front of them.

`Guard` (pure ASGI, before any route reads a byte of the body): the Host header must name this
server (a DNS-rebinding page cannot read responses), every route but /health needs the API key
when one is set (`Authorization: Bearer ...`), a POST must be `application/json` (415 otherwise:
a web page cannot send JSON cross-origin without a CORS preflight, which fails unless
--allowed-origins names it), and a declared body larger than the limit is a 413 at once.
Routes read the body in chunks (413 as soon as it outgrows the limit, 408 when it is too slow),
then decode, validate and tokenize it in a worker thread. Anything unexpected is a JSON 500,
counted in /metrics; a client that goes away cancels its request at once, streaming or not.
"""


import asyncio
import hmac
import json
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from specdec.kit.serving import COUPLED, REJECTION

from .engine import Engine
from .metrics import Metrics, speculative_summary
from .validation import APIError, Limits, Parsed, Validator

OPEN_PATHS = {"/health"}  # answered without the API key (load balancers probe it)


@dataclass
class Security:
    api_key: Optional[str] = None
    allowed_hosts: Optional[set] = None  # None: any Host header (the server was bound to all)
    allowed_origins: list = field(default_factory=list)


async def send_json(send, status: int, body: dict, headers: Optional[dict] = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def host_name(host: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """Host, API key, content type and declared size checks, and JSON 500s (pure ASGI)."""

    def __init__(self, app, security: Security, limits: Limits, metrics: Metrics):
        self.app, self.security, self.limits, self.metrics = app, security, limits, metrics

    def check(self, scope) -> Optional[APIError]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        s = self.security
        if s.allowed_hosts is not None and host_name(headers.get("host", "")) not in s.allowed_hosts:
            return APIError(400, f"Host header {headers.get('host', '')[:100]!r} is not this server's: "
                            "allowed are " + ", ".join(sorted(s.allowed_hosts)) + " (--allowed-hosts)",
                            "host")
        if s.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                    s.api_key.encode()):
                return APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                "authorization", "authentication_error",
                                headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return APIError(415, f"the body must be JSON (Content-Type: application/json), got "
                                f"{kind[:100]!r}", "content-type")
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    return APIError(400, "Content-Length is not a number", "content-length")
                if int(length) > self.limits.max_body_bytes:
                    return APIError(413, f"the body has {int(length)} bytes, more than this server's "
                                    f"limit of {self.limits.max_body_bytes} (--max-body-bytes)", "body")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.check(scope)
        if problem is not None:
            self.metrics.rejected.labels(str(problem.status)).inc()
            return await send_json(send, problem.status, problem.body(), problem.headers)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as error:  # noqa: BLE001 — already answered (and counted) if started
            if not started:
                self.metrics.failed.inc()
                await send_json(send, 500, internal_error(error).body())
            print(f"specdec serve: {type(error).__name__} in {scope['path']}: {str(error)[:200]}",
                  file=sys.stderr)


def internal_error(error: BaseException) -> APIError:
    return APIError(500, f"internal error ({type(error).__name__}): the server failed on this "
                    "request; it keeps serving others", None, "server_error")


class Disconnected(Exception):
    """The client closed its connection."""


async def wait_disconnect(http) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(engine: Engine, validator: Validator, metrics: Metrics, model_name: str,
              request_class, security: Optional[Security] = None, body_timeout_s: float = 30.0):
    """The ASGI app: FastAPI routes behind `Guard` (and CORS when origins are allowed).
    `request_class` is the serving module's `Request`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    security = security or Security()
    limits = validator.limits
    codec = validator.codec
    app = FastAPI(title="specdec serve", version="1")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        if error.status < 500:
            metrics.rejected.labels(str(error.status)).inc()
        else:
            metrics.failed.inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, error):
        metrics.rejected.labels("400").inc()
        return JSONResponse(APIError(400, str(error)[:300], "body").body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_, error: Exception):
        traceback.print_exception(error, limit=3)
        metrics.failed.inc()
        return JSONResponse(internal_error(error).body(), status_code=500)

    async def read_body(http: Request) -> bytes:
        async def chunks() -> bytes:
            data, size = [], 0
            async for chunk in http.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise APIError(413, f"the body is larger than this server's limit of "
                                   f"{limits.max_body_bytes} bytes (--max-body-bytes)", "body")
                data.append(chunk)
            return b"".join(data)

        try:
            return await asyncio.wait_for(chunks(), body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the body did not arrive within {body_timeout_s:g} s", "body") from None

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

    def logprobs_of(request, start: int, end: int, chat: bool, offset: int = 0) -> Optional[dict]:
        """OpenAI's logprobs object for output tokens [start, end)."""
        if request.logprobs is None:
            return None
        ids = request.output[start:end]
        lps = request.token_logprobs[start:end]
        tops = request.top_logprobs[start:end]
        texts = [codec.decode([t]) for t in ids]
        if chat:
            def entry(text: str, lp: float) -> dict:
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace"))}

            return {"content": [dict(entry(t, lp), top_logprobs=[entry(codec.decode([i]), v)
                                                                 for i, v in top.items()])
                                for t, lp, top in zip(texts, lps, tops)]}
        offsets, at = [], offset
        for t in texts:
            offsets.append(at)
            at += len(t)
        return {"tokens": texts, "token_logprobs": lps,
                "top_logprobs": [{codec.decode([i]): v for i, v in top.items()} for top in tops],
                "text_offset": offsets}

    def tokens_behind(request, text_len: int) -> int:
        """How many output tokens the returned text came from (EOS and what a stop string cut
        are not reported)."""
        out = request.output
        n = len(out) - (1 if out and out[-1] in engine.scheduler.eos_token_ids else 0)
        if len(codec.decode(out[:n])) <= text_len:
            return n
        lo, hi = 0, n  # the fewest tokens whose text covers text_len characters
        while lo < hi:
            mid = (lo + hi) // 2
            if len(codec.decode(out[:mid])) >= text_len:
                hi = mid
            else:
                lo = mid + 1
        return lo

    async def serve(http: Request, parsed: Parsed):
        chat = parsed.chat
        request = request_class(
            parsed.prompt, max_tokens=parsed.max_tokens, temperature=parsed.temperature,
            seed=parsed.seed, stop=tuple(parsed.stop), top_p=parsed.top_p, logprobs=parsed.logprobs,
            # A client's seed at temperature > 0 means a text: the coupled rule (Week 5 Day 1)
            # gives plain seeded decoding's tokens whatever K, the drafts or the batch-mates.
            sampling=COUPLED if parsed.seeded and parsed.temperature > 0 else REJECTION,
            request_id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24])
        queue = engine.submit(request)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": request.request_id, "created": int(time.time()), "model": model_name}
        prefix = codec.decode(parsed.prompt) if parsed.echo else ""
        watcher = asyncio.ensure_future(wait_disconnect(http))

        async def next_event():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                raise Disconnected()
            return getter.result()

        def choice(text: str, finish: Optional[str], delta: bool, logprobs: Optional[dict]) -> dict:
            if chat:
                body = {"role": "assistant", "content": text}
                return {"index": 0, ("delta" if delta else "message"): body, "logprobs": logprobs,
                        "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}

        def failure() -> dict:
            if request.finish_reason == "cancelled":
                return APIError(499, "the request was cancelled", None, "cancelled").body()
            return APIError(500, request.error or "the request failed", None, "server_error").body()

        if parsed.stream:
            async def chunks():
                sent_tokens, sent_chars = 0, len(prefix)
                try:
                    if prefix:  # echo: the prompt comes first
                        first = dict(head, object=kind, choices=[choice(prefix, None, True, None)])
                        yield f"data: {json.dumps(first)}\n\n"
                    while True:
                        event = await next_event()
                        if event.finish_reason in ("error", "cancelled"):
                            if event.finish_reason == "error":
                                metrics.failed.inc()
                            yield f"data: {json.dumps(failure())}\n\n"
                            break
                        end = sent_tokens + len(event.tokens)
                        if event.tokens and event.tokens[-1] in engine.scheduler.eos_token_ids:
                            end -= 1
                        logprobs = logprobs_of(request, sent_tokens, end, chat, sent_chars)
                        sent_tokens, sent_chars = sent_tokens + len(event.tokens), sent_chars + len(event.text)
                        chunk = dict(head, object=kind + (".chunk" if chat else ""),
                                     choices=[choice(event.text, event.finish_reason, True, logprobs)])
                        if event.finish_reason is not None:
                            chunk["usage"] = usage(request)
                            chunk["speculative"] = speculative_summary(request)
                        if event.text or event.finish_reason is not None:
                            yield f"data: {json.dumps(chunk)}\n\n"
                        if event.finish_reason is not None:
                            break
                    yield "data: [DONE]\n\n"
                except Disconnected:
                    return
                finally:
                    watcher.cancel()
                    engine.cancel(request)  # a no-op when it finished; else the client went away

            return StreamingResponse(chunks(), media_type="text/event-stream")

        text = []
        try:
            while True:
                event = await next_event()
                text.append(event.text)
                if event.finish_reason is not None:
                    break
        except Disconnected:
            return Response(status_code=499)
        finally:
            watcher.cancel()
            engine.cancel(request)  # a no-op when it finished; else the client went away
        if event.finish_reason in ("error", "cancelled"):
            body = failure()
            if event.finish_reason == "error":
                metrics.failed.inc()
            return JSONResponse(body, status_code=500 if event.finish_reason == "error" else 499)
        text = "".join(text)
        logprobs = logprobs_of(request, 0, tokens_behind(request, len(text)), chat, len(prefix))
        return dict(head, object=kind, choices=[choice(prefix + text, event.finish_reason, False, logprobs)],
                    usage=usage(request), speculative=speculative_summary(request))

    async def parse(http: Request, chat: bool) -> Parsed:
        raw = await read_body(http)
        return await asyncio.to_thread(validator.parse, raw, chat)  # off the event loop

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await serve(http, await parse(http, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await serve(http, await parse(http, chat=True))

    guarded: Any = Guard(app, security, limits, metrics)
    if security.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        guarded = CORSMiddleware(guarded, allow_origins=list(security.allowed_origins),
                                 allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type"])
    return guarded
