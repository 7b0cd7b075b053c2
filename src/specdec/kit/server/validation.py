"""Request validation for `specdec serve` (kit): raw bytes in, a `Parsed` request or an APIError.

Every field is honoured or refused with a 400 that names it; nothing is silently ignored.
Numbers must be finite and inside their range (JSON's NaN / Infinity, or 1e400, are refused by
name); a temperature too small to sample is greedy. `Validator.parse` runs in a worker thread
(JSON decoding and tokenizing a long prompt must not stall the event loop).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from specdec.kit.serving import TOP_LOGPROBS_MAX

from .codec import TextCodec

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
# Below this, softmax(z / T) is the argmax to float32 precision unless two logits are within
# ~1e-4 of each other, and z / T overflows float32 near T = 1e-37: such a request is greedy.
MIN_TEMPERATURE = 1e-5
SEED_BOUND = 2**63  # seeds are integers in [-2**63, 2**63)
COUPLED_SEED_BOUND = 2**32  # a seeded sampled request (the coupled rule) takes 0 <= seed < 2**32
COMPLETION_LOGPROBS_MAX = 5  # OpenAI's bound for /v1/completions' integer `logprobs`

# Fields that change nothing at their neutral value are accepted there and refused otherwise.
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
                 "stop", "seed", "user"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", "logprobs", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
CHAT_ROLES = {"system", "developer", "user", "assistant"}


class APIError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}


@dataclass
class Limits:
    """What one request may ask for (the server's flags; see the serving chapter for why)."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: Optional[int] = None  # None: the context - 1
    max_stop: int = 4
    max_stop_length: int = 64


@dataclass
class Parsed:
    prompt: list[int]
    max_tokens: int
    temperature: float
    seed: int
    stop: list[str]
    stream: bool
    top_p: float = 1.0
    logprobs: Optional[int] = None  # None, or how many alternatives per token
    echo: bool = False
    seeded: bool = False  # the client gave the seed
    chat: bool = False
    extra: dict = field(default_factory=dict)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(name: str, value: Any, low: float, high: float, what: str) -> float:
    if not _is_number(value) or not math.isfinite(float(value)) or not low <= value <= high:
        raise APIError(400, f"{name} must be a finite number in {what}, got {value!r}", name)
    return float(value)


def decode_json(raw: bytes) -> Any:
    """The body as JSON, or a 400 naming `body` (bad UTF-8 or syntax, nesting too deep, a
    number with too many digits, a string holding a lone surrogate)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", "body") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an int of > 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", "body") from None
    if isinstance(body, dict):
        for name, value in body.items():
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{name} holds a lone UTF-16 surrogate (\\ud800-\\udfff without "
                               "its pair): send valid Unicode", str(name)) from None
            except (RecursionError, ValueError):
                raise APIError(400, f"{name} is nested too deeply", str(name)) from None
    return body


class Validator:
    """Turns a JSON body into a `Parsed`, or raises APIError naming the field."""

    def __init__(self, codec: TextCodec, model_name: str, vocab_size: int, context: int,
                 chat_max_tokens: int, limits: Optional[Limits] = None):
        self.codec, self.model_name, self.vocab_size = codec, model_name, vocab_size
        self.context, self.chat_max_tokens = context, chat_max_tokens
        self.limits = limits or Limits()
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or context - 1, context - 1)

    def parse(self, raw: bytes, chat: bool) -> Parsed:
        """Decode, validate and tokenize one request body (run it off the event loop)."""
        body = decode_json(raw)
        return self.chat(body) if chat else self.completion(body)

    def common(self, body: Any, allowed: set) -> None:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", "body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model is required: a string, e.g. "
                           f"{self.model_name!r} (see GET /v1/models)", "model")
        if model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist: this server serves "
                           f"{self.model_name!r} (see GET /v1/models)", "model", "not_found_error")
        for name in sorted(set(body) - allowed):
            value = body[name]
            if value is None or (name in NEUTRAL and _is_number(value) and value == NEUTRAL[name]):
                continue
            raise APIError(400, f"{name} is not supported by specdec serve: leave it out (it "
                           "would otherwise be silently ignored)", str(name))
        for name, allowed_value in (("n", 1), ("best_of", 1)):
            value = body.get(name)
            if value is not None and (not _is_int(value) or value != allowed_value):
                raise APIError(400, f"{name}={value!r} is not supported: leave it out or use "
                               f"{allowed_value}", name)
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise APIError(400, f"user must be a string, got {user!r}", "user")
        options = body.get("stream_options")
        if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                        and isinstance(options.get("include_usage", True), bool)):
            raise APIError(400, "stream_options may only hold include_usage (true or false); usage "
                           "always comes in the last chunk", "stream_options")

    def tokens_of(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty: send at least one character", "prompt")
            try:
                tokens = self.codec.encode(prompt)
            except Exception as e:  # noqa: BLE001 — any tokenizer failure is the prompt's fault
                raise APIError(400, f"prompt cannot be tokenized: {str(e)[:200]}", "prompt") from None
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
        if len(prompt) > self.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(prompt)} tokens, more than this server's limit of "
                           f"{self.max_prompt_tokens} (context {self.context}): shorten the prompt",
                           "prompt")
        room = self.context - len(prompt)
        name = "max_tokens" if "max_tokens" in body else "max_completion_tokens"
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None:
            max_tokens = min(default_max, room) if default_max else room
        if not _is_int(max_tokens) or max_tokens <= 0:
            raise APIError(400, f"{name} must be an integer >= 1, got {max_tokens!r}"[:300], name)
        if len(prompt) + max_tokens > self.context:
            raise APIError(400, f"prompt ({len(prompt)} tokens) + {name} ({max_tokens}) "
                           f"exceeds the context of {self.context} tokens: ask for at most "
                           f"{room}"[:400], name)
        temperature = body.get("temperature", 1.0)
        temperature = 1.0 if temperature is None else _finite(
            "temperature", temperature, 0.0, MAX_TEMPERATURE, f"[0, {MAX_TEMPERATURE:g}]")
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0  # too small to sample: greedy
        top_p = body.get("top_p", 1.0)
        top_p = 1.0 if top_p is None else _finite("top_p", top_p, 0.0, 1.0, "(0, 1]")
        if top_p <= 0:
            raise APIError(400, f"top_p must be a finite number in (0, 1], got {top_p!r}", "top_p")
        seed = body.get("seed")
        seeded = seed is not None
        if seed is None:
            seed = random.getrandbits(31)
        elif not _is_int(seed) or not -SEED_BOUND <= seed < SEED_BOUND:
            raise APIError(400, f"seed must be an integer in [-2**63, 2**63), got {seed!r}"[:300], "seed")
        elif temperature > 0 and not 0 <= seed < COUPLED_SEED_BOUND:
            raise APIError(400, f"seed {seed} is out of range: a seeded sampled request uses the coupled "
                           "rule (the text of plain seeded decoding), whose noise is keyed by seed and "
                           "position; pick 0 <= seed < 2**32", "seed")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        limits = self.limits
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "stop must be a non-empty string or a list of non-empty strings, "
                           f"got {stop!r}"[:300], "stop")
        if len(stop) > limits.max_stop:
            raise APIError(400, f"stop has {len(stop)} strings: at most {limits.max_stop}", "stop")
        long = [s for s in stop if len(s) > limits.max_stop_length]
        if long:
            raise APIError(400, f"stop strings may be at most {limits.max_stop_length} characters; "
                           f"one has {len(long[0])}", "stop")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise APIError(400, f"stream must be true or false, got {stream!r}"[:300], "stream")
        return Parsed(prompt, max_tokens, temperature, seed % SEED_BOUND, stop, stream, top_p,
                      seeded=seeded)

    def completion(self, body: Any) -> Parsed:
        self.common(body, COMPLETION_FIELDS)
        if "prompt" not in body:
            raise APIError(400, "prompt is required", "prompt")
        parsed = self.options(body, self.tokens_of(body["prompt"]), DEFAULT_MAX_TOKENS)
        logprobs = body.get("logprobs")
        if logprobs is not None and (not _is_int(logprobs)
                                     or not 0 <= logprobs <= COMPLETION_LOGPROBS_MAX):
            raise APIError(400, f"logprobs must be an integer in [0, {COMPLETION_LOGPROBS_MAX}] (how "
                           f"many alternatives per token), got {logprobs!r}"[:300], "logprobs")
        echo = body.get("echo", False)
        if echo is None:
            echo = False
        if not isinstance(echo, bool):
            raise APIError(400, f"echo must be true or false, got {echo!r}"[:300], "echo")
        if echo and logprobs is not None:
            raise APIError(400, "echo with logprobs would need the prompt's log-probabilities, which "
                           "this server does not compute: drop one of them", "echo")
        parsed.logprobs, parsed.echo = logprobs, echo
        return parsed

    def messages_of(self, messages: Any) -> list[dict]:
        problem = "messages must be a non-empty list of {role, content} objects"
        if not isinstance(messages, list) or not messages:
            raise APIError(400, problem, "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise APIError(400, f"{problem}; messages[{i}] has no role in "
                               f"{sorted(CHAT_ROLES)}", "messages")
            extra = set(m) - {"role", "content", "name"}
            if extra:
                raise APIError(400, f"messages[{i}] has {sorted(extra)}: only role, content and name "
                               "are supported (no tools)", "messages")
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) for p in content):
                    raise APIError(400, f"messages[{i}].content: only parts of type text "
                                   "({\"type\": \"text\", \"text\": ...}) are supported", "messages")
                content = "\n".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(400, f"{problem}; messages[{i}].content must be a string or a list "
                               "of text parts", "messages")
            out.append({"role": m["role"], "content": content})
        return out

    def chat(self, body: Any) -> Parsed:
        self.common(body, CHAT_FIELDS)
        messages = self.messages_of(body.get("messages"))
        if not self.codec.chat_template:
            raise APIError(400, f"model {self.model_name!r} has no chat template: use "
                           "/v1/completions, or start the server with --chat-template", "messages")
        try:
            tokens = self.codec.chat(messages)
        except Exception as e:  # noqa: BLE001 — a template that cannot render these messages
            raise APIError(400, f"the chat template failed on these messages: {str(e)[:200]}",
                           "messages") from None
        if not tokens:
            raise APIError(400, "the chat template produced an empty prompt", "messages")
        if any(not 0 <= t < self.vocab_size for t in tokens):
            raise APIError(400, "the chat template produced token ids outside the vocabulary", "messages")
        parsed = self.options(body, tokens, self.chat_max_tokens)
        logprobs, top = body.get("logprobs"), body.get("top_logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise APIError(400, f"logprobs must be true or false in chat, got {logprobs!r}"[:300],
                           "logprobs")
        if top is not None:
            if not _is_int(top) or not 0 <= top <= TOP_LOGPROBS_MAX:
                raise APIError(400, f"top_logprobs must be an integer in [0, {TOP_LOGPROBS_MAX}], "
                               f"got {top!r}"[:300], "top_logprobs")
            if not logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        parsed.logprobs = (top or 0) if logprobs else None
        parsed.chat = True
        return parsed
