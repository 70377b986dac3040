"""Prototype transports, for measuring only (the lead decides what goes into the package).

Both plug into the unmodified broker through its ``transport=`` seam:

* ``SdkPostTransport``: still the official AsyncOpenAI client on aiohttp (same retries-off
  client, same auth, same error classes, same ``APIStatusError`` handling), but calls
  ``client.post("/chat/completions", cast_to=httpx2.Response, content=orjson bytes)`` instead of
  ``client.chat.completions.with_raw_response.create(**body)``. That skips the SDK's
  ``async_maybe_transform`` of the body against the ``CompletionCreateParams`` TypedDicts
  (a recursive, typing-introspecting walk over every message) and the SDK's JSON encoding,
  which the profile shows as the single largest client-side cost.
* ``DirectAioHttpTransport``: no SDK at all, one ``aiohttp.ClientSession`` POSTing orjson bytes:
  the ceiling of what this client process can do per core.
"""

from __future__ import annotations

from typing import Any

import orjson

from batchfactory_dagster.llm.providers import Provider
from batchfactory_dagster.llm.transport import CallFailure, OpenAITransport, Transport

_JSON = {"Content-Type": "application/json"}


def _sdk_client(transport: OpenAITransport, provider: Provider, api_key: str | None) -> Any:
    # OpenAITransport._client grew an api_key argument; work with either signature.
    try:
        return transport._client(provider, api_key)
    except TypeError:
        return transport._client(provider)  # type: ignore[call-arg]


class SdkPostTransport(OpenAITransport):
    async def complete(self, provider: Provider, body: dict[str, Any], timeout: float,
                       api_key: str | None = None) -> dict[str, Any]:
        import httpx2
        import openai

        from batchfactory_dagster.llm.transport import _status_failure

        client = _sdk_client(self, provider, api_key)
        try:
            raw = await client.post(
                "/chat/completions", cast_to=httpx2.Response, content=orjson.dumps(body),
                options={"timeout": timeout, "headers": _JSON,
                         "security": {"bearer_auth": True}})
            content = raw.content
        except openai.APITimeoutError as exc:
            raise CallFailure("timeout", f"no answer within {timeout:g}s") from exc
        except openai.APIConnectionError as exc:
            raise CallFailure("connection", f"connection failed: {exc}") from exc
        except openai.APIStatusError as exc:
            raise _status_failure(exc) from exc
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            raise CallFailure("bad_response", f"the reply is not valid JSON: {exc}") from exc


class DirectAioHttpTransport(Transport):
    def __init__(self) -> None:
        self._session: Any = None

    async def complete(self, provider: Provider, body: dict[str, Any], timeout: float,
                       api_key: str | None = None) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000),
                json_serialize=lambda o: orjson.dumps(o).decode())
        url = (provider.resolve_base_url() or "https://api.openai.com/v1") + "/chat/completions"
        headers = {"Authorization": f"Bearer {api_key or provider.api_key()}", **_JSON}
        async with self._session.post(url, data=orjson.dumps(body), headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            content = await resp.read()
            if resp.status != 200:
                raise CallFailure("server" if resp.status >= 500 else "client",
                                  f"HTTP {resp.status}", status=resp.status)
        return orjson.loads(content)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
