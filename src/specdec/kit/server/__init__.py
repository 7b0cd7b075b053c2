"""`specdec serve`: an OpenAI-compatible HTTP server over the Week 4 Day 5 scheduler (kit).

    python -m specdec.kit.server --port 8000                       # the embedded pair
    python -m specdec.kit.server --target toy-llama --port 8000    # random tiny llamas, 64 chars
    SPECDEC_API_KEY=secret python -m specdec.kit.server --port 8000  # or --api-key secret

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.completions.create(model="tiny-code", prompt="def add(a, b):", max_tokens=32)

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template, or
--chat-template; 400 without one), GET /v1/models, GET /health, GET /metrics (Prometheus text).
`stream: true` answers with Server-Sent Events, one chunk per scheduler step that produced text.
Every response carries `usage` and a `speculative` object (the last chunk, when streaming);
its `sampling` says which rule ran: "greedy" (temperature 0), "coupled" (a request that gives
its `seed`: exactly the text of plain seeded decoding, `coupling.seeded_generate`, whatever K,
the controller or the batch-mates) or "rejection" (no seed: exact rejection sampling, which
accepts more drafts).

The package, by concern: `codec` (tokenizers), `validation` (bytes -> a checked request, or a
400 naming the field), `engine` (one background thread drives `Scheduler.step()`), `metrics`
(Prometheus, the `speculative` object), `api` (routes, and the guard in front of them: Host,
API key, content type, body size), `startup` (flags, models, uvicorn and its connection limits).
`--target toy-llama` serves `kit.models.tiny_llama_pair(seed=0)` with `CharTokenizer`: each of
its 64 token ids is one character, so text and tokens map one to one (the tests use it).
"""

from .api import Guard, Security, build_app
from .codec import CharTokenizer, TextCodec
from .engine import Engine
from .metrics import Metrics, speculative_summary
from .startup import TOY, build_parser, check_args, load, main, make_controller
from .validation import DEFAULT_MAX_TOKENS, APIError, Limits, Parsed, Validator

__all__ = ["APIError", "CharTokenizer", "DEFAULT_MAX_TOKENS", "Engine", "Guard", "Limits", "Metrics",
           "Parsed", "Security", "TOY", "TextCodec", "Validator", "build_app", "build_parser",
           "check_args", "load", "main", "make_controller", "speculative_summary"]
