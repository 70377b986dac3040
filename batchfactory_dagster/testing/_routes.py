"""The files, batches and ``/_admin`` handlers of the fake server, as mixins.

:class:`~batchfactory_dagster.testing.fake_openai.FakeOpenAIServer` inherits them; the
state they read (lock, log, emulator, options) lives on the server.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from batchfactory_dagster.testing._batches import BatchEmulator
from batchfactory_dagster.testing._faults import (
    CHAT_PATH,
    ServerOptions,
    _BadRequest,
    _json_body,
    _json_response,
    error_response,
)


class _BatchRoutes:
    """``/v1/files`` and ``/v1/batches`` over the server's :class:`BatchEmulator`."""

    _lock: threading.Lock
    _batches: BatchEmulator
    options: ServerOptions
    _note_body: Callable[..., None]

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


class _AdminRoutes:
    """``/_admin/*``: the request log, scripts and options for clients in other processes."""

    _lock: threading.Lock
    _log: list[dict]
    base_url: str
    count: Callable[..., int]
    summary: Callable[[], dict]
    reset: Callable[[], None]
    set_script: Callable[[str, Any], None]
    configure: Callable[..., None]

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
