"""Files and the Batch API of the fake server, as plain state (no HTTP here)."""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchfactory_dagster.llm.synthetic import synthetic_completion
from batchfactory_dagster.testing._faults import CHAT_PATH, ServerOptions, _error_body

TERMINAL_BATCH_STATES = frozenset({"completed", "failed", "expired", "cancelled"})


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
