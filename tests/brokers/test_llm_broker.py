"""ConcurrentLLMCallBroker against the loopback fake server, through the real openai client:
retries, the ledger of every attempt, pacing, cool-downs, timeouts."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from batchfactory_dagster.brokers import ConcurrentLLMCallBroker
from batchfactory_dagster.brokers.base import FAILED_SUFFIX
from batchfactory_dagster.core.context import CallStats
from batchfactory_dagster.llm import make_request

MODEL = "gpt-4o-mini@openai"


@pytest.fixture
def brokers():
    made: list[ConcurrentLLMCallBroker] = []

    def make(path=None, **kw):
        kw.setdefault("backoff_base", 0.01)
        broker = ConcurrentLLMCallBroker(None if path is None else str(path), **kw)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


def req(text: str, model: str = MODEL, **params) -> dict:
    return make_request(model, [{"role": "user", "content": text}], params)


def ledger_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(broker, requests, **kw):
    stats = CallStats()
    return broker.run(requests, stats=stats, **kw), stats


def test_429_storm_is_retried_and_every_attempt_is_in_the_ledger(fake_openai, tmp_path,
                                                                  brokers):
    fake_openai.set_script("gpt-4o-mini", [(429, 0.05), (429, 0.05), 200])
    path = tmp_path / "ledger.jsonl"
    broker = brokers(path)
    start = time.monotonic()
    (res,), stats = run(broker, [req("storm")])
    assert time.monotonic() - start >= 0.1  # Retry-After (50 ms) honoured twice
    assert res.status == "done" and res.response["content"].startswith("[synthetic]")
    assert stats.attempts == 3 and stats.new_calls == 1 and stats.failed == 0
    assert fake_openai.count() == 3 and fake_openai.count(status=429) == 2
    lines = ledger_lines(path)
    failed = [r for r in lines if r["key"] == res.key + FAILED_SUFFIX]
    done = [r for r in lines if r["key"] == res.key]
    assert [(r["kind"], r["attempt"]) for r in failed] == [("rate_limit", 1), ("rate_limit", 2)]
    assert [(r["status"], r["attempt"]) for r in done] == [("done", 3)]
    assert done[0]["response"]["usage"]["prompt_tokens"] > 0
    assert done[0]["cost_usd"] > 0 and done[0]["request"]["model"] == MODEL


def test_a_429_cools_every_request_down(fake_openai, brokers):
    fake_openai.set_script("gpt-4o-mini", [(429, 0.3)])
    fake_openai.set_script("gpt-4.1-nano", [("slow", 0.1)])
    broker = brokers(concurrency=2)
    jobs = [req("a"), req("b", "gpt-4.1-nano@openai"), req("c", "gpt-4.1-nano@openai")]
    results, _ = run(broker, jobs)  # a and b go first; c follows b, 0.1 s in
    assert [r.status for r in results] == ["done"] * 3
    log = {r["body"]["messages"][0]["content"]: r for r in fake_openai.requests
           if r["status"] == 200}
    rate_limited = next(r for r in fake_openai.requests if r["status"] == 429)
    # c was not rate limited itself, yet it waited out a's Retry-After.
    assert log["c"]["time"] - rate_limited["answered_at"] >= 0.25
    assert log["a"]["time"] - rate_limited["answered_at"] >= 0.25


def test_server_errors_are_retried_within_max_attempts(fake_openai, tmp_path, brokers):
    fake_openai.set_script("gpt-4o-mini", [500, 502, 503])
    path = tmp_path / "ledger.jsonl"
    (res,), stats = run(brokers(path, max_attempts=4), [req("flaky")])
    assert res.status == "done" and stats.attempts == 4 and fake_openai.count() == 4
    kinds = [r.get("kind") for r in ledger_lines(path)]
    assert kinds == ["server", "server", "server", None]


def test_after_max_attempts_the_job_fails_and_a_later_run_retries_it(fake_openai, tmp_path,
                                                                     brokers):
    fake_openai.set_script("gpt-4o-mini", {"forever": 500})
    path = tmp_path / "ledger.jsonl"
    broker = brokers(path, max_attempts=3)
    (res,), stats = run(broker, [req("doomed")])
    assert res.status == "failed" and res.error.startswith("server: HTTP 500")
    assert stats.failed == 1 and stats.attempts == 3 and fake_openai.count() == 3
    assert broker.lookup(res.key) is None  # failures are recorded, never served
    assert broker.last_failure(res.key)["attempt"] == 3
    assert len(ledger_lines(path)) == 3

    fake_openai.set_script("gpt-4o-mini", [])
    (again,), stats = run(brokers(path, max_attempts=3), [req("doomed")])
    assert again.status == "done" and not again.cached and stats.new_calls == 1
    assert fake_openai.count() == 4


def test_usage_of_failed_attempts_is_recorded_and_counted(fake_openai, tmp_path, brokers):
    fake_openai.set_script("gpt-4o-mini", ["length"])  # truncated: billed, but not usable
    path = tmp_path / "ledger.jsonl"
    (res,), stats = run(brokers(path), [req("long story")], retry_malformed=True)
    assert res.status == "done" and stats.attempts == 2
    failed, done = ledger_lines(path)
    assert failed["kind"] == "length" and failed["usage"]["completion_tokens"] > 0
    assert failed["cost_usd"] > 0
    billed = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
                 for r in (failed, done["response"]))
    assert stats.total_tokens == billed
    assert stats.cost_usd == pytest.approx(failed["cost_usd"] + done["cost_usd"])


def test_malformed_answers_are_not_retried_unless_asked(fake_openai, brokers):
    fake_openai.set_script("gpt-4o-mini", ["empty_choices"])
    (res,), stats = run(brokers(), [req("x")])
    assert res.status == "failed" and res.error.startswith("empty_choices")
    assert stats.attempts == 1 and fake_openai.count() == 1


def test_a_timeout_is_retried(fake_openai, tmp_path, brokers):
    fake_openai.set_script("gpt-4o-mini", [("slow", 5.0)])
    path = tmp_path / "ledger.jsonl"
    start = time.monotonic()
    (res,), stats = run(brokers(path, timeout=0.2), [req("slow")])
    assert time.monotonic() - start < 4.0  # did not wait for the slow answer
    assert res.status == "done" and stats.attempts == 2
    assert [r.get("kind") for r in ledger_lines(path)] == ["timeout", None]


def test_a_connection_reset_is_retried_and_auth_errors_are_not(fake_openai, brokers):
    fake_openai.set_script("gpt-4o-mini", ["reset"])
    (res,), stats = run(brokers(), [req("reset")])
    assert res.status == "done" and stats.attempts == 2

    fake_openai.set_script("gpt-4o-mini", [401])
    (res,), stats = run(brokers(), [req("auth")])
    assert res.status == "failed" and "check the API key" in res.error
    assert stats.attempts == 1


def test_rpm_paces_requests_at_the_server(fake_openai, brokers):
    broker = brokers(rpm=300)  # one request every 0.2 s
    start = time.monotonic()
    results, _ = run(broker, [req(f"question {i}") for i in range(12)])
    elapsed = time.monotonic() - start
    assert all(r.status == "done" for r in results)
    assert elapsed >= 2.0
    times = sorted(r["time"] for r in fake_openai.requests)
    assert len(times) == 12
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            window = times[j] - times[i]
            assert j - i + 1 <= math.ceil(window * 5) + 1, (i, j, window)


def test_duplicates_in_one_batch_are_one_call(fake_openai, brokers):
    results, stats = run(brokers(), [req("same"), req("same"), req("other"), req("same")])
    assert fake_openai.count() == 2
    assert [r.key for r in results].count(results[0].key) == 3
    assert stats.deduplicated == 2 and stats.new_calls == 2


def test_no_dispatch_reports_pending_and_an_estimate(fake_openai, brokers):
    results, stats = run(brokers(), [req("a"), req("b")], dispatch=False)
    assert [r.status for r in results] == ["pending", "pending"]
    assert stats.pending == 2 and stats.estimated_cost_usd > 0 and fake_openai.count() == 0
    _, unpriced = run(brokers(), [req("a", model="unknown-model-zz@openai")], dispatch=False)
    assert unpriced.estimated_cost_usd is None


def test_broker_survives_pickling_after_use(fake_openai, tmp_path, brokers):
    import pickle

    broker = brokers(tmp_path / "ledger.jsonl", rpm=6000)
    run(broker, [req("before")])  # now it holds a loop, pacers and an open client
    clone = pickle.loads(pickle.dumps(broker))
    try:
        results, stats = run(clone, [req("before"), req("after")])
    finally:
        clone.close()
    assert [r.status for r in results] == ["done", "done"] and results[0].cached
    assert stats.new_calls == 1 and fake_openai.count() == 2
