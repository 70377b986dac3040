"""Scripted faults, runtime options and the OpenAI error wire format of the fake server."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

CHAT_PATH = "/v1/chat/completions"
FAULT_KINDS = frozenset({"ok", "status", "slow", "bad_json", "length", "empty_choices", "reset"})
_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("requests", "rate_limit_exceeded"),
}


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True, slots=True)
class Fault:
    """One normalised script item: what to do with one request."""

    kind: str
    status: int = 200
    retry_after: float | None = None
    seconds: float | None = None


_OK = Fault("ok")


def parse_fault(item: Any) -> Fault:
    """Normalise a script item: ``429``, ``"500"``, ``(429, 0.2)``, ``"slow"``, dicts, ..."""
    if isinstance(item, Fault):
        return item
    if isinstance(item, bool):
        raise ValueError(f"invalid fault item {item!r}")
    if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
        status = int(item)
        return _OK if status == 200 else Fault("status", status=status)
    if isinstance(item, str):
        if item not in FAULT_KINDS - {"status"}:
            raise ValueError(f"unknown fault {item!r}; expected a status or one of {FAULT_KINDS}")
        return Fault(item)
    if isinstance(item, list | tuple) and len(item) == 2:
        return _parse_pair(item[0], item[1])
    if isinstance(item, Mapping):
        return _parse_mapping(item)
    raise ValueError(f"invalid fault item {item!r}")


def _parse_pair(head: Any, value: Any) -> Fault:
    base = parse_fault(head)
    if base.kind == "slow":
        return Fault("slow", seconds=float(value))
    if base.kind == "status":
        return Fault("status", status=base.status, retry_after=float(value))
    raise ValueError(f"fault {head!r} takes no parameter")


def _parse_mapping(item: Mapping[str, Any]) -> Fault:
    if "status" in item:
        base = parse_fault(item["status"])
    else:
        base = parse_fault(item.get("fault", "ok"))
    retry_after = item.get("retry_after")
    seconds = item.get("seconds")
    return Fault(
        base.kind,
        status=base.status,
        retry_after=None if retry_after is None else float(retry_after),
        seconds=None if seconds is None else float(seconds),
    )


@dataclass(slots=True)
class _Script:
    items: deque[Fault] = field(default_factory=deque)
    forever: Fault | None = None

    def next(self) -> Fault:
        if self.items:
            return self.items.popleft()
        return self.forever or _OK


def parse_script(spec: Any) -> _Script:
    """A list is consumed one item per request; ``{"forever": x}`` (optionally with
    ``"items"`` first) keeps answering ``x`` once the items are used up."""
    if spec is None:
        return _Script()
    if isinstance(spec, Mapping):
        forever = spec.get("forever")
        return _Script(
            deque(parse_fault(i) for i in spec.get("items") or ()),
            None if forever is None else parse_fault(forever),
        )
    if isinstance(spec, list | tuple):
        return _Script(deque(parse_fault(i) for i in spec))
    raise ValueError(f"a script is a list of items or {{'forever': item}}, not {spec!r}")


# --------------------------------------------------------------------------- options


@dataclass(slots=True)
class ServerOptions:
    """Runtime-tunable behaviour; change with ``configure()`` or ``POST /_admin/config``."""

    latency: float = 0.0
    rpm_limit: int | None = None
    slow_seconds: float = 30.0
    retry_after: float = 1.0
    log_bodies: bool = True
    batch_polls_to_complete: int = 1
    batch_expire_after: float | int | None = None
    batch_fail_custom_ids: Iterable[str] | Callable[[str], bool] | None = None
    batch_fail_status: int | None = None
    batch_shuffle_output: bool = False

    def update(self, **options: Any) -> None:
        for name, value in options.items():
            if name not in self.__dataclass_fields__:
                raise TypeError(f"unknown fake server option {name!r}")
            if name == "batch_fail_custom_ids" and isinstance(value, list | tuple):
                value = frozenset(value)
            setattr(self, name, value)


def _error_body(status: int, message: str, code: str | None = None) -> dict:
    err_type, default_code = _ERROR_TYPES.get(status, ("server_error", "server_error"))
    return {
        "error": {"message": message, "type": err_type, "param": None, "code": code or default_code}
    }


def error_response(
    status: int, message: str, *, code: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An error in OpenAI's ``{"error": {"message", "type", "code"}}`` shape."""
    return web.Response(
        status=status,
        body=orjson.dumps(_error_body(status, message, code)),
        content_type="application/json",
        headers=headers,
    )


def _json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _retry_headers(seconds: float) -> dict[str, str]:
    # Retry-After must be whole seconds per HTTP; the openai client prefers retry-after-ms.
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, round(seconds * 1000))),
    }


class _BadRequest(Exception):
    """Raised by body parsers; turned into a 400 by the handler wrapper."""


async def _json_body(request: web.Request) -> dict:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.")
    return body


class Address:
    """``port``/``url``/``base_url`` of a fake server, in this process or another one."""

    host: str
    _port: int | None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"the {type(self).__name__} is not started")
        return self._port

    @property
    def url(self) -> str:
        """Root URL, e.g. for the ``/_admin`` endpoints."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"
