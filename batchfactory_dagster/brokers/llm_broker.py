"""ConcurrentLLMCallBroker: every distinct prompt paid for once, at the provider's pace."""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any

from ..llm.models import request_body, response_from_completion
from ..llm.prices import compute_cost, get_price
from ..llm.providers import get_provider, parse_model
from ..llm.synthetic import estimate_prompt_tokens
from ..llm.transport import (
    MALFORMED,
    CallFailure,
    LocalTransport,
    OpenAITransport,
    Transport,
    check_completion,
)
from ._loop import LoopThread
from .base import ImmediateBroker, JobFailure

__all__ = ["ConcurrentLLMCallBroker", "Pacer", "estimate_request_cost"]

DEFAULT_OUTPUT_ESTIMATE = 512  # tokens assumed per answer when reserving tokens-per-minute


class Pacer:
    """Spaces events so that no 60-second window holds more than ``per_minute`` units.

    Strict pacing rather than a burst bucket: a burst of a full minute's budget followed by the
    refill would put up to twice the limit into one sliding minute, which providers reject.
    """

    def __init__(self, per_minute: float) -> None:
        self.interval = 60.0 / per_minute * 1.001  # a hair slower: float error must not exceed
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def take(self, units: float = 1.0) -> None:
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + units * self.interval
        if start > now:
            await asyncio.sleep(start - now)

    def refund(self, units: float) -> None:
        """Give back (or charge, if negative) units once the real usage is known."""
        self._next -= units * self.interval


