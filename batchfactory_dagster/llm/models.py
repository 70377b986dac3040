"""The wire format: requests as plain dicts with a content key, responses as plain dicts.

A request stored in an entry::

    {"model": "gpt-4o-mini@openai", "messages": [{"role": "user", "content": "..."}],
     "params": {"max_completion_tokens": 4096, "temperature": 0.7}, "sample": 0, "key": "<sha256>"}

``key`` hashes model, provider, messages, every parameter and the sample index, and nothing else
(no entry idx, no URL, no API key): the same prompt is the same job everywhere.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..core.hashing import content_hash
from .providers import offline_mode, parse_model

__all__ = [
    "GENERATION_PARAMS", "make_request", "request_body", "request_key", "response_from_completion",
]

# Parameters passed through to chat.completions; anything else is refused at build time.
GENERATION_PARAMS = frozenset({
    "max_completion_tokens", "max_tokens", "temperature", "top_p", "seed", "stop",
    "presence_penalty", "frequency_penalty", "logit_bias", "response_format", "reasoning_effort",
    "n", "tools", "tool_choice", "user", "logprobs", "top_logprobs", "service_tier", "verbosity",
})


def effective_model(model: str) -> str:
    """The model string the call really goes to: offline mode answers everything locally."""
    name, provider = parse_model(model)
    return f"{name}@local" if offline_mode() and provider != "local" else model


def request_key(model: str, messages: list[dict[str, Any]], params: dict[str, Any],
                sample: int = 0) -> str:
    name, provider = parse_model(model)
    return content_hash({"model": name, "provider": provider, "messages": messages,
                         "params": params, "sample": sample})


def make_request(model: str, messages: list[dict[str, Any]], params: dict[str, Any] | None = None,
                 sample: int = 0) -> dict[str, Any]:
    params = {k: v for k, v in (params or {}).items() if v is not None}
    # As the provider will see them: e.g. logit_bias={1234: -100} gets str keys, so that the
    # request can be recorded in the ledger (the key is unchanged: it hashes the same JSON).
    messages, params = orjson.loads(orjson.dumps([messages, params],
                                                 option=orjson.OPT_NON_STR_KEYS))
    model = effective_model(model)
    return {"model": model, "messages": messages, "params": params, "sample": sample,
            "key": request_key(model, messages, params, sample)}


def request_body(request: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for /v1/chat/completions."""
    name, _ = parse_model(request["model"])
    body = {"model": name, "messages": request["messages"], **request.get("params", {})}
    if request.get("sample"):
        # Distinct samples of one prompt: the sample index also reaches the provider as a seed
        # offset when the user fixed a seed, so answers differ where the provider honours it.
        body.setdefault("seed", 0)
        body["seed"] = int(body["seed"]) + int(request["sample"])
    return body


def response_from_completion(completion: dict[str, Any], request: dict[str, Any],
                             cost_usd: float | None) -> dict[str, Any]:
    """The stable part of a completion that goes into entries (no timing, no cache flag)."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    usage = completion.get("usage") or {}
    return {
        "key": request["key"],
        "model": completion.get("model") or parse_model(request["model"])[0],
        "provider": parse_model(request["model"])[1],
        "role": message.get("role", "assistant"),
        "content": message.get("content") or "",
        "finish_reason": choice.get("finish_reason"),
        "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                  "completion_tokens": int(usage.get("completion_tokens") or 0)},
        "cost_usd": cost_usd,
    }
