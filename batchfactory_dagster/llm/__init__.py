"""LLM wire format: requests, responses, providers, prices, transports."""

from .models import make_request, request_body, request_key, response_from_completion
from .prices import BATCH_DISCOUNT, compute_cost, get_price, set_price
from .providers import (
    Provider,
    get_provider,
    list_providers,
    offline_mode,
    parse_model,
    register_provider,
)
from .synthetic import estimate_prompt_tokens, estimate_tokens, synthetic_completion
from .transport import CallFailure, LocalTransport, OpenAITransport, Transport

__all__ = [
    "BATCH_DISCOUNT", "CallFailure", "LocalTransport", "OpenAITransport", "Provider",
    "Transport", "compute_cost", "estimate_prompt_tokens", "estimate_tokens", "get_price",
    "get_provider", "list_providers", "make_request", "offline_mode", "parse_model",
    "register_provider", "request_body", "request_key", "response_from_completion", "set_price",
    "synthetic_completion",
]
