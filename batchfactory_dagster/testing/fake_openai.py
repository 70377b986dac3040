"""A loopback fake of the OpenAI HTTP API for tests and benchmarks.

Serves ``/v1/chat/completions`` with :func:`synthetic_completion`, plus files and the
Batch API, with scripted faults per model, an optional server-side RPM limit and a
request log readable in-process or over ``/_admin/*`` (for clients in other processes).

Run standalone: ``python -m batchfactory_dagster.testing.fake_openai --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from batchfactory_dagster.llm.synthetic import synthetic_completion

__all__ = [
    "FakeOpenAIServer",
    "FakeServerProcess",
    "main",
    "serve_fake_openai",
]

CHAT_PATH = "/v1/chat/completions"
FAULT_KINDS = frozenset({"ok", "status", "slow", "bad_json", "length", "empty_choices", "reset"})
TERMINAL_BATCH_STATES = frozenset({"completed", "failed", "expired", "cancelled"})
_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("requests", "rate_limit_exceeded"),
}
# Lets a stuck "slow" request notice stop() promptly without polling.
_DEFAULT_SHUTDOWN_TIMEOUT = 1.0
_CLIENT_MAX_SIZE = 1 << 30  # batch input files may be hundreds of MB
# Typed request-storage keys where aiohttp has them (3.12+); plain strings before.
_RequestKey: Any = getattr(web, "RequestKey", None)
_ENTRY: Any = _RequestKey("fake_openai_entry", dict) if _RequestKey else "fake_openai_entry"
_DROPPED: Any = _RequestKey("fake_openai_dropped", bool) if _RequestKey else "fake_openai_dropped"


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


# --------------------------------------------------------------------------- batches


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _line_hash(batch_id: str, custom_id: str) -> str:
    return hashlib.blake2b(f"{batch_id}/{custom_id}".encode(), digest_size=12).hexdigest()


@dataclass(slots=True)
class _Batch:
    obj: dict
    lines: list[dict]
    errors: list[dict]
    options: ServerOptions
    polls: int = 0


class BatchEmulator:
    """Files and the Batch API, progressed by retrievals rather than wall time so tests
    are fast and deterministic. Not thread-safe: the server calls it from its loop."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[dict, bytes]] = {}
        self.batches: dict[str, _Batch] = {}

    # files -----------------------------------------------------------------
    def add_file(self, data: bytes, *, purpose: str, filename: str) -> dict:
        meta = {
            "id": _new_id("file-"),
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.files[meta["id"]] = (meta, data)
        return meta

    # batches ---------------------------------------------------------------
    def create_batch(self, body: Mapping[str, Any], options: ServerOptions) -> dict:
        input_file_id = body.get("input_file_id")
        if input_file_id not in self.files:
            raise KeyError(input_file_id)
        endpoint = body.get("endpoint") or CHAT_PATH
        lines, errors = _parse_batch_input(self.files[input_file_id][1], endpoint)
        now = int(time.time())
        obj = {
            "id": _new_id("batch_"),
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": body.get("completion_window") or "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86_400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        # Snapshot the options so reconfiguring mid-test does not change running batches.
        snapshot = ServerOptions(**{k: getattr(options, k) for k in options.__dataclass_fields__})
        self.batches[obj["id"]] = _Batch(obj, lines, errors, snapshot)
        return obj

    def retrieve(self, batch_id: str) -> dict:
        batch = self.batches[batch_id]
        if batch.obj["status"] not in TERMINAL_BATCH_STATES:
            self._advance(batch)
        return batch.obj

    def cancel(self, batch_id: str) -> dict | None:
        """The cancelling batch, or None when it has already finished."""
        batch = self.batches[batch_id]
        if batch.obj["status"] in TERMINAL_BATCH_STATES:
            return None
        if batch.obj["status"] != "cancelling":
            batch.obj.update(status="cancelling", cancelling_at=int(time.time()))
        return batch.obj

    def _advance(self, batch: _Batch) -> None:
        obj, now = batch.obj, int(time.time())
        if obj["status"] == "cancelling":
            self._finalize(batch, self._processed(batch), "cancelled", "batch_cancelled")
            return
        if batch.errors:
            obj.update(
                status="failed", failed_at=now, errors={"object": "list", "data": batch.errors}
            )
            return
        batch.polls += 1
        polls_needed = max(0, int(batch.options.batch_polls_to_complete))
        if batch.polls <= polls_needed:
            early = batch.polls == 1 and polls_needed >= 2
            obj.update(status="validating" if early else "in_progress")
            obj["in_progress_at"] = obj["in_progress_at"] or (None if early else now)
            obj["request_counts"].update(self._counts(batch, self._processed(batch)))
        elif obj["status"] != "finalizing" and self._expire_at(batch) is not None:
            self._finalize(batch, self._expire_at(batch), "expired", "batch_expired")
        elif obj["status"] != "finalizing":
            obj.update(status="finalizing", finalizing_at=now)
            obj["request_counts"].update(self._counts(batch, len(batch.lines)))
        else:
            self._finalize(batch, len(batch.lines), "completed", None)

    def _processed(self, batch: _Batch) -> int:
        """Lines done so far: grows linearly over the polls, capped by the expiry point."""
        polls_needed = max(0, int(batch.options.batch_polls_to_complete))
        limit = self._expire_at(batch)
        limit = len(batch.lines) if limit is None else limit
        return limit * min(batch.polls, polls_needed) // (polls_needed + 1)

    @staticmethod
    def _expire_at(batch: _Batch) -> int | None:
        expire = batch.options.batch_expire_after
        if expire is None or isinstance(expire, bool):
            return None
        total = len(batch.lines)
        # An int counts lines, a float is a fraction of the batch.
        done = expire if isinstance(expire, int) else math.floor(float(expire) * total)
        return max(0, min(done, total))

    def _failed(self, batch: _Batch, custom_id: str) -> bool:
        fail = batch.options.batch_fail_custom_ids
        if fail is None:
            return False
        return bool(fail(custom_id)) if callable(fail) else custom_id in fail

    def _counts(self, batch: _Batch, done: int) -> dict[str, int]:
        failed = sum(self._failed(batch, ln["custom_id"]) for ln in batch.lines[:done])
        return {"completed": done - failed, "failed": failed}

    def _finalize(self, batch: _Batch, done: int, status: str, leftover: str | None) -> None:
        outputs, errors = self._results(batch, done, leftover)
        if batch.options.batch_shuffle_output:
            # Real batches return lines in any order; clients must match on custom_id.
            outputs.sort(key=lambda ln: ln["id"])
        obj, now = batch.obj, int(time.time())
        obj["output_file_id"] = self._jsonl_file(outputs, batch, "output") if outputs else None
        obj["error_file_id"] = self._jsonl_file(errors, batch, "errors") if errors else None
        obj["request_counts"] = {
            "total": len(batch.lines),
            "completed": len(outputs),
            "failed": len(errors),
        }
        obj.update(status=status, **{f"{status}_at": now})
        obj["finalizing_at"] = obj["finalizing_at"] or now

    def _results(self, batch: _Batch, done: int, leftover: str | None) -> tuple[list, list]:
        outputs: list[dict] = []
        errors: list[dict] = []
        for index, line in enumerate(batch.lines):
            custom_id = line["custom_id"]
            if index >= done:
                if leftover:
                    errors.append(self._error_line(batch, custom_id, leftover, None))
            elif self._failed(batch, custom_id):
                code = "server_error"
                errors.append(
                    self._error_line(batch, custom_id, code, batch.options.batch_fail_status)
                )
            else:
                outputs.append(self._output_line(batch, line))
        return outputs, errors

    @staticmethod
    def _output_line(batch: _Batch, line: dict) -> dict:
        digest = _line_hash(batch.obj["id"], line["custom_id"])
        return {
            "id": f"batch_req_{digest}",
            "custom_id": line["custom_id"],
            "response": {
                "status_code": 200,
                "request_id": f"req_{digest}",
                "body": synthetic_completion(line["body"]),
            },
            "error": None,
        }

    @staticmethod
    def _error_line(batch: _Batch, custom_id: str, code: str, status: int | None) -> dict:
        digest = _line_hash(batch.obj["id"], custom_id)
        message = {
            "batch_expired": "This request could not be executed before the completion window expired.",
            "batch_cancelled": "This request was not executed because the batch was cancelled.",
        }.get(code, "Synthetic failure injected by the fake server.")
        line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": custom_id}
        if status is None:
            line.update(response=None, error={"code": code, "message": message})
        else:
            body = _error_body(status, message)
            line.update(
                response={"status_code": status, "request_id": f"req_{digest}", "body": body},
                error=None,
            )
        return line

    def _jsonl_file(self, rows: list[dict], batch: _Batch, kind: str) -> str:
        data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
        name = f"{batch.obj['id']}_{kind}.jsonl"
        return self.add_file(data, purpose="batch_output", filename=name)["id"]


def _parse_batch_input(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """Valid request lines, and validation errors in the Batch API ``errors.data`` shape."""
    lines: list[dict] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        problem = _line_problem(raw, endpoint, seen, lines)
        if problem:
            errors.append(
                {"code": problem[0], "message": problem[1], "param": None, "line": number}
            )
    if not lines and not errors:
        errors.append(
            {
                "code": "empty_file",
                "message": "The input file is empty.",
                "param": None,
                "line": None,
            }
        )
    return lines, errors


def _line_problem(
    raw: bytes, endpoint: str, seen: set[str], lines: list[dict]
) -> tuple[str, str] | None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ("invalid_json_line", "This line is not parseable as valid JSON.")
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return ("missing_required_parameter", "Each line needs a string custom_id.")
    if not isinstance(line.get("body"), dict):
        return ("missing_required_parameter", "Each line needs a JSON object body.")
    if line.get("url", endpoint) != endpoint:
        return (
            "mismatched_endpoint",
            f"The line's url does not match the batch endpoint {endpoint}.",
        )
    if line["custom_id"] in seen:
        return ("duplicate_custom_id", f"The custom_id {line['custom_id']!r} is not unique.")
    seen.add(line["custom_id"])
    lines.append(line)
    return None


# --------------------------------------------------------------------------- server


class FakeOpenAIServer:
    """The fake API on an aiohttp server running in a daemon thread with its own loop."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        rpm_limit: int | None = None,
        script: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        use_uvloop: bool = False,
        **options: Any,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._use_uvloop = use_uvloop
        self._initial_script = dict(script or {})
        self._initial_options = dict(options, latency=latency, rpm_limit=rpm_limit)
        self.options = ServerOptions()
        self.options.update(**self._initial_options)
        self._lock = threading.Lock()
        self._log: list[dict] = []
        self._scripts: dict[str, _Script] = {}
        self._accepted: deque[float] = deque()
        self._batches = BatchEmulator()
        self._ids = itertools.count(1)
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._reset_state()

    # lifecycle -------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the fake server is not started")
        return self._port

    @property
    def url(self) -> str:
        """Root URL, e.g. for the ``/_admin`` endpoints."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> FakeOpenAIServer:
        """Start serving; returns once the socket is listening."""
        if self._thread is not None:
            return self
        self._ready.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("fake OpenAI server failed to start") from self._start_error
        return self

    def stop(self) -> None:
        """Stop serving; requests still sleeping (``slow``) are aborted."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = _new_loop(self._use_uvloop)
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # reported to start() in the calling thread
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _startup(self) -> None:
        self._stopping = asyncio.Event()
        runner = web.AppRunner(
            self._build_app(), access_log=None, shutdown_timeout=_DEFAULT_SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        site = web.TCPSite(
            runner, self.host, self._requested_port, backlog=1024, reuse_address=True
        )
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def _shutdown(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=_CLIENT_MAX_SIZE, middlewares=[self._middleware])
        add = app.router.add_route
        add("POST", CHAT_PATH, self._chat)
        add("GET", "/v1/models", self._models)
        add("POST", "/v1/files", self._files_create)
        add("GET", "/v1/files", self._files_list)
        add("GET", "/v1/files/{file_id}", self._files_get)
        add("DELETE", "/v1/files/{file_id}", self._files_delete)
        add("GET", "/v1/files/{file_id}/content", self._files_content)
        add("POST", "/v1/batches", self._batches_create)
        add("GET", "/v1/batches", self._batches_list)
        add("GET", "/v1/batches/{batch_id}", self._batches_get)
        add("POST", "/v1/batches/{batch_id}/cancel", self._batches_cancel)
        add("*", "/v1/{tail:.*}", self._not_found)
        add("GET", "/_admin/requests", self._admin_requests)
        add("GET", "/_admin/count", self._admin_count)
        add("GET", "/_admin/health", self._admin_health)
        add("POST", "/_admin/reset", self._admin_reset)
        add("POST", "/_admin/script", self._admin_script)
        add("POST", "/_admin/config", self._admin_config)
        return app

    # state shared with other threads -------------------------------------------
    def _reset_state(self) -> None:
        with self._lock:
            self._log.clear()
            self._accepted.clear()
            self._scripts = {m: parse_script(s) for m, s in self._initial_script.items()}
            self.options = ServerOptions()
            self.options.update(**self._initial_options)
            self._batches = BatchEmulator()

    def reset(self) -> None:
        """Back to the freshly started state: empty log, initial scripts and options, no
        files or batches, empty RPM window."""
        self._reset_state()

    def set_script(self, model: str, items: Any) -> None:
        """Replace ``model``'s script: a list of items, ``{"forever": item}``, or None."""
        script = parse_script(items)
        with self._lock:
            self._scripts[model] = script

    def configure(self, **options: Any) -> None:
        """Change options (latency, rpm_limit, slow_seconds, batch_* ...) at runtime."""
        with self._lock:
            self.options.update(**options)

    @property
    def requests(self) -> list[dict]:
        """A copy of the request log."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def count(
        self, path: str | None = CHAT_PATH, status: int | None = None, model: str | None = None
    ) -> int:
        """Logged requests matching all given filters (None matches anything)."""
        with self._lock:
            return sum(_matches(e, path, status, model) for e in self._log)

    def summary(self) -> dict:
        """Counts by path, status and model."""
        with self._lock:
            return _summarize(self._log)

    # middleware and helpers ------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        entry = self._record(request)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
            response: web.StreamResponse = error_response(
                401, "You didn't provide an API key. Use an Authorization: Bearer header."
            )
        else:
            try:
                response = await handler(request)
            except _BadRequest as exc:
                response = error_response(400, str(exc))
        dropped = request.get(_DROPPED, False)
        entry["status"] = None if dropped else response.status
        entry["answered"] = not dropped
        entry["answered_at"] = None if dropped else time.time()
        return response

    def _record(self, request: web.Request) -> dict:
        entry = {
            "id": next(self._ids),
            "time": time.time(),
            "method": request.method,
            "path": request.path,
            "model": None,
            "body": None,
            "status": None,
            "answered": False,
            "answered_at": None,
        }
        request[_ENTRY] = entry
        with self._lock:
            self._log.append(entry)
        return entry

    def _note_body(self, request: web.Request, body: Any, model: str | None = None) -> None:
        entry = request[_ENTRY]
        entry["model"] = model
        if self.options.log_bodies:
            entry["body"] = body

    def _drop(self, request: web.Request) -> web.Response:
        """Close the connection without answering (a reset as the client sees it)."""
        request[_DROPPED] = True
        transport = request.transport
        if transport is not None:
            transport.abort()
        # aiohttp still wants a response object; it cannot be written to a dead socket.
        return web.Response(status=499)

    # chat completions -----------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = body.get("model")
        self._note_body(request, body, model if isinstance(model, str) else None)
        limited = self._rpm_check()
        if limited is not None:
            return limited
        with self._lock:
            script = self._scripts.get(model) if isinstance(model, str) else None
            fault = script.next() if script is not None else _OK
        latency = self.options.latency
        if latency > 0:
            await asyncio.sleep(latency)
        return await self._answer(request, body, fault)

    def _rpm_check(self) -> web.Response | None:
        limit = self.options.rpm_limit
        if not limit:
            return None
        now = time.monotonic()
        with self._lock:
            window = self._accepted
            while window and window[0] <= now - 60.0:
                window.popleft()
            if len(window) >= limit:
                wait = window[0] + 60.0 - now
                return error_response(
                    429,
                    f"Rate limit reached: limit {limit} requests per minute.",
                    headers=_retry_headers(wait),
                )
            window.append(now)
        return None

    async def _answer(self, request: web.Request, body: dict, fault: Fault) -> web.StreamResponse:
        kind = fault.kind
        if kind == "status":
            return self._status_fault(fault)
        if kind == "reset":
            return self._drop(request)
        if kind == "slow":
            seconds = fault.seconds if fault.seconds is not None else self.options.slow_seconds
            if await self._stopped_within(seconds):
                return self._drop(request)
        completion = synthetic_completion(body)
        if kind == "bad_json":
            raw = orjson.dumps(completion)
            return web.Response(body=raw[: len(raw) // 2], content_type="application/json")
        if kind == "length":
            _truncate(completion)
        elif kind == "empty_choices":
            completion["choices"] = []
        return _json_response(completion)

    def _status_fault(self, fault: Fault) -> web.Response:
        status = fault.status
        if status == 429:
            wait = fault.retry_after if fault.retry_after is not None else self.options.retry_after
            return error_response(
                429, "Rate limit reached (scripted).", headers=_retry_headers(wait)
            )
        headers = _retry_headers(fault.retry_after) if fault.retry_after is not None else None
        return error_response(status, f"Scripted error {status}.", headers=headers)

    async def _stopped_within(self, seconds: float) -> bool:
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def _models(self, request: web.Request) -> web.Response:
        with self._lock:
            names = sorted({"gpt-4o-mini", "gpt-4.1-nano", *self._scripts})
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "fake-openai"} for n in names
        ]
        return _json_response({"object": "list", "data": data})

    async def _not_found(self, request: web.Request) -> web.Response:
        return error_response(404, f"Invalid URL ({request.method} {request.path})")

    # files --------------------------------------------------------------------
    async def _files_create(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or not isinstance(purpose, str):
            raise _BadRequest("Upload a multipart form with 'file' and 'purpose'.")
        data = upload.file.read()
        self._note_body(
            request, {"purpose": purpose, "filename": upload.filename, "bytes": len(data)}
        )
        with self._lock:
            meta = self._batches.add_file(data, purpose=purpose, filename=upload.filename)
        return _json_response(meta)

    async def _files_list(self, request: web.Request) -> web.Response:
        with self._lock:
            data = [meta for meta, _ in self._batches.files.values()]
        return _json_response({"object": "list", "data": data, "has_more": False})

    def _file(self, request: web.Request) -> tuple[dict, bytes] | None:
        with self._lock:
            return self._batches.files.get(request.match_info["file_id"])

    async def _files_get(self, request: web.Request) -> web.Response:
        found = self._file(request)
        if found is None:
            return error_response(404, f"No such File object: {request.match_info['file_id']}")
        return _json_response(found[0])

    async def _files_content(self, request: web.Request) -> web.Response:
        found = self._file(request)
        if found is None:
            return error_response(404, f"No such File object: {request.match_info['file_id']}")
        return web.Response(body=found[1], content_type="application/octet-stream")

    async def _files_delete(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        with self._lock:
            removed = self._batches.files.pop(file_id, None)
        if removed is None:
            return error_response(404, f"No such File object: {file_id}")
        return _json_response({"id": file_id, "object": "file", "deleted": True})

    # batches ------------------------------------------------------------------
    async def _batches_create(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        self._note_body(request, body)
        endpoint = body.get("endpoint") or CHAT_PATH
        if endpoint != CHAT_PATH:
            return error_response(400, f"The fake server only batches {CHAT_PATH}, not {endpoint}.")
        with self._lock:
            try:
                obj = self._batches.create_batch(body, self.options)
            except KeyError:
                return error_response(404, f"No such File object: {body.get('input_file_id')}")
            return _json_response(obj)

    async def _batches_get(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        with self._lock:
            if batch_id not in self._batches.batches:
                return error_response(404, f"No such Batch object: {batch_id}")
            # Finalising builds the output file inline: fine for test-sized batches.
            return _json_response(self._batches.retrieve(batch_id))

    async def _batches_cancel(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        with self._lock:
            if batch_id not in self._batches.batches:
                return error_response(404, f"No such Batch object: {batch_id}")
            obj = self._batches.cancel(batch_id)
            if obj is None:
                status = self._batches.batches[batch_id].obj["status"]
                return error_response(409, f"Cannot cancel a batch with status '{status}'.")
            return _json_response(obj)

    async def _batches_list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "20"))
        after = request.query.get("after")
        with self._lock:
            objs = [b.obj for b in reversed(self._batches.batches.values())]
        if after:
            ids = [o["id"] for o in objs]
            objs = objs[ids.index(after) + 1 :] if after in ids else []
        page = objs[:limit]
        return _json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(objs) > limit,
            }
        )

    # admin ------------------------------------------------------------------
    async def _admin_requests(self, request: web.Request) -> web.Response:
        if request.query.get("summary") not in (None, "", "0", "false"):
            return _json_response(self.summary())
        path, status, model = _filters(request.query)
        with self._lock:
            rows = [e for e in self._log if _matches(e, path, status, model)]
            return _json_response(rows)

    async def _admin_count(self, request: web.Request) -> web.Response:
        path, status, model = _filters(request.query)
        return _json_response({"count": self.count(path, status, model)})

    async def _admin_health(self, request: web.Request) -> web.Response:
        return _json_response({"ok": True, "base_url": self.base_url})

    async def _admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response({"ok": True})

    async def _admin_script(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        model = body.get("model")
        if not isinstance(model, str):
            return error_response(400, "Give the 'model' whose script to set.")
        spec: Any = body.get("items")
        if "forever" in body:
            spec = {"items": body.get("items") or [], "forever": body["forever"]}
        try:
            self.set_script(model, spec)
        except ValueError as exc:
            return error_response(400, str(exc))
        return _json_response({"ok": True})

    async def _admin_config(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            self.configure(**body)
        except TypeError as exc:
            return error_response(400, str(exc))
        return _json_response({"ok": True})


def _truncate(completion: dict) -> None:
    for choice in completion["choices"]:
        content = choice["message"]["content"] or ""
        choice["message"]["content"] = content[: max(1, len(content) // 2)]
        choice["finish_reason"] = "length"


def _matches(
    entry: Mapping[str, Any], path: str | None, status: int | None, model: str | None
) -> bool:
    return (
        (path is None or entry["path"] == path)
        and (status is None or entry["status"] == status)
        and (model is None or entry["model"] == model)
    )


def _filters(query: Mapping[str, str]) -> tuple[str | None, int | None, str | None]:
    status = query.get("status")
    return query.get("path") or None, int(status) if status else None, query.get("model") or None


def _summarize(log: list[dict]) -> dict:
    return {
        "total": len(log),
        "answered": sum(1 for e in log if e["answered"]),
        "by_path": dict(Counter(e["path"] for e in log)),
        "by_status": {str(k): v for k, v in Counter(e["status"] for e in log).items()},
        "by_model": {str(k): v for k, v in Counter(e["model"] for e in log).items()},
    }


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # optional speed-up only
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@contextlib.contextmanager
def serve_fake_openai(**kwargs: Any) -> Iterator[FakeOpenAIServer]:
    """An in-thread :class:`FakeOpenAIServer`, started for the ``with`` block."""
    with FakeOpenAIServer(**kwargs) as server:
        yield server


# --------------------------------------------------------------------------- other process


_URL_RE = re.compile(r"http://[^\s/]+:(\d+)/v1")
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class FakeServerProcess:
    """The fake server in a child process (no GIL shared with the client under test).

    Counts and scripts go through the ``/_admin`` endpoints. The child also exits when
    this process dies, because it watches its stdin for EOF.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        rpm_limit: int | None = None,
        script: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 20.0,
        **options: Any,
    ) -> None:
        self.host = host
        self._port_arg = port
        self._startup_timeout = startup_timeout
        config = dict(options, latency=latency, rpm_limit=rpm_limit, script=dict(script or {}))
        try:
            self._config = json.dumps(config, default=_jsonable)
        except TypeError as exc:
            raise TypeError(f"FakeServerProcess options must be JSON-serialisable: {exc}") from None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the fake server process is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> FakeServerProcess:
        if self._proc is not None:
            return self
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")])
        )
        cmd = [
            sys.executable, "-m", "batchfactory_dagster.testing.fake_openai",
            "--host", self.host, "--port", str(self._port_arg),
            "--config", self._config, "--exit-on-stdin-eof", "--uvloop",
        ]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            self._port = self._read_port()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=self._startup_timeout):
                raise RuntimeError("fake server process did not report its port in time")
        line = self._proc.stdout.readline().decode()
        match = _URL_RE.search(line)
        if match is None:
            raise RuntimeError(f"fake server process failed to start (said {line!r})")
        return int(match.group(1))

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # Closing stdin is the polite stop signal; escalate only if it is ignored.
        for close in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if close is not None:
                    close.close()
        for escalate in (None, proc.terminate, proc.kill):
            if escalate is not None:
                escalate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
                return

    def __enter__(self) -> FakeServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # admin over HTTP ---------------------------------------------------------
    def _admin(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload, default=_jsonable).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with self._opener.open(req, timeout=30) as resp:
            return json.loads(resp.read())

    def requests(self, **filters: Any) -> list[dict]:
        """The child's request log (optionally filtered by path, status, model)."""
        return self._admin("GET", "/_admin/requests" + _query(filters))

    def count(
        self, path: str | None = CHAT_PATH, status: int | None = None, model: str | None = None
    ) -> int:
        query = _query({"path": path, "status": status, "model": model})
        return int(self._admin("GET", "/_admin/count" + query)["count"])

    def summary(self) -> dict:
        return self._admin("GET", "/_admin/requests?summary=1")

    def reset(self) -> None:
        self._admin("POST", "/_admin/reset", {})

    def set_script(self, model: str, items: Any) -> None:
        payload: dict[str, Any] = {"model": model}
        if isinstance(items, Mapping):
            payload.update(items)
        else:
            payload["items"] = items
        self._admin("POST", "/_admin/script", payload)

    def configure(self, **options: Any) -> None:
        self._admin("POST", "/_admin/config", options)


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, Fault):
        return {"fault": value.kind, "status": value.status, "retry_after": value.retry_after}
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable (use a set, not a predicate)")


