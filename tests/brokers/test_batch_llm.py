"""BatchLLMCallBroker against the fake server, through the real openai client."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from typing import Any

import openai
import orjson
import pytest

from batchfactory_dagster.brokers.base import Broker
from batchfactory_dagster.brokers.batch_llm import BatchLLMCallBroker
from batchfactory_dagster.brokers.llm_broker import ConcurrentLLMCallBroker
from batchfactory_dagster.core.context import CallStats
from batchfactory_dagster.llm.models import make_request
from batchfactory_dagster.op import (
    ConcurrentLLMCall,
    ExtractResponseText,
    FromList,
    GenerateLLMRequest,
)
from tests.helpers import ROOT

MODEL = "gpt-4o-mini@openai"


def pipeline(broker: Broker, n: int, behavior: str = "stay") -> Any:
    return (
        FromList([{"topic": f"topic {i}"} for i in range(n)])
        | GenerateLLMRequest("Write one sentence about {topic}.", MODEL)
        | ConcurrentLLMCall(broker, failure_behavior=behavior)
        | ExtractResponseText()
    )


def request(i: int) -> dict[str, Any]:
    """The request pipeline() makes for entry i (to know its key up front)."""
    messages = [{"role": "user", "content": f"Write one sentence about topic {i}."}]
    return make_request(MODEL, messages, {"max_completion_tokens": 4096})


def batch_posts(server: Any) -> list[dict[str, Any]]:
    return [e for e in server.requests if e["method"] == "POST" and e["path"] == "/v1/batches"]


def batch_polls(server: Any) -> int:
    return sum(e["method"] == "GET" and e["path"].startswith("/v1/batches/")
               for e in server.requests)


def input_keys(server: Any, post: dict[str, Any]) -> list[str]:
    """The custom_ids of the input file a batch POST used."""
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
    data = client.files.content(post["body"]["input_file_id"]).content
    client.close()
    return [orjson.loads(line)["custom_id"] for line in data.splitlines()]


KILLED_RUN = """
import sys
sys.path.insert(0, {root!r})
from tests.brokers.test_batch_llm import pipeline
from batchfactory_dagster.brokers.batch_llm import BatchLLMCallBroker
broker = BatchLLMCallBroker({ledger!r}, wait=True, poll_interval=0.1, max_requests_per_batch=400)
pipeline(broker, 1000).compile().execute()
raise SystemExit("the run should have been killed while polling")
"""


def kill_while_polling(fake: Any, ledger: str, polls: int) -> int:
    """Run the pipeline with wait=True in a child; SIGKILL it once it has polled ``polls``
    times more. Returns its exit code."""
    start = batch_polls(fake)
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(root=str(ROOT),
                                                                       ledger=ledger)])
    try:
        deadline = time.monotonic() + 30
        while batch_polls(fake) < start + polls and child.poll() is None:
            assert time.monotonic() < deadline, "the child never polled"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        return child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_thousand_prompts_submit_kill_collect_at_half_price(fake_openai, tmp_path):
    fake_openai.configure(batch_polls_to_complete=20)  # completes at the 22nd poll
    ledger = str(tmp_path / "batch.jsonl")
    first = pipeline(BatchLLMCallBroker(ledger, max_requests_per_batch=400), 1000) \
        .compile().execute()
    assert len(first) == 0 and len(first.held) == 1000 and first.calls.pending == 1000
    assert len(batch_posts(fake_openai)) == 3  # 400 + 400 + 200
    assert first.calls.estimated_cost_usd > 0

    assert kill_while_polling(fake_openai, ledger, polls=6) == -signal.SIGKILL
    assert len(batch_posts(fake_openai)) == 3

    broker = BatchLLMCallBroker(ledger, wait=True, poll_interval=0.005,
                                max_requests_per_batch=400)
    last = pipeline(broker, 1000).compile().execute()
    assert len(last) == 1000 and not last.held
    assert len(batch_posts(fake_openai)) == 3  # nothing submitted again
    assert fake_openai.count("/v1/files") == 3 and fake_openai.count() == 0  # no chat calls
    assert last.calls.new_calls == 1000 and last.calls.failed == 0

    immediate = pipeline(ConcurrentLLMCallBroker(str(tmp_path / "now.jsonl")), 1000) \
        .compile().execute()
    assert last.calls.cost_usd == pytest.approx(immediate.calls.cost_usd / 2, rel=1e-9)
    assert last.calls.total_tokens == immediate.calls.total_tokens
    assert [e.data["text"] for e in last] == [e.data["text"] for e in immediate]


def test_expired_batch_keeps_answers_and_resubmits_only_the_rest(fake_openai, tmp_path):
    fake_openai.configure(batch_polls_to_complete=0, batch_expire_after=6)
    broker = BatchLLMCallBroker(str(tmp_path / "l.jsonl"), poll_interval=0.005)
    pipe = pipeline(broker, 10).compile()
    assert len(pipe.execute()) == 0
    second = pipe.execute()  # the batch expired after 6 lines
    assert len(second) == 6 and len(second.held) == 4 and second.calls.new_calls == 6
    posts = batch_posts(fake_openai)
    assert len(posts) == 2
    kept = {e.data["job_idx"] for e in second}
    assert set(input_keys(fake_openai, posts[1])) == {request(i)["key"] for i in range(10)} - kept

    fake_openai.configure(batch_expire_after=None)
    broker.wait = True
    third = pipe.execute()
    assert len(third) == 10 and third.calls.new_calls == 4 and third.calls.cache_hits == 6
    assert len(batch_posts(fake_openai)) == 2


@pytest.mark.parametrize("behavior", ["stay", "emit"])
def test_error_lines_follow_the_failure_behavior(fake_openai, tmp_path, behavior):
    bad = {request(1)["key"], request(3)["key"]}
    fake_openai.configure(batch_polls_to_complete=0, batch_fail_custom_ids=sorted(bad),
                          batch_fail_status=400)
    broker = BatchLLMCallBroker(str(tmp_path / "l.jsonl"), wait=True, poll_interval=0.005)
    pipe = pipeline(broker, 5, behavior).compile()
    res = pipe.execute()
    assert res.calls.failed == 2 and res.calls.new_calls == 3
    if behavior == "stay":
        assert len(res) == 3 and len(res.held) == 2
        assert "HTTP 400" in res.held[0].reason
    else:
        failed = [e for e in res if e.data["status"] == "failed"]
        assert len(res) == 5 and {e.data["job_idx"] for e in failed} == bad
        assert all(e.data["text"] is None and "HTTP 400" in e.data["error"] for e in failed)
    fake_openai.configure(batch_fail_custom_ids=None)
    again = pipe.execute()  # the next run retries exactly the failed two
    assert [e.data["status"] for e in again] == ["done"] * 5
    posts = batch_posts(fake_openai)
    assert len(posts) == 2 and set(input_keys(fake_openai, posts[1])) == bad


def test_transient_error_lines_are_resubmitted_then_fail(fake_openai, tmp_path):
    bad = request(0)["key"]
    fake_openai.configure(batch_polls_to_complete=0, batch_fail_custom_ids=[bad])
    broker = BatchLLMCallBroker(str(tmp_path / "l.jsonl"), wait=True, poll_interval=0.005,
                                max_attempts=2)
    stats = CallStats()
    res = broker.run([request(0), request(1)], stats=stats)
    assert [r.status for r in res] == ["failed", "done"]
    assert res[0].error.startswith("server: server_error")
    posts = batch_posts(fake_openai)
    assert len(posts) == 2 and input_keys(fake_openai, posts[1]) == [bad]
    assert stats.attempts == 3 and stats.failed == 1


def test_the_same_op_runs_on_either_broker(fake_openai, tmp_path):
    now = pipeline(ConcurrentLLMCallBroker(str(tmp_path / "a.jsonl")), 8).compile().execute()
    chat_calls = fake_openai.count()
    later = pipeline(BatchLLMCallBroker(str(tmp_path / "b.jsonl"), wait=True,
                                        poll_interval=0.005), 8).compile().execute()
    assert chat_calls == 8 and fake_openai.count() == 8  # the batch run made no chat calls
    assert [e.data["text"] for e in later] == [e.data["text"] for e in now]
    assert later.calls.cost_usd == pytest.approx(now.calls.cost_usd / 2)


def test_splits_by_bytes_one_model_per_batch(fake_openai, tmp_path):
    broker = BatchLLMCallBroker(str(tmp_path / "l.jsonl"), max_bytes_per_batch=1000)
    other = make_request("gpt-4.1-nano@openai", [{"role": "user", "content": "hi"}])
    broker.run([request(i) for i in range(12)] + [other])
    uploads = [e["body"]["bytes"] for e in fake_openai.requests if e["path"] == "/v1/files"]
    assert len(uploads) >= 4 and max(uploads) <= 1000
    models = [{line for line in input_keys(fake_openai, p)} for p in batch_posts(fake_openai)]
    assert sum(len(m) for m in models) == 13 and {other["key"]} in models


CRASH_AFTER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import openai.resources.{module} as mod
from batchfactory_dagster.brokers.batch_llm import BatchLLMCallBroker
from tests.brokers.test_batch_llm import request
real = mod.{cls}.create
def create(self, *args, **kwargs):
    real(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # it exists out there; its id is not recorded
mod.{cls}.create = create
BatchLLMCallBroker({ledger!r}).run([request(i) for i in range(3)])
"""


