"""The one seam every LLM request crosses: a Transport turns a request body into a completion.

``OpenAITransport`` uses the official async client on its aiohttp transport with the SDK's own
retries off (the broker retries); ``LocalTransport`` answers in-process with labelled synthetic
text. Both report failures as :class:`CallFailure` with a kind the broker's retry policy reads.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

import orjson

from .providers import Provider
from .synthetic import synthetic_completion

__all__ = ["CallFailure", "LocalTransport", "OpenAITransport", "Transport", "check_completion"]

TRANSIENT = frozenset({"rate_limit", "server", "timeout", "connection"})
MALFORMED = frozenset({"bad_response", "empty_choices", "length"})


class CallFailure(Exception):
    """One failed attempt. ``kind`` is one of rate_limit, server, timeout, connection,
    bad_response, empty_choices, length, client, auth."""

    def __init__(self, kind: str, message: str, *, status: int | None = None,
                 retry_after: float | None = None, usage: dict[str, int] | None = None,
                 completion: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind, self.status, self.retry_after = kind, status, retry_after
        self.usage, self.completion = usage, completion

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT


class Transport(ABC):
    @abstractmethod
    async def complete(self, provider: Provider, body: dict[str, Any], timeout: float,
                       api_key: str | None = None) -> dict[str, Any]:
        """Return the chat.completion dict or raise CallFailure. ``api_key`` overrides the
        provider's environment variable (a Dagster EnvVar resolved by the resource)."""

    async def aclose(self) -> None:
        """Release connections."""


def check_completion(data: Any, allow_truncated: bool = False) -> dict[str, Any]:
    """Refuse replies that are not usable answers; keep their usage for the cost record."""
    if not isinstance(data, dict) or "choices" not in data:
        raise CallFailure("bad_response", "the reply is not a chat.completion object")
    usage = data.get("usage") or None
    if not data["choices"]:
        raise CallFailure("empty_choices", "the reply has no choices", usage=usage)
    if data["choices"][0].get("finish_reason") == "length" and not allow_truncated:
        raise CallFailure("length", "the answer was cut off at max_completion_tokens "
                          "(finish_reason='length'); raise the limit or pass "
                          "allow_truncated=True", usage=usage, completion=data)
    return data


class LocalTransport(Transport):
    """Offline provider: deterministic synthetic answers, optionally after a delay."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency

    async def complete(self, provider: Provider, body: dict[str, Any], timeout: float,
                       api_key: str | None = None) -> dict[str, Any]:
        if self.latency:
            await asyncio.sleep(self.latency)
        return synthetic_completion(body)


class OpenAITransport(Transport):
    """The official ``openai`` AsyncOpenAI client over aiohttp, one client per endpoint."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str | None, str], Any] = {}

    def _client(self, provider: Provider, api_key: str | None) -> Any:
        import openai

        base_url, key = provider.resolve_base_url(), api_key or provider.api_key()
        client = self._clients.get((base_url, key))
        if client is None:
            client = openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0,
                                        http_client=openai.DefaultAioHttpClient())
            self._clients[(base_url, key)] = client
        return client

    async def complete(self, provider: Provider, body: dict[str, Any], timeout: float,
                       api_key: str | None = None) -> dict[str, Any]:
        import openai

        client = self._client(provider, api_key)
        try:
            # The body is plain JSON already: posting its bytes skips the SDK's type-driven
            # transform of every request (~30% of the loop's time, benchmarks/broker_profile.py)
            # while keeping the client's auth, headers, connection pool and error classes.
            raw = await client.post("/chat/completions", cast_to=_raw_response_class(),
                                    content=orjson.dumps(body),
                                    options={"timeout": timeout, "headers": _JSON_HEADERS,
                                             "security": {"bearer_auth": True}})
            content = raw.content
        except openai.APITimeoutError as exc:
            lost = _lost_connection(exc)
            if lost is not None:  # reported as a timeout, but the connection failed at once
                raise CallFailure("connection", f"connection failed: {lost}") from exc
            raise CallFailure("timeout", f"no answer within {timeout:g}s") from exc
        except openai.APIConnectionError as exc:
            raise CallFailure("connection", f"connection failed: {exc}") from exc
        except openai.APIStatusError as exc:
            # Some servers and proxies quote the key in their error: it never goes further.
            raise _status_failure(exc, api_key or provider.api_key()) from exc
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            raise CallFailure("bad_response", f"the reply is not valid JSON: {exc}") from exc

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    def __getstate__(self) -> dict[str, Any]:
        # Live clients cannot be pickled (and hold the API key): the copy makes its own.
        return {"_clients": {}}


_JSON_HEADERS = {"Content-Type": "application/json"}


def _raw_response_class() -> type:
    """The HTTP response class of the installed openai client (it asks for the raw response)."""
    from openai import _base_client

    return _base_client.httpx2.Response


def _lost_connection(exc: BaseException) -> str | None:
    """The underlying connection error of an ``APITimeoutError`` that was no timeout, or None.

    The openai client's aiohttp transport reports every aiohttp connection error (server
    disconnected, connection reset or refused) as ``httpx.ConnectTimeout``; the real cause is
    at the end of the exception chain.
    """
    import aiohttp

    cause: BaseException | None = exc
    for _ in range(8):
        nxt = cause.__cause__ or cause.__context__
        if nxt is None:
            break
        cause = nxt
    if isinstance(cause, TimeoutError) or not isinstance(
            cause, aiohttp.ClientConnectionError | ConnectionError):
        return None
    return f"{type(cause).__name__}: {cause}"


def _status_failure(exc: Any, secret: str | None = None) -> CallFailure:
    status = exc.status_code
    retry_after = _retry_after(exc.response.headers)
    message = f"HTTP {status}: {_error_message(exc)}"
    if secret and len(secret) >= 8:
        message = message.replace(secret, "***")
    if status == 429:
        return CallFailure("rate_limit", message, status=status, retry_after=retry_after)
    if status in (401, 403):
        return CallFailure("auth", message + " (check the API key of this provider)",
                           status=status)
    if status >= 500 or status in (408, 409):
        return CallFailure("server", message, status=status, retry_after=retry_after)
    return CallFailure("client", message, status=status)


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                continue
    return None


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(exc, "message", exc))[:300]