def _query(params: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in params.items() if v is not None}
    return "?" + urllib.parse.urlencode(kept) if kept else ""


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m batchfactory_dagster.testing.fake_openai",
        description="Serve a fake OpenAI-compatible API on loopback until Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=None, help="seconds per completion")
    parser.add_argument("--rpm-limit", type=int, default=None, help="server-side requests/minute")
    parser.add_argument("--slow-seconds", type=float, default=None)
    parser.add_argument("--batch-polls-to-complete", type=int, default=None)
    parser.add_argument("--script", default=None, help='JSON, e.g. {"flaky": [429, 500]}')
    parser.add_argument("--config", default=None, help="JSON object of FakeOpenAIServer options")
    parser.add_argument("--uvloop", action="store_true", help="use uvloop when installed")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _server_from_args(args: argparse.Namespace) -> FakeOpenAIServer:
    config: dict[str, Any] = json.loads(args.config) if args.config else {}
    flags = {
        "latency": args.latency,
        "rpm_limit": args.rpm_limit,
        "slow_seconds": args.slow_seconds,
        "batch_polls_to_complete": args.batch_polls_to_complete,
        "script": json.loads(args.script) if args.script else None,
    }
    config.update({k: v for k, v in flags.items() if v is not None})
    config.setdefault("latency", 0.0)
    return FakeOpenAIServer(host=args.host, port=args.port, use_uvloop=args.uvloop, **config)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGINT/SIGTERM (or stdin EOF when asked)."""
    args = _parse_args(argv)
    server = _server_from_args(args).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    if args.exit_on_stdin_eof:
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), done.set()), daemon=True).start()
    print(server.base_url, flush=True)
    # A timed wait keeps the main thread responsive to signals.
    while not done.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
