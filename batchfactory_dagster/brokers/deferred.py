"""DeferredBroker: submit expensive jobs now, collect their results on a later run.

For work that answers slowly or out of band: a batch API, a search service that queues, people
labelling data. ``dispatch()`` collects what is ready, submits only jobs that were never
submitted (or whose submission finished without them), and reports the rest as pending, so the
op holds those entries back and the next run picks them up. ``wait=True`` polls within one run.

Subclasses implement ``submit`` and ``poll`` (and ideally ``find``, see below).

Ledger records, besides the usual done and ``#failed`` records (which carry ``"submission"``)::

    {"key": "#submission:" + S, "status": "submitting", "note": {...}, "owner": {...},
     "created_at": ..., "claimed_at": ..., "ts": ...}
    {"key": "#submission:" + S, "status": "submitted", "handle": {...}, ...}
    {"key": "#submission:" + S, "status": "closed", "reason": "...", ...}
    {"key": K + "#deferred", "status": "submitted" | "retry" | "failed", "submission": S,
     "attempt": 1, "ts": ...}

Crash safety: the "submitting" record and every job's "#deferred" record are written (one
append, under a lock file beside the ledger) BEFORE the external submit starts. A crash then
leaves a "submitting" record whose owner process is gone; the next run first asks ``find()``
whether the outside world already has submission S (a batch tagged with S) and only submits
again when it does not. So a crash anywhere never submits the same jobs twice, provided
``find()`` is implemented; without it the window between submit and record is at-least-once.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import uuid
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..core.context import CallStats
from ._progress import Progress
from .base import FAILED_SUFFIX, Broker, ImmediateBroker, JobFailure, Outcome, _strip_key, _sum_cost

__all__ = ["JOB_SUFFIX", "SUBMISSION_PREFIX", "DeferredBroker", "Poll", "Submission"]

SUBMISSION_PREFIX = "#submission:"
JOB_SUFFIX = "#deferred"

# Submissions this process is sending right now: a "submitting" record owned by this pid but
# not in this set was left behind by an earlier dispatch that died, and may be recovered.
_IN_FLIGHT: set[str] = set()
_IN_FLIGHT_LOCK = threading.Lock()
# One claim at a time per ledger file within this process (flock orders the processes).
_CLAIM_LOCKS: dict[str | None, threading.Lock] = {}

Done = tuple[Any, dict[str, int] | None, float | None]  # (response, usage, cost_usd)


@dataclass
class Poll:
    """What one look at a submission found.

    done / failed: results for any keys (every result is recorded, paid for is never lost).
    finished: the submission will give nothing more. Its jobs that are in neither dict went
    missing (expired, cancelled) and are resubmitted, unless ``rest`` says they all failed.
    state: a short description for the pending reason, e.g. "in_progress 40/1000".
    """

    done: dict[str, Done] = field(default_factory=dict)
    failed: dict[str, JobFailure] = field(default_factory=dict)
    finished: bool = False
    rest: JobFailure | None = None
    state: str = ""


@dataclass
class Submission:
    """One group of jobs sent together. ``jobs`` holds the requests this run knows about (on
    recovery, only those of the current run); ``record`` is its ledger record."""

    id: str
    jobs: dict[str, dict[str, Any]]
    record: dict[str, Any]

    @property
    def handle(self) -> dict[str, Any] | None:
        return self.record.get("handle")

    @property
    def note(self) -> dict[str, Any]:
        return self.record.get("note") or {}


@dataclass
class _Round:
    """The bookkeeping of one dispatch: outcomes so far and why the others wait."""

    jobs: dict[str, dict[str, Any]]
    stats: CallStats
    retry_malformed: bool
    bar: Progress
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)

    def todo(self) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.jobs.items() if k not in self.outcomes}

    def resolve(self, key: str, outcome: Outcome) -> None:
        if key in self.jobs and key not in self.outcomes:
            self.outcomes[key] = outcome
            self.bar.update(self.stats)


class DeferredBroker(Broker):
    """Submit now, collect later. Implement ``submit``, ``poll`` and (for crash safety) ``find``.

    Args:
        cache_path: the ledger file; None keeps everything in memory (one process only).
        wait: poll within this run until every job is answered (or ``max_wait`` passes)
            instead of reporting them pending.
        poll_interval: seconds between polls when waiting.
        max_wait: seconds to wait at most (None: until done).
        max_attempts: submissions per job for transient failures (and for malformed answers
            under RETRY) before the job is reported failed.
        claim_lease: seconds after which a "submitting" record of a process that cannot be
            checked (another host) is presumed abandoned and recovered.
    """

    def __init__(self, cache_path: str | None = None, *, wait: bool = False,
                 poll_interval: float = 30.0, max_wait: float | None = None,
                 max_attempts: int = 3, claim_lease: float = 900.0) -> None:
        super().__init__(cache_path)
        if max_attempts < 1 or poll_interval < 0:
            raise ValueError("max_attempts must be >= 1 and poll_interval >= 0")
        self.wait, self.poll_interval, self.max_wait = wait, poll_interval, max_wait
        self.max_attempts, self.claim_lease = max_attempts, claim_lease

    # -- the hooks ------------------------------------------------------------------------
    def split(self, jobs: dict[str, dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
        """Group new jobs into submissions (override for size limits); default: one group."""
        return [jobs] if jobs else []

    def prepare(self, submission: Submission) -> dict[str, Any]:
        """JSON-able facts recorded with the claim before ``submit`` runs (e.g. an input hash),
        available to ``find`` after a crash as ``submission.note``."""
        return {}

    @abstractmethod
    def submit(self, submission: Submission) -> dict[str, Any]:
        """Send ``submission.jobs``; return a JSON-able handle for ``poll``. Tag the outside
        object with ``submission.id`` so ``find`` can recognise it. Raise JobFailure on failure
        (transient: retried by recovery; otherwise the jobs fail)."""

    def find(self, submission: Submission) -> dict[str, Any] | None:
        """The handle of submission ``submission.id`` if the outside world already has it (a
        crash came between ``submit`` and its record), else None. Default: None."""
        return None

    @abstractmethod
    def poll(self, submission: Submission) -> Poll:
        """Look at a submitted submission (``submission.handle``); raise a transient JobFailure
        when it cannot be reached right now."""

    def note(self, submission: Submission, **facts: Any) -> None:
        """Record more facts about a submission being sent (e.g. an uploaded file id), so that
        ``find`` can use them after a crash."""
        submission.record = {**submission.record, "note": {**submission.note, **facts},
                             "ts": _now()}
        self.ledger.append(submission.record)

    # -- dispatch -------------------------------------------------------------------------
    def dispatch(self, jobs: dict[str, dict[str, Any]], stats: CallStats, progress: bool,
                 retry_malformed: bool) -> dict[str, Outcome]:
        rnd = _Round(jobs, stats, retry_malformed,
                     Progress(len(jobs), enabled=progress, desc=type(self).__name__))
        deadline = None if self.max_wait is None else time.monotonic() + self.max_wait
        try:
            while True:
                self._round(rnd)
                if not self.wait or not rnd.todo() or (
                        deadline is not None and time.monotonic() + self.poll_interval > deadline):
                    break
                time.sleep(self.poll_interval)
        finally:
            rnd.bar.close()
        self._report_pending(rnd)
        return rnd.outcomes

    def _report_pending(self, rnd: _Round) -> None:
        todo = rnd.todo()
        rnd.stats.pending += len(todo)
        rnd.stats.estimated_cost_usd = _sum_cost(
            [rnd.stats.estimated_cost_usd] + [self.estimate_cost(r) for r in todo.values()])
        for key in todo:
            reason = rnd.waiting.get(key, "submitted; collected on a later run")
            rnd.outcomes[key] = Outcome("pending", error=reason)

    def _round(self, rnd: _Round) -> None:
        """Collect what is ready, then submit what needs submitting."""
        rnd.waiting.clear()
        self.ledger.refresh()
        self._take_done(rnd)
        polls: dict[str, list[str]] = {}
        for key in rnd.todo():
            action, sid, _ = self._state(key)
            if action == "poll":
                polls.setdefault(sid, []).append(key)
        for sid, keys in polls.items():
            self._collect(sid, keys, rnd)
        claims = self._claim(rnd)
        for submission, resumed in claims:
            self._send(submission, resumed, rnd)

    def _take_done(self, rnd: _Round) -> None:
        """Jobs another process finished since run() looked."""
        for key in rnd.todo():
            rec = self.lookup(key)
            if rec is not None:
                rnd.resolve(key, Outcome("done", rec.get("response")))

    def _state(self, key: str) -> tuple[str, str, int]:
        """(action, submission id, attempt): action is poll, busy, recover or fresh."""
        job = self.ledger.get(key + JOB_SUFFIX)
        if job is None or job.get("status") == "failed":
            return "fresh", "", 1
        sid, attempt = str(job.get("submission")), int(job.get("attempt") or 1)
        if job.get("status") == "retry":
            return "fresh", "", attempt + 1
        sub = self.ledger.get(SUBMISSION_PREFIX + sid) or {}
        if sub.get("status") == "submitted":
            return "poll", sid, attempt
        if sub.get("status") == "submitting":
            return ("recover" if self._abandoned(sub) else "busy"), sid, attempt
        # Closed without an answer for this job (expired, cancelled, lost): submit it again.
        return "fresh", "", attempt

    def _abandoned(self, sub: dict[str, Any]) -> bool:
        """Did the process that claimed this submission die before recording its outcome?"""
        owner = sub.get("owner") or {}
        if time.time() - float(sub.get("claimed_at") or 0.0) > self.claim_lease:
            return True
        if owner.get("host") != socket.gethostname():
            return False  # cannot check another machine's processes: wait for the lease
        pid = int(owner.get("pid") or 0)
        if pid == os.getpid():
            with _IN_FLIGHT_LOCK:
                return sub["key"].removeprefix(SUBMISSION_PREFIX) not in _IN_FLIGHT
        return not _pid_alive(pid)

    # -- collecting -----------------------------------------------------------------------
    def _collect(self, sid: str, keys: list[str], rnd: _Round) -> None:
        record = self.ledger.get(SUBMISSION_PREFIX + sid) or {}
        submission = Submission(sid, {k: rnd.jobs[k] for k in keys}, record)
        try:
            poll = self.poll(submission)
        except JobFailure as failure:
            if failure.transient:
                for key in keys:
                    rnd.waiting[key] = f"submission {sid} could not be polled ({failure}); " \
                                       "polled again on a later run"
                return
            # The submission is gone (deleted, unreachable for good): its jobs fail now and
            # are submitted again on a later run.
            poll = Poll(finished=True, rest=failure, state="lost")
        records = self._results(submission, poll, rnd)
        if poll.finished:
            records.append({**record, "status": "closed", "reason": poll.state, "ts": _now()})
        # One append: the results and the close land together or (after a crash) not at all,
        # and a second collection skips what is already recorded.
        self.ledger.append_many(records)
        for key in keys:
            if key not in rnd.outcomes:
                rnd.waiting[key] = f"submission {sid} is {poll.state or 'running'}; " \
                                   "collected on a later run"

    def _results(self, submission: Submission, poll: Poll, rnd: _Round) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for key, (response, usage, cost) in poll.done.items():
            if self.lookup(key) is not None:
                continue  # recorded by an earlier collection that crashed before closing
            job = self.ledger.get(key + JOB_SUFFIX) or {}
            request = rnd.jobs.get(key) or submission.jobs.get(key)
            records.append(self._done_record(key, request, response, job, cost, submission.id))
            rnd.stats.new_calls += 1
            ImmediateBroker._count_usage(rnd.stats, usage, cost)
            rnd.resolve(key, Outcome("done", response))
        failures = dict(poll.failed)
        if poll.finished and poll.rest is not None:
            for key in submission.jobs:
                if key not in poll.done:
                    failures.setdefault(key, poll.rest)
        for key, failure in failures.items():
            records.extend(self._failure(key, failure, submission.id, rnd))
        return records

    def _done_record(self, key: str, request: dict[str, Any] | None, response: Any,
                     job: dict[str, Any], cost: float | None, sid: str) -> dict[str, Any]:
        # The same shape as Broker.record_done, written in bulk with the close record.
        return {"key": key, "status": "done",
                "request": None if request is None else _strip_key(request),
                "response": response, "attempt": int(job.get("attempt") or 1),
                "cost_usd": cost, "ts": _now(), "submission": sid}

    def _failure(self, key: str, failure: JobFailure, sid: str,
                 rnd: _Round) -> list[dict[str, Any]]:
        """Records for a failed job; whether it is retried or reported failed."""
        job = self.ledger.get(key + JOB_SUFFIX) or {}
        if job.get("submission") != sid or job.get("status") != "submitted":
            return []  # an older submission's answer; the job has moved on
        attempt = int(job.get("attempt") or 1)
        ImmediateBroker._count_usage(rnd.stats, failure.usage, failure.cost_usd)
        retry = failure.transient or (rnd.retry_malformed and failure.malformed)
        status = "retry" if retry and attempt < self.max_attempts else "failed"
        if status == "failed" and key in rnd.jobs:
            rnd.stats.failed += 1
            rnd.resolve(key, Outcome("failed", error=f"{failure.kind}: {failure}"))
        return [
            {"key": key + FAILED_SUFFIX, "status": "failed", "kind": failure.kind,
             "error": str(failure), "attempt": attempt, "usage": failure.usage,
             "cost_usd": failure.cost_usd, "ts": _now(), "submission": sid},
            {"key": key + JOB_SUFFIX, "status": status, "submission": sid, "attempt": attempt,
             "error": str(failure), "ts": _now()},
        ]

    # -- submitting -----------------------------------------------------------------------
    def _claim(self, rnd: _Round) -> list[tuple[Submission, bool]]:
        """Under the claim lock: decide what to (re)submit and record the claims first."""
        with self._claim_lock():
            self.ledger.refresh()
            self._take_done(rnd)
            fresh, attempts, recover = self._sort_claims(rnd)
            records: list[dict[str, Any]] = []
            claims = [self._new_claim(group, attempts, records) for group in self.split(fresh)]
            claims += [self._recovery_claim(sid, group, records) for sid, group in recover.items()]
            self.ledger.append_many(records)
            with _IN_FLIGHT_LOCK:
                _IN_FLIGHT.update(s.id for s, _ in claims)
        return claims

    def _sort_claims(self, rnd: _Round) -> tuple[dict, dict[str, int], dict[str, dict]]:
        fresh: dict[str, dict[str, Any]] = {}
        attempts: dict[str, int] = {}
        recover: dict[str, dict[str, dict[str, Any]]] = {}
        for key, request in rnd.todo().items():
            action, sid, attempt = self._state(key)
            if action == "fresh":
                fresh[key], attempts[key] = request, attempt
            elif action == "recover":
                recover.setdefault(sid, {})[key] = request
            elif action == "busy":
                rnd.waiting[key] = f"submission {sid} is being sent by another process"
        return fresh, attempts, recover

    def _new_claim(self, group: dict[str, dict[str, Any]], attempts: dict[str, int],
                   records: list[dict[str, Any]]) -> tuple[Submission, bool]:
        sid = "bfsub_" + uuid.uuid4().hex[:20]
        now = _now()
        submission = Submission(sid, group, {"key": SUBMISSION_PREFIX + sid, "created_at": now})
        submission.record = self._claim_record(submission, now)
        records.append(submission.record)
        records.extend({"key": k + JOB_SUFFIX, "status": "submitted", "submission": sid,
                        "attempt": attempts[k], "ts": now} for k in group)
        return submission, False

    def _recovery_claim(self, sid: str, group: dict[str, dict[str, Any]],
                        records: list[dict[str, Any]]) -> tuple[Submission, bool]:
        # Take over the dead owner's claim; keep its note (uploaded file ids) for find().
        old = self.ledger.get(SUBMISSION_PREFIX + sid) or {"key": SUBMISSION_PREFIX + sid}
        submission = Submission(sid, group, old)
        record = self._claim_record(submission, _now())
        record["note"] = {**(old.get("note") or {}), **record["note"]}
        submission.record = {**record, "recovered": int(old.get("recovered") or 0) + 1}
        records.append(submission.record)
        return submission, True

    def _claim_record(self, submission: Submission, now: float) -> dict[str, Any]:
        return {**submission.record, "status": "submitting", "broker": type(self).__name__,
                "note": self.prepare(submission), "jobs": len(submission.jobs),
                "owner": {"host": socket.gethostname(), "pid": os.getpid()},
                "claimed_at": now, "ts": now}

    def _send(self, submission: Submission, resumed: bool, rnd: _Round) -> None:
        try:
            handle = self.find(submission) if resumed else None
            if handle is None:
                rnd.stats.attempts += len(submission.jobs)
                handle = self.submit(submission)
        except JobFailure as failure:
            self._send_failed(submission, failure, rnd)
        else:
            submission.record = {**submission.record, "status": "submitted", "handle": handle,
                                 "submitted_at": _now(), "ts": _now()}
            self.ledger.append(submission.record)
            for key in submission.jobs:
                rnd.waiting[key] = f"submitted as {submission.id}; collected on a later run"
        finally:
            # Only once the outcome is recorded: until then, a thread of this process that
            # sees the "submitting" claim must wait rather than recover it.
            with _IN_FLIGHT_LOCK:
                _IN_FLIGHT.discard(submission.id)

    def _send_failed(self, submission: Submission, failure: JobFailure, rnd: _Round) -> None:
        if failure.transient:
            # Nothing is known about the outside state: leave the claim for recovery, which
            # looks the submission up before it submits again.
            for key in submission.jobs:
                rnd.waiting[key] = f"submission {submission.id} failed ({failure}); " \
                                   "recovered on a later poll or run"
            return
        poll = Poll(finished=True, rest=failure, state=f"refused: {failure.kind}")
        records = self._results(submission, poll, rnd)
        records.append({**submission.record, "status": "closed", "reason": str(failure),
                        "ts": _now()})
        self.ledger.append_many(records)

    @contextmanager
    def _claim_lock(self) -> Iterator[None]:
        """Only one process decides at a time which jobs to submit (a file lock beside the
        ledger: the ledger's own flock is taken by every append inside the critical section)."""
        path = self.ledger.path
        lock = _CLAIM_LOCKS.setdefault(path, threading.Lock())
        with lock:
            if path is None:
                yield
                return
            fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(cache_path={self.cache_path!r}, wait={self.wait}, "
                f"poll_interval={self.poll_interval})")


def _now() -> float:
    return round(time.time(), 3)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a killed child not yet reaped is a zombie: dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True
