"""Brokers: engines for expensive jobs (LLM calls, searches, human labels).

A job is a JSON-able request with a content key. The broker answers each distinct key once:
results live in an append-only ledger, duplicates within a batch share one call, and a re-run
serves what it already paid for. Subclass :class:`ImmediateBroker` (call and wait) or
:class:`~batchfactory_dagster.brokers.deferred.DeferredBroker` (submit now, collect later) and implement one method.

Ledger records (one JSON line each)::

    {"key": K, "status": "done", "request": {...}, "response": {...}, "attempt": 2, "ts": ...}
    {"key": K + "#failed", "status": "failed", "kind": "rate_limit", "error": "...", ...}

Failed attempts are kept under their own key, so they are recorded (with their usage and cost)
but can never shadow or be served as an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..core.context import CallStats
from ..core.errors import ConfigError
from ..core.hashing import content_hash
from ..core.ledger import Ledger, open_ledger
from ._loop import LoopThread
from ._progress import Progress

__all__ = [
    "Broker", "BrokerFailureBehavior", "ImmediateBroker", "JobFailure", "JobResult", "Outcome",
]

FAILED_SUFFIX = "#failed"


class BrokerFailureBehavior(enum.StrEnum):
    """What a broker op does with a job that failed for good in this run.

    RETRY: also retry malformed answers (bad JSON, empty, truncated), then hold back.
    STAY: hold the entry back and report it; the next run tries again.
    EMIT: pass the entry on with status "failed" and the error.
    Transient errors (429, 5xx, timeouts, resets) are retried in every mode.
    """

    RETRY = "retry"
    STAY = "stay"
    EMIT = "emit"


class JobFailure(Exception):
    """Raised by ``ImmediateBroker.call`` for one failed attempt."""

    def __init__(self, kind: str, message: str, *, transient: bool = False,
                 retry_after: float | None = None, usage: dict[str, int] | None = None,
                 cost_usd: float | None = None, malformed: bool = False) -> None:
        super().__init__(message)
        self.kind, self.transient, self.retry_after = kind, transient, retry_after
        self.usage, self.cost_usd, self.malformed = usage, cost_usd, malformed


@dataclass
class JobResult:
    key: str
    status: str  # "done", "failed" or "pending"
    response: dict[str, Any] | None = None
    error: str | None = None
    cached: bool = False


@dataclass
class Outcome:
    """What one dispatch gave for one key: status "done", "failed" or "pending"."""

    status: str
    response: dict[str, Any] | None = None
    error: str | None = None


class Broker(ABC):
    """Content-addressed job store plus dispatch. ``run()`` is the one entry point ops use."""

    def __init__(self, cache_path: str | None = None) -> None:
        self.cache_path = None if cache_path is None else str(cache_path)
        self._ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = open_ledger(self.cache_path)
        return self._ledger

    def key_of(self, request: dict[str, Any]) -> str:
        return request.get("key") or content_hash(request)

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The done record for ``key``, if this or any earlier run paid for it."""
        rec = self.ledger.get(key)
        return rec if rec is not None and rec.get("status") == "done" else None

    def last_failure(self, key: str) -> dict[str, Any] | None:
        return self.ledger.get(key + FAILED_SUFFIX)

    def run(self, requests: Sequence[dict[str, Any]], *, dispatch: bool = True,
            stats: CallStats | None = None, progress: bool = False,
            retry_malformed: bool = False) -> list[JobResult]:
        """Answer every request (aligned with the input): from the ledger, or by dispatching each
        distinct missing key once. With ``dispatch=False`` nothing is spent: misses are pending."""
        stats = stats if stats is not None else CallStats()
        keys = [self.key_of(r) for r in requests]
        unique: dict[str, dict[str, Any]] = {}
        for k, r in zip(keys, requests):
            unique.setdefault(k, r)
        self.ledger.refresh()
        with _gc_paused():
            hits = {k: rec for k in unique if (rec := self.lookup(k)) is not None}
        missing = {k: r for k, r in unique.items() if k not in hits}
        self._count_lookup(keys, hits, missing, stats)
        if not missing:
            outcomes: dict[str, Outcome] = {}
        elif dispatch:
            self._check_recordable(missing)
            outcomes = self.dispatch(missing, stats, progress, retry_malformed)
        else:
            outcomes = {k: Outcome("pending") for k in missing}
            stats.pending += len(missing)
            stats.estimated_cost_usd = _sum_cost(
                [stats.estimated_cost_usd] + [self.estimate_cost(r) for r in missing.values()])
        with _gc_paused():
            return [self._result(k, hits, outcomes) for k in keys]

    def _check_recordable(self, jobs: dict[str, dict[str, Any]]) -> None:
        """Refuse, before anything is paid for, jobs whose answers could not be recorded: a
        read-only ledger, or a request the ledger cannot store (e.g. a dict with int keys)."""
        self.ledger.check_writable()
        for key, request in jobs.items():
            try:
                orjson.dumps(request)
            except TypeError as exc:
                raise ConfigError(
                    f"request {key[:16]} cannot be recorded in the ledger: it is not "
                    f"JSON-serialisable ({exc}); nothing was sent. Use only str dict keys and "
                    "str, int, float, bool, None, list and dict values") from exc

    def _count_lookup(self, keys: list[str], hits: dict[str, dict], missing: dict[str, Any],
                      stats: CallStats) -> None:
        stats.requests += len(keys)
        # Entries whose request another entry of this batch already asks for: one call serves all.
        stats.deduplicated += sum(1 for k in keys if k in missing) - len(missing)
        for k in keys:
            if k in hits:
                stats.cache_hits += 1
                stats.saved_usd += float(hits[k].get("cost_usd") or 0.0)

    @staticmethod
    def _result(key: str, hits: dict[str, dict], outcomes: dict[str, Outcome]) -> JobResult:
        if key in hits:
            return JobResult(key, "done", hits[key].get("response"), cached=True)
        o = outcomes[key]
        return JobResult(key, o.status, o.response, o.error)

    def estimate_cost(self, request: dict[str, Any]) -> float | None:
        """Rough cost of a request not yet sent (for dispatch_brokers=False reports)."""
        return 0.0

    @abstractmethod
    def dispatch(self, jobs: dict[str, dict[str, Any]], stats: CallStats, progress: bool,
                 retry_malformed: bool) -> dict[str, Outcome]:
        """Get outcomes for missing keys (and write done/failed records to the ledger)."""

    def record_done(self, key: str, request: dict[str, Any], response: dict[str, Any],
                    attempt: int, cost_usd: float | None, **extra: Any) -> None:
        self.ledger.append({"key": key, "status": "done", "request": _strip_key(request),
                            "response": response, "attempt": attempt, "cost_usd": cost_usd,
                            "ts": round(time.time(), 3), **extra})

    def record_failure(self, key: str, failure: JobFailure, attempt: int) -> None:
        self.ledger.append({"key": key + FAILED_SUFFIX, "status": "failed", "kind": failure.kind,
                            "error": str(failure), "attempt": attempt, "usage": failure.usage,
                            "cost_usd": failure.cost_usd, "ts": round(time.time(), 3)})

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ledger"] = None  # reopened lazily in the receiving process
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cache_path={self.cache_path!r})"


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing 100k cached records makes Python's collector rescan memory over and over for
    nothing (they are all kept): pausing it halves a cached re-run (benchmarks/)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _strip_key(request: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k != "key"}