class ConcurrentLLMCallBroker(ImmediateBroker):
    """Sends chat completions concurrently, caching every answer by the hash of its request.

    Args:
        cache_path: the ledger file (JSONL); None keeps answers in memory only.
        concurrency: requests in flight at once.
        rpm / tpm: requests and tokens per minute (None: unlimited). Tokens are estimated
            offline before a call and corrected with the usage each answer reports.
        max_attempts: attempts per request for transient errors (429, 5xx, timeouts, resets).
        timeout: seconds to wait for one answer.
        cooldown: seconds every request waits after a 429 without a Retry-After.
        api_keys: keys per provider name, overriding their environment variables.
        transport: the seam for OpenAI-compatible providers (default: the openai client).
    """

    def __init__(self, cache_path: str | None = None, concurrency: int = 64,
                 rpm: float | None = None, tpm: float | None = None, max_attempts: int = 5,
                 timeout: float = 120.0, *, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 cooldown: float = 1.0, allow_truncated: bool = False,
                 transport: Transport | None = None, local_transport: Transport | None = None,
                 api_keys: dict[str, str] | None = None, **legacy: Any) -> None:
        concurrency = int(legacy.pop("concurrency_limit", concurrency))
        rpm = legacy.pop("rate_limit", None) * 60 if "rate_limit" in legacy else rpm
        legacy.pop("max_number_per_batch", None)
        if legacy:
            raise TypeError(f"unknown arguments: {sorted(legacy)}")
        for name, value in (("rpm", rpm), ("tpm", tpm), ("timeout", timeout)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not value > 0):
                unset = " (None for no limit)" if name != "timeout" else ""
                raise ValueError(f"ConcurrentLLMCallBroker: {name} must be a number > 0"
                                 f"{unset}, got {value!r}")
        super().__init__(cache_path, concurrency=concurrency, max_attempts=max_attempts,
                         backoff_base=backoff_base, backoff_max=backoff_max)
        self.rpm, self.tpm, self.timeout = rpm, tpm, timeout
        self.cooldown, self.allow_truncated = cooldown, allow_truncated
        self.transport = transport or OpenAITransport()
        self.local_transport = local_transport or LocalTransport()
        self._api_keys = dict(api_keys or {})  # provider -> key; never in repr or ledger
        self._pacers: dict[str, Pacer] | None = None
        self._cooldown_until = 0.0
        # The README never calls close(): when the broker is dropped, or at exit, its HTTP
        # sessions are closed and its loop thread stopped anyway (no "Unclosed client session",
        # no idle thread left per discarded broker).
        self._finalizer = weakref.finalize(self, _release, self._loop, self.transport)

    def _limits(self) -> dict[str, Pacer]:
        # Created lazily on the broker's loop: asyncio primitives belong to one loop.
        if self._pacers is None:
            self._pacers = {}
            if self.rpm:
                self._pacers["rpm"] = Pacer(self.rpm)
            if self.tpm:
                self._pacers["tpm"] = Pacer(self.tpm)
        return self._pacers

    async def before_attempt(self, request: dict[str, Any]) -> None:
        wait = self._cooldown_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        limits = self._limits()
        if "rpm" in limits:
            await limits["rpm"].take(1)
        if "tpm" in limits:
            await limits["tpm"].take(self.estimate_tokens(request))

    def after_failure(self, failure: JobFailure) -> None:
        if failure.kind == "rate_limit":
            pause = failure.retry_after if failure.retry_after is not None else self.cooldown
            self._cooldown_until = max(self._cooldown_until, time.monotonic() + pause)

    @staticmethod
    def estimate_tokens(request: dict[str, Any]) -> int:
        params = request.get("params", {})
        out = params.get("max_completion_tokens") or params.get("max_tokens")
        out = min(int(out), DEFAULT_OUTPUT_ESTIMATE) if out else DEFAULT_OUTPUT_ESTIMATE
        return estimate_prompt_tokens(request["messages"]) + out

    def estimate_cost(self, request: dict[str, Any]) -> float | None:
        return estimate_request_cost(request)

    def dispatch(self, jobs: dict[str, dict[str, Any]], stats: Any, progress: bool,
                 retry_malformed: bool) -> Any:
        # Fail before the first call, not in the middle of it, when a key is missing.
        for provider in {parse_model(r["model"])[1] for r in jobs.values()}:
            if provider not in self._api_keys:
                get_provider(provider).api_key()
        return super().dispatch(jobs, stats, progress, retry_malformed)

    async def call(self, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int], float | None]:
        name, provider_name = parse_model(request["model"])
        provider = get_provider(provider_name)
        transport = self.local_transport if provider.offline else self.transport
        try:
            completion = await transport.complete(provider, request_body(request), self.timeout,
                                                  self._api_keys.get(provider_name))
            completion = check_completion(completion, self.allow_truncated)
        except CallFailure as exc:
            usage = _usage(exc.usage)
            cost = compute_cost(request["model"], **usage) if exc.usage else None
            self._correct_tpm(request, usage)
            raise JobFailure(exc.kind, str(exc), transient=exc.transient,
                             retry_after=exc.retry_after, usage=exc.usage and usage,
                             cost_usd=cost, malformed=exc.kind in MALFORMED) from exc
        usage = _usage(completion.get("usage"))
        self._correct_tpm(request, usage)
        cost = compute_cost(request["model"], **usage)
        return response_from_completion(completion, request, cost), usage, cost

    def _correct_tpm(self, request: dict[str, Any], usage: dict[str, int]) -> None:
        pacer = (self._pacers or {}).get("tpm")
        if pacer is not None and usage["prompt_tokens"] + usage["completion_tokens"]:
            pacer.refund(self.estimate_tokens(request) - sum(usage.values()))

    def close(self) -> None:
        self._finalizer()  # closes the transport on the loop, then stops the loop
        self._pacers = None
        super().close()
        # Usable again after close() (the loop and clients are made lazily): re-arm.
        self._finalizer = weakref.finalize(self, _release, self._loop, self.transport)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_finalizer", None)
        state["_pacers"] = None  # asyncio locks belong to this process's loop
        # Keys never travel in a pickle: the receiving process reads them from its own
        # environment (or its Dagster resource) again.
        state["_api_keys"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._finalizer = weakref.finalize(self, _release, self._loop, self.transport)

    def __repr__(self) -> str:
        return (f"ConcurrentLLMCallBroker(cache_path={self.cache_path!r}, "
                f"concurrency={self.concurrency}, rpm={self.rpm}, tpm={self.tpm})")


def _release(loop: LoopThread, transport: Transport) -> None:
    """Close the transport's sessions on the broker's loop, then stop that loop (best effort:
    this also runs from the garbage collector and at interpreter exit)."""
    if loop._loop is not None and not loop._loop.is_closed():
        try:
            loop.run(transport.aclose())
        except Exception:  # the loop is going away; nothing left to save
            pass
    try:
        loop.close()
    except RuntimeError:  # collected on the loop's own thread: it cannot join itself
        pass


def estimate_request_cost(request: dict[str, Any], discount: float = 1.0) -> float | None:
    """Rough cost of a request not yet sent: its prompt estimated offline, the answer at
    ``max_completion_tokens`` capped at DEFAULT_OUTPUT_ESTIMATE; None without a price."""
    price = get_price(request["model"])
    if price is None:
        return None
    prompt = estimate_prompt_tokens(request["messages"])
    out = ConcurrentLLMCallBroker.estimate_tokens(request) - prompt
    return (prompt * price[0] + out * price[1]) / 1e6 * discount


def _usage(raw: dict[str, Any] | None) -> dict[str, int]:
    raw = raw or {}
    return {"prompt_tokens": int(raw.get("prompt_tokens") or 0),
            "completion_tokens": int(raw.get("completion_tokens") or 0)}
