"""Provider faults across many concurrent requests (tests/brokers and tests/op cover single
requests): a 429 storm with Retry-After that cools every worker down, and a mix of every fault
kind under each failure behaviour, with every attempt counted and its usage recorded."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

import batchfactory_dagster as bf
from batchfactory_dagster.brokers.base import FAILED_SUFFIX
from batchfactory_dagster.op import *

MODEL = "gpt-4o-mini@openai"
CHAT = "/v1/chat/completions"


def make(path: Path, n: int, behaviour: str = "stay", **broker_kw):
    broker_kw.setdefault("backoff_base", 0.01)
    broker = bf.brokers.ConcurrentLLMCallBroker(str(path), **broker_kw)
    g = (FromList([{"n": i} for i in range(n)])
         | GenerateLLMRequest("Say something about {n}.", model=MODEL)
         | ConcurrentLLMCall(broker, failure_behavior=behaviour)
         | ExtractResponseText())
    return g, broker


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chat_log(server) -> list[dict]:
    return [r for r in server.requests if r["path"] == CHAT]


def test_429_storm_on_many_concurrent_requests_cools_every_worker_down(fake_openai, tmp_path):
    """20 requests in flight all get 429 with Retry-After 0.4 s: nobody, not even the 20 jobs
    still queued, sends anything until the pause is over; every attempt is counted and kept."""
    n, storm, pause = 40, 20, 0.4
    fake_openai.set_script("gpt-4o-mini", [(429, pause)] * storm)
    path = tmp_path / "llm.jsonl"
    g, broker = make(path, n, concurrency=storm)
    try:
        result = g.execute()
    finally:
        broker.close()
    assert len(result) == n and not result.held
    c = result.calls
    assert (c.attempts, c.new_calls, c.failed) == (n + storm, n, 0)
    log = chat_log(fake_openai)
    assert len(log) == n + storm and fake_openai.count(status=429) == storm
    first_429 = min(r["answered_at"] for r in log if r["status"] == 429)
    # The first wave (all 20 workers) got the 429s; every other request, retries and the 20
    # jobs still queued alike, waited out the server's Retry-After after the first 429.
    later = [r["time"] - first_429 for r in log if r["status"] == 200]
    assert len(later) == n and min(later) >= pause - 0.03, min(later)
    recs = lines(path)
    failed = [r for r in recs if r["key"].endswith(FAILED_SUFFIX)]
    assert len(failed) == storm and {r["kind"] for r in failed} == {"rate_limit"}
    assert all(r["attempt"] == 1 and r["usage"] is None and "429" in r["error"] for r in failed)
    done = [r for r in recs if r.get("status") == "done"]
    assert len(done) == n and Counter(r["attempt"] for r in done) == {1: n - storm, 2: storm}
    print(f"\n429 storm: {storm} x 429 (Retry-After {pause}s) on {n} prompts -> {len(log)} "
          f"requests, {c.attempts} attempts, first request after the storm "
          f"{min(later):.3f}s after the first 429, {len(failed)} #failed records")


# One of each fault, consumed by the first wave of 8 concurrent requests.
MIXED = ["reset", 500, ("slow", 2.0), "bad_json", "empty_choices", "length", 502, "reset"]
TRANSIENT = {"connection": 2, "server": 2, "timeout": 1}
MALFORMED = {"bad_response": 1, "empty_choices": 1, "length": 1}


@pytest.mark.parametrize("behaviour", ["retry", "stay", "emit"])
def test_every_fault_kind_at_once_follows_the_failure_behaviour(fake_openai, tmp_path,
                                                                behaviour):
    """Resets, 5xx, a timeout, bad JSON, empty choices and a cut-off answer hit 8 concurrent
    requests. Transient faults are retried in every mode; malformed answers are retried under
    RETRY, held back under STAY, passed on as failed under EMIT. Every attempt is counted, and
    the usage and cost of every attempt (billed or not) is in the ledger and in CallStats."""
    n = 30
    fake_openai.set_script("gpt-4o-mini", MIXED)
    path = tmp_path / "llm.jsonl"
    g, broker = make(path, n, behaviour, concurrency=len(MIXED), timeout=0.3)
    try:
        result = g.execute()
    finally:
        broker.close()
    c = result.calls
    retried = sum(TRANSIENT.values()) + (sum(MALFORMED.values()) if behaviour == "retry" else 0)
    given_up = 0 if behaviour == "retry" else sum(MALFORMED.values())
    assert fake_openai.count() == n + retried == c.attempts
    assert c.new_calls == n - given_up and c.failed == given_up

    recs = lines(path)
    failed = [r for r in recs if r["key"].endswith(FAILED_SUFFIX)]
    assert Counter(r["kind"] for r in failed) == {**TRANSIENT, **MALFORMED}
    billed = [r for r in failed if r["usage"]]
    assert {r["kind"] for r in billed} == {"empty_choices", "length"}  # the ones with usage
    assert all(r["cost_usd"] > 0 for r in billed)
    done = [r for r in recs if r.get("status") == "done"]
    assert len(done) == n - given_up
    tokens = sum(r["response"]["usage"]["prompt_tokens"] + r["response"]["usage"]
                 ["completion_tokens"] for r in done)
    tokens += sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] for r in billed)
    assert c.total_tokens == tokens
    assert c.cost_usd == pytest.approx(sum(r["cost_usd"] for r in done + billed))

    texts = [e.data.get("text") for e in result]
    if behaviour == "retry":
        assert len(result) == n and not result.held and None not in texts
    elif behaviour == "stay":
        assert len(result) == n - given_up and len(result.held) == given_up
        reasons = " ".join(h.reason for h in result.held)
        assert all(kind in reasons for kind in MALFORMED) and "next run" in reasons
    else:
        assert len(result) == n and not result.held
        errors = sorted(e.data["error"].split(":")[0] for e in result if e.data["status"] ==
                        "failed")
        assert errors == sorted(MALFORMED) and texts.count(None) == given_up
    print(f"\n{behaviour}: {len(MIXED)} faults on {n} prompts -> {c.attempts} attempts, "
          f"{c.new_calls} answers, {c.failed} failed, {len(result.held)} held, {len(failed)} "
          f"#failed records ({len(billed)} with usage), {c.total_tokens} tokens, "
          f"${c.cost_usd:.6f}")

    if behaviour == "stay":  # the held entries are retried, and only they, on the next run
        before = fake_openai.count()
        g2, broker2 = make(path, n, behaviour)
        try:
            again = g2.execute()
        finally:
            broker2.close()
        assert len(again) == n and not again.held
        assert again.calls.new_calls == given_up and fake_openai.count() == before + given_up


def test_faults_under_dagster_show_in_metadata_and_the_held_back_check(fake_openai, tmp_path):
    """The same counts reach a materialisation's metadata; the asset check flags held entries."""
    from batchfactory_dagster.dagster import bf_resources, build_graph_asset, build_held_back_check

    fake_openai.set_script("gpt-4o-mini", [(429, 0.05), 500, "empty_choices", "length"])
    broker = bf.brokers.ConcurrentLLMCallBroker(str(tmp_path / "llm.jsonl"), concurrency=4,
                                                backoff_base=0.01)

    @dg.asset
    def numbers() -> list[dict]:
        return [{"n": i} for i in range(10)]

    asset = build_graph_asset(GenerateLLMRequest("Say something about {n}.", model=MODEL)
                              | ConcurrentLLMCall(broker) | ExtractResponseText(),
                              "said", upstream="numbers")
    try:
        result = dg.materialize([numbers, asset, build_held_back_check(asset)],
                                resources=bf_resources(str(tmp_path / "assets")))
    finally:
        broker.close()
    assert result.success
    meta = {k: v.value for k, v in result.asset_materializations_for_node("said")[0]
            .metadata.items()}
    assert (meta["bf/attempts"], meta["bf/new_calls"], meta["bf/failed"],
            meta["bf/held_back"]) == (12, 8, 2, 2)
    assert meta["dagster/row_count"] == 8 and fake_openai.count() == 12
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.metadata["held_back"].value == 2


def test_a_server_that_is_down_is_a_connection_error_not_a_timeout(fake_openai, monkeypatch,
                                                                   tmp_path):
    """Nothing listens at the base URL: every attempt fails at once, and the error says the
    connection failed (the openai client's aiohttp transport reports it as a timeout)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nobody listens there
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    path = tmp_path / "llm.jsonl"
    g, broker = make(path, 2, "emit", max_attempts=2, timeout=30)
    try:
        result = g.execute()
    finally:
        broker.close()
    assert result.calls.attempts == 4 and result.calls.failed == 2
    for e in result:
        assert e.data["status"] == "failed"
        assert e.data["error"].startswith("connection: connection failed: ")
        assert "ConnectionRefusedError" in e.data["error"] and str(port) in e.data["error"]
    kinds = [r["kind"] for r in lines(path)]
    assert kinds == ["connection"] * 4