@pytest.mark.parametrize("module,cls", [("files", "Files"), ("batches", "Batches")])
def test_a_crash_after_upload_or_create_is_recovered_without_resending(fake_openai, tmp_path,
                                                                      module, cls):
    ledger = str(tmp_path / "l.jsonl")
    script = CRASH_AFTER.format(root=str(ROOT), module=module, cls=cls, ledger=ledger)
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    broker = BatchLLMCallBroker(ledger, wait=True, poll_interval=0.005)
    res = broker.run([request(i) for i in range(3)])
    assert [r.status for r in res] == ["done"] * 3
    # Found by its metadata (or its recorded upload), never created or uploaded twice.
    assert len(batch_posts(fake_openai)) == 1
    assert sum(e["method"] == "POST" for e in fake_openai.requests
               if e["path"] == "/v1/files") == 1


def test_lost_create_response_is_recovered_in_the_same_run(fake_openai, tmp_path, monkeypatch):
    import openai.resources.batches as rb

    real, calls = rb.Batches.create, []

    def create(self: Any, *args: Any, **kwargs: Any) -> Any:
        real(self, *args, **kwargs)
        calls.append(1)
        raise openai.APIConnectionError(request=None)  # the answer never arrived

    monkeypatch.setattr(rb.Batches, "create", create)
    fake_openai.configure(batch_polls_to_complete=0)
    broker = BatchLLMCallBroker(str(tmp_path / "l.jsonl"), wait=True, poll_interval=0.005)
    res = broker.run([request(0), request(1)])
    assert [r.status for r in res] == ["done", "done"]
    assert len(calls) == 1 and len(batch_posts(fake_openai)) == 1


