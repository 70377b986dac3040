"""Ledger faults during real broker runs (test_ledger.py covers the ledger on its own).

A full disk or a read-only ledger in the middle of a run, and garbage inside a ledger that a
resumed run then reads: the user gets a LedgerError that names the file and the fix, nothing is
sent that could not be recorded, and every answer already recorded is served on the next run
without a new request.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

import batchfactory_dagster as bf
from batchfactory_dagster.brokers.base import FAILED_SUFFIX
from batchfactory_dagster.core import ledger as ledger_mod
from batchfactory_dagster.core.errors import LedgerError
from batchfactory_dagster.core.ledger import JsonlLedger
from batchfactory_dagster.op import *
from tests.helpers import done_prompts

MODEL = "gpt-4o-mini@openai"


def pipeline(path: Path, n: int, concurrency: int = 4, **broker_kw):
    broker = bf.brokers.ConcurrentLLMCallBroker(str(path), concurrency=concurrency,
                                                backoff_base=0.01, **broker_kw)
    g = (FromList([{"n": i} for i in range(n)])
         | GenerateLLMRequest("Tell me about the number {n}.", model=MODEL)
         | ConcurrentLLMCall(broker)
         | ExtractResponseText())
    return g, broker



def rerun(path: Path, n: int):
    """A fresh pipeline and broker on the same ledger, run once (the resumed run)."""
    g, broker = pipeline(path, n)
    try:
        return g.execute()
    finally:
        broker.close()

def sent_prompts(server) -> list[str]:
    return [r["body"]["messages"][-1]["content"] for r in server.requests
            if r["path"] == "/v1/chat/completions"]


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


WRITE_FAULTS = {
    "ENOSPC": (errno.ENOSPC, "No space left on device", "full disk", "Fix: free disk space"),
    "EROFS": (errno.EROFS, "Read-only file system", "read-only file system",
              "Fix: point the broker at a cache path on a writable disk"),
}


@pytest.mark.parametrize("fault", list(WRITE_FAULTS))
def test_write_fault_mid_run_is_a_clear_error_and_recorded_answers_are_served_next_run(
        fake_openai, tmp_path, monkeypatch, fault):
    """The 13th record cannot be written (a full disk, or the disk remounted read-only; then
    the fault clears): LedgerError naming the file and the fix; no request is sent after it,
    not even in the background; the next run pays only for what was not recorded."""
    code, strerror, what, fix = WRITE_FAULTS[fault]
    n, keep = 40, 12
    path = tmp_path / "cache" / "llm.jsonl"
    fake_openai.configure(latency=0.01)
    real_write = os.write
    writes = {"n": 0}

    def fails_once(fd: int, data) -> int:
        if _fd_path(fd) != str(path):
            return real_write(fd, data)
        writes["n"] += 1
        if writes["n"] == keep + 1:
            real_write(fd, bytes(data[: len(data) // 3]))  # a partial record, then the fault
            raise OSError(code, strerror)
        return real_write(fd, data)

    g, broker = pipeline(path, n)
    monkeypatch.setattr(ledger_mod.os, "write", fails_once)
    try:
        with pytest.raises(LedgerError) as info:
            g.execute()
        # Requests already on the wire when the error struck may reach the server's log a
        # moment later; after that settles, background workers would keep sending.
        time.sleep(0.2)
        sent_at_error = fake_openai.count()
        time.sleep(0.5)
        sent_later = fake_openai.count()
    finally:
        monkeypatch.setattr(ledger_mod.os, "write", real_write)
        broker.close()
    msg = str(info.value)
    assert str(path) in msg and what in msg and fix in msg
    assert sent_later == sent_at_error < n, "requests went on after the run had failed"
    # In flight when the disk filled: answered, but not recordable. At most the concurrency.
    recorded = done_prompts(path)
    assert keep <= len(recorded) <= keep + 3
    lost = [p for p in sent_prompts(fake_openai) if p not in recorded]
    assert 1 <= len(lost) <= 4

    led = JsonlLedger(path)
    assert led.torn_lines == 1 and len(led) == len(recorded)
    led.close()
    again = rerun(path, n)
    assert len(again) == n and not again.held
    assert again.calls.cache_hits == len(recorded)
    assert again.calls.new_calls == n - len(recorded)
    assert fake_openai.count() == sent_later + (n - len(recorded))
    # Nothing recorded before the failure was asked again.
    assert not set(sent_prompts(fake_openai)[sent_later:]) & set(recorded)
    print(f"\n{fault} at record {keep + 1}: LedgerError after {sent_later} requests, "
          f"{len(recorded)} answers recorded, {len(lost)} in flight lost; resume: "
          f"{again.calls.new_calls} new calls, {again.calls.cache_hits} cache hits")


def _deny_writes(path: Path, monkeypatch) -> None:
    """The ledger file becomes read-only (also for root, who ignores mode bits)."""
    path.chmod(0o444)
    real_open = os.open

    def fake_open(p, flags, *args, **kwargs):
        if os.fspath(p) == str(path) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(ledger_mod.os, "open", fake_open)


def test_read_only_ledger_fails_before_any_request_is_sent(fake_openai, tmp_path, monkeypatch):
    """A ledger that cannot be appended to is found out before the first paid call: without
    that, every answer of the run would be paid for and then lost."""
    path = tmp_path / "llm.jsonl"
    g, broker = pipeline(path, 10)
    assert len(g.execute()) == 10
    broker.close()
    assert fake_openai.count() == 10

    with pytest.MonkeyPatch.context() as patch:
        _deny_writes(path, patch)
        g2, broker2 = pipeline(path, 20)  # 10 cached prompts and 10 new ones
        try:
            with pytest.raises(LedgerError, match="read-only") as info:
                g2.execute()
            assert "Fix: give this process write permission" in str(info.value)
            assert str(path) in str(info.value)
            assert fake_openai.count() == 10, "paid for answers that could not be recorded"
            dry = g2.compile().execute(dispatch_brokers=False)  # reading still works
            assert len(dry) == 10 and dry.calls.cache_hits == 10 and dry.calls.pending == 10
        finally:
            broker2.close()
            path.chmod(0o644)
    g3, broker3 = pipeline(path, 20)
    try:
        result = g3.execute()
    finally:
        broker3.close()
    assert len(result) == 20 and result.calls.new_calls == 10 and fake_openai.count() == 20


def test_garbage_in_the_middle_of_a_broker_ledger_costs_only_the_damaged_record(
        fake_openai, tmp_path):
    """Garbage lines inserted between good records, and one record overwritten in place: the
    resumed run re-asks only the overwritten prompt."""
    n = 20
    path = tmp_path / "llm.jsonl"
    fake_openai.set_script("gpt-4o-mini", [500, 500])  # two #failed records in the ledger too
    g, broker = pipeline(path, n)
    first = g.execute()
    broker.close()
    assert len(first) == n and fake_openai.count() == n + 2
    lines = path.read_bytes().split(b"\n")[:-1]
    assert len(lines) == n + 2

    # Garbage between records; one done record overwritten with garbage of the same length.
    damaged = next(i for i, line in enumerate(lines) if b'"status":"done"' in line and i > 5)
    victim = json.loads(lines[damaged])["request"]["messages"][-1]["content"]
    lines[damaged] = b"\x00" * len(lines[damaged])
    garbage = [b"{not json", b'{"no_key": 1}', b"[1, 2, 3]", b'{"key": ""}', b"\xff\xfe"]
    mixed = lines[:8] + garbage + lines[8:]
    path.write_bytes(b"\n".join(mixed) + b"\n")

    led = JsonlLedger(path)
    assert led.torn_lines == len(garbage) + 1
    led.close()
    again = rerun(path, n)
    assert len(again) == n and not again.held
    assert again.calls.new_calls == 1 and again.calls.cache_hits == n - 1
    assert sent_prompts(fake_openai)[n + 2:] == [victim]
    assert [e.data["text"] for e in again] == [e.data["text"] for e in first]
    failed = [k for k, _ in JsonlLedger(path).items() if k.endswith(FAILED_SUFFIX)]
    assert len(failed) <= 2  # failures are kept as records, never served
