"""The in-thread fake server: lifecycle, request log, middleware and chat completions."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from batchfactory_dagster.llm.synthetic import synthetic_completion
from batchfactory_dagster.testing._batches import BatchEmulator
from batchfactory_dagster.testing._faults import (
    _OK,
    CHAT_PATH,
    Address,
    Fault,
    ServerOptions,
    _BadRequest,
    _json_body,
    _json_response,
    _retry_headers,
    _Script,
    error_response,
    parse_script,
)
from batchfactory_dagster.testing._routes import (
    _AdminRoutes,
    _BatchRoutes,
    _matches,
    _summarize,
)

# Lets a stuck "slow" request notice stop() promptly without polling.
_DEFAULT_SHUTDOWN_TIMEOUT = 1.0
_CLIENT_MAX_SIZE = 1 << 30  # batch input files may be hundreds of MB
# Typed request-storage keys where aiohttp has them (3.12+); plain strings before.
_RequestKey: Any = getattr(web, "RequestKey", None)
_ENTRY: Any = _RequestKey("fake_openai_entry", dict) if _RequestKey else "fake_openai_entry"
_DROPPED: Any = _RequestKey("fake_openai_dropped", bool) if _RequestKey else "fake_openai_dropped"


class FakeOpenAIServer(Address, _BatchRoutes, _AdminRoutes):
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


def _truncate(completion: dict) -> None:
    for choice in completion["choices"]:
        content = choice["message"]["content"] or ""
        choice["message"]["content"] = content[: max(1, len(content) // 2)]
        choice["finish_reason"] = "length"


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # optional speed-up only
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
