"""DeferredBroker: submit once, collect later, never submit twice, even across crashes."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from batchfactory_dagster.brokers.base import JobFailure
from batchfactory_dagster.brokers.deferred import (
    JOB_SUFFIX,
    SUBMISSION_PREFIX,
    DeferredBroker,
    Poll,
    Submission,
)
from batchfactory_dagster.core.context import CallStats
from batchfactory_dagster.op import FromList
from batchfactory_dagster.op.broker_call import BrokerCall
from tests.helpers import load_example


class Remote:
    """A slow outside service: it answers a submission when told to (``finish``)."""

    def __init__(self) -> None:
        self.submissions: dict[str, dict[str, Any]] = {}
        self.answers: dict[str, Any] = {}  # key -> answer, or JobFailure
        self.finished: set[str] = set()
        self.polls = 0

    def finish(self, answer: Any = None, **special: Any) -> None:
        for sid, jobs in self.submissions.items():
            self.finished.add(sid)
            for key, job in jobs.items():
                self.answers.setdefault(key, special.get(job["q"], answer or {"a": job["q"]}))


class Crash(BaseException):
    """Stands in for the process dying (not an Exception: nothing may catch it)."""


class RemoteBroker(DeferredBroker):
    def __init__(self, path: Any, remote: Remote, *, crash_after_submit: bool = False,
                 with_find: bool = True, **kwargs: Any) -> None:
        super().__init__(None if path is None else str(path), **kwargs)
        self.remote, self.crash_after_submit, self.with_find = remote, crash_after_submit, with_find

    def submit(self, submission: Submission) -> dict[str, Any]:
        self.remote.submissions[submission.id] = dict(submission.jobs)
        if self.crash_after_submit:
            raise Crash
        return {"id": submission.id}

    def find(self, submission: Submission) -> dict[str, Any] | None:
        found = self.with_find and submission.id in self.remote.submissions
        return {"id": submission.id} if found else None

    def poll(self, submission: Submission) -> Poll:
        self.remote.polls += 1
        sid = submission.handle["id"]
        poll = Poll(finished=sid in self.remote.finished, state="queued")
        for key in self.remote.submissions[sid]:
            answer = self.remote.answers.get(key)
            if isinstance(answer, JobFailure):
                poll.failed[key] = answer
            elif answer is not None:
                poll.done[key] = (answer, {"prompt_tokens": 3, "completion_tokens": 2}, 0.25)
        return poll


def jobs(*qs: str) -> list[dict[str, Any]]:
    return [{"q": q} for q in qs]


def test_submit_once_then_collect(tmp_path):
    remote = Remote()
    broker = RemoteBroker(tmp_path / "l.jsonl", remote)
    stats = CallStats()
    first = broker.run(jobs("a", "b", "a"), stats=stats)
    assert [r.status for r in first] == ["pending"] * 3
    assert "submitted as bfsub_" in first[0].error
    assert (stats.pending, stats.deduplicated, stats.new_calls) == (2, 1, 0)
    assert broker.run(jobs("a", "b"))[0].status == "pending"  # polled, not submitted again
    assert len(remote.submissions) == 1 and remote.polls == 1
    remote.finish()
    stats = CallStats()
    done = broker.run(jobs("a", "b"), stats=stats)
    assert [r.response for r in done] == [{"a": "a"}, {"a": "b"}]
    assert (stats.new_calls, stats.total_tokens, stats.cost_usd, stats.pending) == (2, 10, 0.5, 0)
    again = RemoteBroker(tmp_path / "l.jsonl", remote).run(jobs("a", "b"))
    assert all(r.cached for r in again) and len(remote.submissions) == 1


def test_crash_between_submit_and_record_never_submits_twice(tmp_path):
    remote = Remote()
    with pytest.raises(Crash):
        RemoteBroker(tmp_path / "l.jsonl", remote, crash_after_submit=True).run(jobs("a", "b"))
    assert len(remote.submissions) == 1
    broker = RemoteBroker(tmp_path / "l.jsonl", remote)
    assert [r.status for r in broker.run(jobs("a", "b"))] == ["pending"] * 2
    assert len(remote.submissions) == 1  # found by its id, not sent again
    sid = next(iter(remote.submissions))
    assert broker.ledger.get(SUBMISSION_PREFIX + sid)["status"] == "submitted"
    remote.finish()
    assert [r.status for r in broker.run(jobs("a", "b"))] == ["done"] * 2


def test_crash_before_submit_submits_on_recovery(tmp_path):
    class DiesBeforeSending(RemoteBroker):
        def submit(self, submission: Submission) -> dict[str, Any]:
            raise Crash

    with pytest.raises(Crash):
        DiesBeforeSending(tmp_path / "l.jsonl", Remote()).run(jobs("a"))
    remote = Remote()
    broker = RemoteBroker(tmp_path / "l.jsonl", remote)
    assert broker.run(jobs("a"))[0].status == "pending"
    assert len(remote.submissions) == 1
    record = broker.ledger.get(SUBMISSION_PREFIX + next(iter(remote.submissions)))
    assert record["recovered"] == 1  # the same submission id, taken over


def test_a_live_claim_of_another_process_is_left_alone(tmp_path):
    path = tmp_path / "l.jsonl"
    with pytest.raises(Crash):
        RemoteBroker(path, Remote(), crash_after_submit=True).run(jobs("a"))
    broker = RemoteBroker(path, Remote())  # a Remote without the crashed submission
    sid = broker.ledger.get(broker.key_of({"q": "a"}) + JOB_SUFFIX)["submission"]
    claim = broker.ledger.get(SUBMISSION_PREFIX + sid)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        broker.ledger.append({**claim, "owner": {**claim["owner"], "pid": other.pid}})
        res = broker.run(jobs("a"))[0]
        assert res.status == "pending" and "another process" in res.error
        assert broker.remote.submissions == {}
    finally:
        other.kill()
        other.wait()
    assert broker.run(jobs("a"))[0].status == "pending"  # its owner died: recovered
    assert list(broker.remote.submissions) == [sid]  # not found outside, so sent (same id)
    assert broker.ledger.get(SUBMISSION_PREFIX + sid)["status"] == "submitted"


def test_missing_jobs_of_a_finished_submission_are_resubmitted_alone():
    remote = Remote()
    broker = RemoteBroker(None, remote)
    broker.run(jobs("a", "b", "c"))
    (sid,) = remote.submissions
    remote.finished.add(sid)
    remote.answers[broker.key_of({"q": "a"})] = {"a": "A"}  # b and c expired unanswered
    res = broker.run(jobs("a", "b", "c"))
    assert [r.status for r in res] == ["done", "pending", "pending"]
    assert len(remote.submissions) == 2
    assert sorted(j["q"] for j in remote.submissions[list(remote.submissions)[1]].values()) \
        == ["b", "c"]


@pytest.mark.parametrize("transient,polls", [(False, 1), (True, 2)])
def test_failures_retry_when_transient_then_fail(transient, polls):
    remote = Remote()
    broker = RemoteBroker(None, remote, wait=True, poll_interval=0, max_attempts=2)
    key = broker.key_of({"q": "bad"})
    remote.answers[key] = JobFailure("server" if transient else "client", "no", transient=transient)

    def finish_on_poll(submission: Submission) -> Poll:
        remote.finish()
        return RemoteBroker.poll(broker, submission)

    broker.poll = finish_on_poll  # type: ignore[method-assign]
    stats = CallStats()
    res = broker.run(jobs("ok", "bad"), stats=stats)
    assert [r.status for r in res] == ["done", "failed"]
    assert res[1].error.endswith(": no") and stats.failed == 1
    assert len(remote.submissions) == polls  # transient: submitted once more, alone
    # The next run tries the failed job again (STAY semantics), in a new submission.
    assert broker.run(jobs("bad"))[0].status == "failed"
    assert len(remote.submissions) == polls * 2


def test_wait_polls_until_done_or_max_wait():
    remote = Remote()
    broker = RemoteBroker(None, remote, wait=True, poll_interval=0.01, max_wait=0.1)
    res = broker.run(jobs("a"))
    assert res[0].status == "pending" and remote.polls >= 3
    broker.poll_interval, broker.max_wait = 0.01, None
    original = broker.poll

    def finish_later(submission: Submission) -> Poll:
        if remote.polls >= 5:
            remote.finish()
        return original(submission)

    broker.poll = finish_later  # type: ignore[method-assign]
    assert broker.run(jobs("a"))[0].response == {"a": "a"}


def test_dispatch_false_submits_nothing():
    remote = Remote()
    stats = CallStats()
    res = RemoteBroker(None, remote).run(jobs("a"), dispatch=False, stats=stats)
    assert res[0].status == "pending" and remote.submissions == {} and stats.pending == 1


@pytest.mark.parametrize("behavior", ["stay", "emit"])
def test_broker_call_op_holds_pending_and_applies_failure_behavior(behavior):
    remote = Remote()
    broker = RemoteBroker(None, remote)
    pipe = FromList(["x", "y"], output_field="q") | BrokerCall(
        broker, "q", "answer", failure_behavior=behavior)
    first = pipe.compile().execute()
    assert len(first) == 0 and len(first.held) == 2
    assert "submitted as" in first.held[0].reason
    remote.finish(y=JobFailure("skipped", "unreadable"))
    second = pipe.compile().execute()
    if behavior == "stay":
        assert [e.data["answer"] for e in second] == [{"a": "x"}]
        assert "skipped: unreadable" in second.held[0].reason
    else:
        assert [(e.data["status"], e.data.get("error")) for e in second] == [
            ("done", None), ("failed", "skipped: unreadable")]


def test_custom_broker_example_runs(tmp_path, capsys):
    first, second = load_example("06_custom_broker").main(str(tmp_path))
    assert len(first) == 0 and len(first.held) == 4
    assert [e.data["label"] for e in second] == ["positive", "negative", "neutral", "positive"]
    assert "positive: I love this kettle" in capsys.readouterr().out