def test_local_provider_answers_in_process_for_free(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHFACTORY_OFFLINE", "1")  # every model goes to @local
    broker = BatchLLMCallBroker(str(tmp_path / "l.jsonl"))
    res = pipeline(broker, 4).compile().execute()
    assert len(res) == 4 and res.calls.new_calls == 4 and res.calls.cost_usd == 0.0
    assert all(e.data["text"].startswith("[synthetic]") for e in res)
    assert pipeline(broker, 4).compile().execute().calls.cache_hits == 4


def test_local_truncated_answers_fail_and_the_broker_pickles(tmp_path):
    broker = BatchLLMCallBroker(str(tmp_path / "l.jsonl"))
    short = make_request("m@local", [{"role": "user", "content": "Write ten sentences."}],
                         {"max_completion_tokens": 2})
    stats = CallStats()
    assert broker.run([short], stats=stats)[0].error.startswith("length:")
    assert stats.failed == 1
    copy = pickle.loads(pickle.dumps(broker))
    assert copy.run([request(0) | {"model": "gpt-4o-mini@local", "key": "k"}])[0].cached is False


def test_missing_key_fails_before_submitting(tmp_path):
    from batchfactory_dagster.core.errors import ConfigError

    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        BatchLLMCallBroker(str(tmp_path / "l.jsonl")).run([request(0)])
