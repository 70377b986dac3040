"""BatchLLMCallBroker: the same chat requests through the OpenAI Batch API, at half the price.

The first run uploads a JSONL file per batch (``custom_id`` = the job's content key, so unique
within a file) and creates the batch; the entries are held back as pending. A later run (or this
one with ``wait=True``) collects: output lines become done records priced at ``BATCH_DISCOUNT``,
error lines become failures (retried when transient), and an expired, cancelled or failed
batch keeps every line it did answer; only the jobs it never ran are submitted again.

The offline ``local`` provider answers in-process at once (cost 0), so pipelines written for
the batch broker run offline too.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import orjson

from ..core.context import CallStats
from ..llm.models import request_body, response_from_completion
from ..llm.prices import BATCH_DISCOUNT, compute_cost
from ..llm.providers import Provider, get_provider, parse_model
from ..llm.synthetic import synthetic_completion
from ..llm.transport import CallFailure, _status_failure, check_completion
from .base import FAILED_SUFFIX, ImmediateBroker, JobFailure, Outcome
from .deferred import DeferredBroker, Poll, Submission
from .llm_broker import _usage, estimate_request_cost

__all__ = ["BatchLLMCallBroker"]

CHAT_ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Error-line codes of jobs the batch never ran: they are submitted again, not failed.
NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})
TRANSIENT_CODES = frozenset({"server_error", "rate_limit_exceeded", "token_limit_exceeded",
                             "internal_error", "timeout"})
# How far back (seconds) find() looks for a batch created before its claim was recorded.
FIND_SLACK = 3600


class BatchLLMCallBroker(DeferredBroker):
    """Chat completions through the Batch API: submit now, collect on a later run.

    Args:
        cache_path: the ledger file (shared with ConcurrentLLMCallBroker: same keys).
        poll_interval / wait / max_wait: see DeferredBroker; ``wait=True`` polls until done.
        max_requests_per_batch / max_bytes_per_batch: split limits for one input file.
        completion_window: passed to the Batch API ("24h").
        max_attempts: submissions per job for transient line errors (5xx, 429).
        allow_truncated: accept answers cut off at max_completion_tokens.
        timeout: seconds for one HTTP call (uploads may be large).
    """

    def __init__(self, cache_path: str | None = None, *, poll_interval: float = 30.0,
                 wait: bool = False, max_wait: float | None = None,
                 max_requests_per_batch: int = 50_000, max_bytes_per_batch: int = 200 * 2**20,
                 completion_window: str = "24h", max_attempts: int = 3,
                 allow_truncated: bool = False, timeout: float = 600.0) -> None:
        super().__init__(cache_path, wait=wait, poll_interval=poll_interval, max_wait=max_wait,
                         max_attempts=max_attempts)
        if max_requests_per_batch < 1 or max_bytes_per_batch < 1:
            raise ValueError("max_requests_per_batch and max_bytes_per_batch must be >= 1")
        self.max_requests_per_batch = max_requests_per_batch
        self.max_bytes_per_batch = max_bytes_per_batch
        self.completion_window, self.allow_truncated = completion_window, allow_truncated
        self.timeout = timeout
        self._clients: dict[tuple[str | None, str], Any] = {}
        self._payloads: dict[str, bytes] = {}  # submission id -> input file, prepare -> submit

    # -- dispatch: the offline provider answers at once -----------------------------------
    def dispatch(self, jobs: dict[str, dict[str, Any]], stats: CallStats, progress: bool,
                 retry_malformed: bool) -> dict[str, Outcome]:
        providers = {r["model"]: get_provider(parse_model(r["model"])[1]) for r in jobs.values()}
        for provider in providers.values():
            provider.api_key()  # a missing key fails before anything is submitted
        local = {k: r for k, r in jobs.items() if providers[r["model"]].offline}
        outcomes = self._answer_locally(local, stats) if local else {}
        remote = {k: r for k, r in jobs.items() if k not in local}
        if remote:
            outcomes.update(super().dispatch(remote, stats, progress, retry_malformed))
        return outcomes

    def _answer_locally(self, jobs: dict[str, dict[str, Any]],
                        stats: CallStats) -> dict[str, Outcome]:
        """An in-process batch that finishes at once, recorded like a collected one."""
        outcomes: dict[str, Outcome] = {}
        records: list[dict[str, Any]] = []
        stats.attempts += len(jobs)
        for key, request in jobs.items():
            completion = synthetic_completion(request_body(request))
            result = self._line_result(request["model"], key, completion)
            if isinstance(result, JobFailure):
                # Deterministic answers: a retry gives the same one, so it fails for this run.
                stats.failed += 1
                outcomes[key] = Outcome("failed", error=f"{result.kind}: {result}")
                records.append(_local_failure(key, result))
                continue
            records.append(self._done_record(key, request, result[0], {}, result[2], "local"))
            stats.new_calls += 1
            ImmediateBroker._count_usage(stats, result[1], result[2])
            outcomes[key] = Outcome("done", result[0])
        self.ledger.append_many(records)
        return outcomes

    # -- splitting and submitting ----------------------------------------------------------
    def split(self, jobs: dict[str, dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
        """One model per batch (the Batch API's rule), within the request and byte limits."""
        by_model: dict[str, dict[str, dict[str, Any]]] = {}
        for key, request in jobs.items():
            by_model.setdefault(request["model"], {})[key] = request
        return [group for model_jobs in by_model.values() for group in self._chunks(model_jobs)]

    def _chunks(self, jobs: dict[str, dict[str, Any]]) -> Iterator[dict[str, dict[str, Any]]]:
        group: dict[str, dict[str, Any]] = {}
        size = 0
        for key, request in jobs.items():
            n = len(_line(key, request)) + 1
            full = len(group) >= self.max_requests_per_batch or size + n > self.max_bytes_per_batch
            if group and full:
                yield group
                group, size = {}, 0
            group[key], size = request, size + n
        if group:
            yield group

    def prepare(self, submission: Submission) -> dict[str, Any]:
        data = b"".join(_line(k, r) + b"\n" for k, r in submission.jobs.items())
        self._payloads[submission.id] = data
        model = next(iter(submission.jobs.values()))["model"]
        return {"model": model, "requests": len(submission.jobs), "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}

    def submit(self, submission: Submission) -> dict[str, Any]:
        data = self._payloads.pop(submission.id, None)
        if data is None:  # prepared by another broker object (recovery after a restart)
            self.prepare(submission)
            data = self._payloads.pop(submission.id)
        model = submission.note["model"]
        client = self._client(model)
        file_id = self._uploaded(client, submission)
        if file_id is None:
            file_id = _call(client.files.create, file=(_file_name(submission), data),
                            purpose="batch").id
            self.note(submission, input_file_id=file_id, uploaded_sha256=submission.note["sha256"])
        # No SDK retries here: a retried create whose first try did reach the server would
        # make a second batch. A failure leaves the claim to recovery, which calls find().
        batch = _call(client.with_options(max_retries=0).batches.create,
                      input_file_id=file_id, endpoint=CHAT_ENDPOINT,
                      completion_window=self.completion_window,
                      metadata={"bf_submission": submission.id,
                                "bf_sha256": submission.note["sha256"][:64]})
        return _handle(batch, model)

    def _uploaded(self, client: Any, submission: Submission) -> str | None:
        """The input file an earlier, crashed attempt of this submission already uploaded, if
        it holds exactly these jobs and is still there: found by its recorded id or by its
        name (sid and content hash), so a crash during an upload does not upload twice."""
        note = submission.note
        if note.get("input_file_id") and note.get("uploaded_sha256") == note["sha256"]:
            try:
                return _call(client.files.retrieve, note["input_file_id"]).id
            except JobFailure as failure:
                if failure.transient:
                    raise
        if not submission.record.get("recovered"):
            return None  # a first attempt: nothing can have been uploaded yet
        since = float(submission.record.get("created_at") or 0) - FIND_SLACK
        return _call(_file_named, client, _file_name(submission), since)

    def find(self, submission: Submission) -> dict[str, Any] | None:
        model = submission.note.get("model")
        if not model:
            return None  # the claim was never prepared: nothing can have been sent
        return _call(self._find_batch, self._client(model), submission, model)

    @staticmethod
    def _find_batch(client: Any, submission: Submission, model: str) -> dict[str, Any] | None:
        since = float(submission.record.get("created_at") or 0) - FIND_SLACK
        file_id = submission.note.get("input_file_id")
        for batch in client.batches.list(limit=100):  # newest first, pages fetched as needed
            meta = batch.metadata or {}
            if meta.get("bf_submission") == submission.id or (
                    file_id and batch.input_file_id == file_id):
                return _handle(batch, model)
            if batch.created_at < since:
                break
        return None

    # -- polling ---------------------------------------------------------------------------
    def poll(self, submission: Submission) -> Poll:
        handle = submission.handle or {}
        client = self._client(handle["model"])
        batch = _call(client.batches.retrieve, handle["batch_id"])
        counts = batch.request_counts
        done = f" {counts.completed + counts.failed}/{counts.total}" if counts else ""
        state = f"{batch.status}{done} (batch {batch.id})"
        if batch.status not in TERMINAL:
            return Poll(state=state)
        poll = Poll(finished=True, state=state)
        # Output first: an expired or cancelled batch still has the lines it answered.
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                for raw in _call(client.files.content, file_id).content.splitlines():
                    self._read_line(handle["model"], raw, poll)
        if batch.status == "failed":
            poll.rest = _batch_failure(batch)
        return poll

    def _read_line(self, model: str, raw: bytes, poll: Poll) -> None:
        if not raw.strip():
            return
        line = orjson.loads(raw)
        key = line.get("custom_id")
        response, error = line.get("response") or {}, line.get("error") or {}
        if not isinstance(key, str):
            return
        if response.get("status_code") == 200:
            result = self._line_result(model, key, response.get("body"))
            if isinstance(result, JobFailure):
                poll.failed[key] = result
            else:
                poll.done[key] = result
        elif error.get("code") in NOT_RUN:
            return  # never ran: a missing job, submitted again
        elif response.get("status_code"):
            poll.failed[key] = _status_line_failure(response)
        else:
            code = str(error.get("code") or "unknown")
            poll.failed[key] = JobFailure(
                "server" if code in TRANSIENT_CODES else "client",
                f"{code}: {error.get('message') or 'no message'}",
                transient=code in TRANSIENT_CODES)

    def _line_result(self, model: str, key: str, completion: Any) -> Any:
        """(response, usage, cost) for a completion, or a JobFailure for an unusable one."""
        try:
            completion = check_completion(completion, self.allow_truncated)
        except CallFailure as exc:
            usage = _usage(exc.usage) if exc.usage else None
            cost = compute_cost(model, **usage, discount=BATCH_DISCOUNT) if usage else None
            return JobFailure(exc.kind, str(exc), usage=usage, cost_usd=cost, malformed=True)
        usage = _usage(completion.get("usage"))
        cost = compute_cost(model, **usage, discount=BATCH_DISCOUNT)
        response = response_from_completion(completion, {"key": key, "model": model}, cost)
        return response, usage, cost

    # -- the rest ----------------------------------------------------------------------------
    def estimate_cost(self, request: dict[str, Any]) -> float | None:
        return estimate_request_cost(request, BATCH_DISCOUNT)

    def _client(self, model: str) -> Any:
        import openai

        provider: Provider = get_provider(parse_model(model)[1])
        base_url, key = provider.resolve_base_url(), provider.api_key()
        client = self._clients.get((base_url, key))
        if client is None:
            client = openai.OpenAI(api_key=key, base_url=base_url, timeout=self.timeout)
            self._clients[(base_url, key)] = client
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        super().close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_clients"], state["_payloads"] = {}, {}  # clients are per process
        return state


def _local_failure(key: str, failure: JobFailure) -> dict[str, Any]:
    return {"key": key + FAILED_SUFFIX, "status": "failed", "kind": failure.kind,
            "error": str(failure), "attempt": 1, "usage": failure.usage,
            "cost_usd": failure.cost_usd, "ts": round(time.time(), 3), "submission": "local"}


def _line(key: str, request: dict[str, Any]) -> bytes:
    return orjson.dumps({"custom_id": key, "method": "POST", "url": CHAT_ENDPOINT,
                         "body": request_body(request)})


def _file_name(submission: Submission) -> str:
    # The content hash too: a recovery that resubmits only some jobs must not reuse the file.
    return f"{submission.id}-{submission.note['sha256'][:16]}.jsonl"


def _file_named(client: Any, name: str, since: float) -> str | None:
    for f in client.files.list(purpose="batch", order="desc"):  # newest first
        if f.filename == name and f.status != "error":
            return f.id
        if f.created_at < since:
            break
    return None


def _handle(batch: Any, model: str) -> dict[str, Any]:
    return {"batch_id": batch.id, "input_file_id": batch.input_file_id, "model": model}


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the openai client; turn its errors into JobFailures the deferred broker reads."""
    import openai

    try:
        return fn(*args, **kwargs)
    except openai.APITimeoutError as exc:
        raise JobFailure("timeout", f"no answer in time: {exc}", transient=True) from exc
    except openai.APIConnectionError as exc:
        raise JobFailure("connection", f"connection failed: {exc}", transient=True) from exc
    except openai.APIStatusError as exc:
        failure = _status_failure(exc)
        raise JobFailure(failure.kind, str(failure), transient=failure.transient,
                         retry_after=failure.retry_after) from exc


def _status_line_failure(response: dict[str, Any]) -> JobFailure:
    status = int(response["status_code"])
    body = response.get("body") or {}
    inner = body.get("error") if isinstance(body, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    text = f"HTTP {status}: {message or 'no message'}"
    if status == 429:
        return JobFailure("rate_limit", text, transient=True)
    if status >= 500 or status in (408, 409):
        return JobFailure("server", text, transient=True)
    return JobFailure("auth" if status in (401, 403) else "client", text)


def _batch_failure(batch: Any) -> JobFailure:
    """Why a whole batch failed (validation, token limit): the jobs it did not answer fail."""
    errors = list(getattr(batch.errors, "data", None) or [])
    codes = {str(e.code) for e in errors if getattr(e, "code", None)}
    text = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "no reason given"
    transient = bool(codes & TRANSIENT_CODES)
    return JobFailure("server" if transient else "client",
                      f"batch {batch.id} failed: {text}", transient=transient)
