"""Kill -9 in the middle of a run, then resume: nothing paid for is paid again.

The pipeline runs in a subprocess against a fake server in another process (so the server,
and its request log, survive the kill). After SIGKILL the same pipeline is run again to
completion. Every answer that reached the ledger before the kill is served from it; only the
requests that were in flight at the kill are sent twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import batchfactory_dagster as bf
from batchfactory_dagster.core.ledger import JsonlLedger
from batchfactory_dagster.testing import FakeServerProcess

N = 300
TRANSIT = 0.2  # seconds an answer may take from the server's stamp to the ledger (observed: <5 ms)
SCRIPT = textwrap.dedent("""
    import sys

    import batchfactory_dagster as bf
    from batchfactory_dagster.op import *

    def pipeline(data_dir, concurrency):
        project = bf.CacheFolder("resume", 1, 0, 0, data_dir=data_dir)
        broker = bf.brokers.ConcurrentLLMCallBroker(project["cache/llm.jsonl"],
                                                    concurrency=concurrency)
        g = (FromList([{"n": i} for i in range(__N__)])
             | GenerateLLMRequest("Write one sentence about the number {n}.",
                                  model="gpt-4o-mini@openai")
             | ConcurrentLLMCall(project["cache/call.jsonl"], broker)
             | ExtractResponseText()
             | WriteJsonl(project["out/answers.jsonl"], output_fields=["n", "text"]))
        return g, broker

    if __name__ == "__main__":
        g, broker = pipeline(sys.argv[1], int(sys.argv[2]))
        result = g.compile().execute()
        broker.close()
        print(result.summary(), flush=True)
""").replace("__N__", str(N))


@pytest.fixture(scope="module")
def server():
    with FakeServerProcess(latency=0.02) as srv:
        yield srv


def _run(script: Path, data_dir: Path, concurrency: int, server) -> subprocess.Popen:
    env = dict(os.environ, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test-resume")
    return subprocess.Popen([sys.executable, str(script), str(data_dir), str(concurrency)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _answers(data_dir: Path) -> dict[int, str]:
    path = data_dir / "resume_v1.0.0" / "out" / "answers.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["n"]: r["text"] for r in rows}


def _in_process(script: Path, data_dir: Path, concurrency: int) -> bf.RunResult:
    """Run the same pipeline in this process (openai is already imported here: faster)."""
    namespace: dict = {}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    g, broker = namespace["pipeline"](data_dir, concurrency)
    try:
        return g.compile().execute()
    finally:
        broker.close()


def test_sigkill_then_resume_pays_only_for_what_was_in_flight(server, tmp_path, monkeypatch):
    server.reset()
    script = tmp_path / "pipeline.py"
    script.write_text(SCRIPT)
    data_dir = tmp_path / "interrupted"

    # 1. Start in a subprocess, wait until some answers arrived, kill -9 mid-run.
    proc = _run(script, data_dir, 4, server)
    deadline = time.monotonic() + 60
    while server.count(status=200) < 60:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    time.sleep(0.1)  # let the server finish answering the requests that were in flight
    first = server.requests(path="/v1/chat/completions")
    ledger = JsonlLedger(data_dir / "resume_v1.0.0" / "cache" / "llm.jsonl")
    done = {rec["request"]["messages"][-1]["content"] for _, rec in ledger.items()
            if rec.get("status") == "done"}
    torn = ledger.torn_lines
    ledger.close()
    assert 0 < len(done) < N, "killed mid-run, with answers in the ledger"
    # Requests the server received before the kill whose answers never reached the ledger.
    lost = [r for r in first if r["body"]["messages"][-1]["content"] not in done]
    assert len(lost) <= 4, "at most the concurrency limit can be in flight"
    # In flight at the kill: not answered, or answered after the kill. The server stamps
    # answered_at when it hands the response to aiohttp, so an answer still in transit (or
    # being written to the ledger) when the kill landed was stamped a few ms before it.
    strict = [r for r in first if not r["answered"] or r["answered_at"] > killed_at]
    in_flight = [r for r in first if not r["answered"] or r["answered_at"] > killed_at - TRANSIT]
    assert {r["id"] for r in lost} <= {r["id"] for r in in_flight}, \
        "an answer delivered well before the kill was lost"

    # 2. Resume to completion (in this process: same pipeline, same CacheFolder).
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-resume")
    resumed = _in_process(script, data_dir, 16)
    assert len(resumed) == N and not resumed.held
    assert resumed.calls.new_calls == N - len(done) and resumed.calls.cache_hits == len(done)
    total = server.count()
    assert total == len(first) + (N - len(done)), "nothing in the ledger was asked again"
    assert total == N + len(lost) <= N + len(in_flight)

    # 3. Same output as an uninterrupted run.
    reference = _in_process(script, tmp_path / "reference", 64)
    assert len(reference) == N and not reference.held
    got, expected = _answers(data_dir), _answers(tmp_path / "reference")
    assert len(got) == N and got == expected
    transit = [killed_at - r["answered_at"] for r in lost if r["answered"]]
    transit_ms = max([t * 1000 for t in transit if t > 0], default=0.0)
    print(f"\nkill/resume: {len(first)} requests before the kill, {len(done)} answers in the "
          f"ledger, {len(lost)} answers lost ({len(strict)} unanswered at the kill by the "
          f"server's stamps, the rest stamped at most {transit_ms:.1f} ms before it), {total} "
          f"requests in total for {N} prompts, torn ledger lines: {torn}")