def _sum_cost(costs: list[float | None]) -> float | None:
    return None if any(c is None for c in costs) else float(sum(costs))  # type: ignore[arg-type]


class ImmediateBroker(Broker):
    """Calls jobs concurrently on an event loop it owns, retrying with backoff.

    Subclasses implement ``async call(request) -> (response, usage, cost_usd)`` and raise
    :class:`JobFailure` for a failed attempt.
    """

    def __init__(self, cache_path: str | None = None, *, concurrency: int = 64,
                 max_attempts: int = 5, backoff_base: float = 0.5, backoff_max: float = 30.0
                 ) -> None:
        super().__init__(cache_path)
        for name, value in (("concurrency", concurrency), ("max_attempts", max_attempts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be an int >= 1, got "
                                 f"{value!r}")
        self.concurrency, self.max_attempts = concurrency, max_attempts
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self._loop = LoopThread()

    @abstractmethod
    async def call(self, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int], float | None]:
        """One attempt: return (response, usage, cost_usd) or raise JobFailure."""

    async def before_attempt(self, request: dict[str, Any]) -> None:
        """Wait for rate limits before an attempt (override)."""

    def after_failure(self, failure: JobFailure) -> None:
        """React to a failed attempt, e.g. a global cool-down after a 429 (override)."""

    def dispatch(self, jobs: dict[str, dict[str, Any]], stats: CallStats, progress: bool,
                 retry_malformed: bool) -> dict[str, Outcome]:
        bar = Progress(len(jobs), enabled=progress, desc=type(self).__name__)
        try:
            return self._loop.run(self._dispatch_all(jobs, stats, bar, retry_malformed))
        finally:
            bar.close(stats)

    async def _dispatch_all(self, jobs: dict[str, dict[str, Any]], stats: CallStats,
                            bar: Progress, retry_malformed: bool) -> dict[str, Outcome]:
        queue = list(jobs.items())
        queue.reverse()  # pop() from the end keeps the input order
        outcomes: dict[str, Outcome] = {}

        async def worker() -> None:
            while queue:
                key, request = queue.pop()
                outcomes[key] = await self._run_job(key, request, stats, retry_malformed)
                bar.update(stats)

        tasks = [asyncio.ensure_future(worker())
                 for _ in range(min(self.concurrency, len(jobs)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One worker failed for good (e.g. the ledger cannot be written): stop the others,
            # or they would go on paying for calls in the background after the run has failed.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return outcomes

    async def _run_job(self, key: str, request: dict[str, Any], stats: CallStats,
                       retry_malformed: bool) -> Outcome:
        for attempt in range(1, self.max_attempts + 1):
            await self.before_attempt(request)
            stats.attempts += 1
            try:
                response, usage, cost = await self.call(request)
            except JobFailure as failure:
                self._count_usage(stats, failure.usage, failure.cost_usd)
                self.record_failure(key, failure, attempt)
                self.after_failure(failure)
                retry = failure.transient or (retry_malformed and failure.malformed)
                if not retry or attempt == self.max_attempts:
                    stats.failed += 1
                    return Outcome("failed", error=f"{failure.kind}: {failure}")
                await asyncio.sleep(self.backoff(attempt, failure.retry_after))
                continue
            stats.new_calls += 1
            stats.models.add(str(request.get("model", "")))
            self._count_usage(stats, usage, cost)
            self.record_done(key, request, response, attempt, cost)
            return Outcome("done", response)
        raise AssertionError("unreachable")

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter; never shorter than the server's Retry-After."""
        delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        delay *= random.uniform(0.5, 1.0)
        return max(delay, retry_after or 0.0)

    @staticmethod
    def _count_usage(stats: CallStats, usage: dict[str, int] | None, cost: float | None) -> None:
        if usage:
            stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        if cost is None and usage:
            stats.unpriced_calls += 1
            stats.cost_usd = None
        elif cost is not None and stats.cost_usd is not None:
            stats.cost_usd += cost

    def close(self) -> None:
        self._loop.close()
        super().close()
