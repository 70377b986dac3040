"""SIGKILL at every point of a 2,000-call run, then resume: nothing answered before a kill is
asked again, and the output equals an uninterrupted run's.

The pipeline runs in a subprocess against a fake server in another process (FakeServerProcess),
so the server and its request log outlive the killed client. After each kill the server's log
is compared with the ledger: a request the server received whose answer is not in the ledger
was lost, and every lost request must have been in flight at the kill (not answered, or
answered moments before it). Kill points:

* before_dispatch: requests built, broker not yet called;
* during_dispatch: killed three times, after 1, 1,000 and 1,900 answers (resuming in between);
* mid_record_write: a slow disk; killed while one broker ledger record is half written;
* mid_append_many: killed while the op journal's single 2,000-record append is half written;
* before_outputs: every answer in, WriteJsonl not yet run;
* dagster: ``dagster job execute`` of the same pipeline, killed after 1,000 answers, re-run.

A last test kills a process mid-way through real multi-megabyte appends (no simulation) and
checks that the ledger keeps every complete record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from batchfactory_dagster.core.ledger import JsonlLedger
from batchfactory_dagster.testing import FakeServerProcess
from tests.helpers import done_prompts

N = 2000
CONCURRENCY = 32
TRANSIT = 0.25  # s from the server's answer stamp to the ledger (observed: a few ms)
SECRET = "sk-test-SECRET-7f3a9c"
BIN = Path(sys.executable).parent

PIPELINE = textwrap.dedent('''
    """The pipeline of test_crash_resume.py, with two hooks for the test:
    BF_HOLD_AT=<stage>: say so at that point and wait to be killed;
    BF_TEAR=<ledger file name>:<keys>: once that ledger holds <keys> keys, write half of the
    next append, say so and wait to be killed (a slow disk)."""
    import os
    import sys
    import time

    import batchfactory_dagster as bf
    from batchfactory_dagster.core import ledger
    from batchfactory_dagster.core.op import BatchOp
    from batchfactory_dagster.op import *

    N = __N__


    class Stage(BatchOp):
        def __init__(self, where):
            self.where = where

        def process_batch(self, entries, ctx):
            if os.environ.get("BF_HOLD_AT") == self.where:
                print(f"HOLD {time.time()}", flush=True)
                time.sleep(600)
            return entries


    def tear_writes():
        spec = os.environ.get("BF_TEAR")
        if not spec:
            return
        name, after = spec.split(":")
        real = ledger.JsonlLedger._write

        def write(self, fd, data):
            if os.path.basename(self.path) == name and len(self) >= int(after):
                os.write(fd, bytes(data[: len(data) // 2 + 7]))  # not on a line end
                print(f"TORN {time.time()} {len(data)}", flush=True)
                time.sleep(600)
            return real(self, fd, data)

        ledger.JsonlLedger._write = write


    def pipeline(data_dir, concurrency):
        project = bf.CacheFolder("crash", 1, 0, 0, data_dir=data_dir)
        broker = bf.brokers.ConcurrentLLMCallBroker(project["cache/llm.jsonl"],
                                                    concurrency=concurrency)
        g = (FromList([{"n": i} for i in range(N)])
             | GenerateLLMRequest("Write one sentence about the number {n}.",
                                  model="gpt-4o-mini@openai")
             | Stage("before_dispatch")
             | ConcurrentLLMCall(project["cache/call.jsonl"], broker)
             | ExtractResponseText()
             | Stage("before_outputs")
             | WriteJsonl(project["out/answers.jsonl"], output_fields=["n", "text"]))
        return g, broker


    if __name__ == "__main__":
        tear_writes()
        g, broker = pipeline(sys.argv[1], int(sys.argv[2]))
        result = g.compile().execute()
        broker.close()
        print(result.summary(), flush=True)
''').replace("__N__", str(N))

DEFINITIONS = textwrap.dedent('''
    import os
    import sys

    import dagster as dg

    sys.path.insert(0, os.environ["BF_PIPELINE_DIR"])
    from crash_pipeline import pipeline

    from batchfactory_dagster.dagster import LLMBrokerResource, build_job

    g, broker = pipeline(os.environ["BF_DATA_DIR"], 32)
    resource = LLMBrokerResource(cache_path=broker.cache_path, concurrency=32,
                                 openai_api_key=dg.EnvVar("OPENAI_API_KEY"))
    defs = dg.Definitions(jobs=[build_job(g, "crash_job", resources={"llm_broker": resource})])
''')


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server():
    with FakeServerProcess(latency=0.005) as srv:
        yield srv


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline")
    (folder / "crash_pipeline.py").write_text(PIPELINE)
    return folder


@pytest.fixture
def env(server, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return dict(os.environ)


def in_process(pipeline_dir: Path, data_dir: Path, concurrency: int = 64):
    """Run the pipeline to the end in this process (openai already imported: faster)."""
    namespace: dict = {}
    source = pipeline_dir / "crash_pipeline.py"
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    g, broker = namespace["pipeline"](data_dir, concurrency)
    try:
        return g.compile().execute()
    finally:
        broker.close()


@pytest.fixture(scope="module")
def reference(server, pipeline_dir, tmp_path_factory) -> bytes:
    """The output of an uninterrupted run."""
    data_dir = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_BASE_URL", server.base_url)
        patch.setenv("OPENAI_API_KEY", SECRET)
        result = in_process(pipeline_dir, data_dir)
    assert len(result) == N and not result.held
    server.reset()
    return (data_dir / "crash_v1.0.0" / "out" / "answers.jsonl").read_bytes()


# --------------------------------------------------------------------------- helpers
def prompt(body: dict) -> str:
    return body["messages"][-1]["content"]


def ledger_state(data_dir: Path) -> tuple[list[str], int]:
    """Prompts of the done lines in the broker ledger (one per line), and its torn lines."""
    path = data_dir / "crash_v1.0.0" / "cache" / "llm.jsonl"
    if not path.exists():
        return [], 0
    with JsonlLedger(path) as led:
        return done_prompts(path), led.torn_lines


def wait_for(what, timeout: float = 60.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point (exit {proc.returncode})")
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.005)


def marker(out: Path, word: str):
    def seen():
        for line in out.read_text().splitlines():
            if line.startswith(word):
                return float(line.split()[1])
        return None
    return seen


class Run:
    """One run of the pipeline in a subprocess, killed with SIGKILL at a chosen point."""

    def __init__(self, pipeline_dir: Path, data_dir: Path, env: dict[str, str], **extra: str):
        self.out = data_dir.parent / f"{data_dir.name}.{time.monotonic_ns()}.out"
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(pipeline_dir / "crash_pipeline.py"), str(data_dir),
                 str(CONCURRENCY)], env={**env, **extra}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> float:
        os.killpg(self.proc.pid, signal.SIGKILL)
        killed_at = time.time()
        self.proc.wait(30)
        assert self.proc.returncode == -signal.SIGKILL, self.out.read_text()[-2000:]
        return killed_at


class Ledgerbook:
    """Keeps score across the kills of one scenario, from the server's log and the ledger."""

    def __init__(self, server, data_dir: Path) -> None:
        self.server, self.data_dir = server, data_dir
        self.seen = 0  # requests in the server's log so far
        self.done: set[str] = set()
        self.lost: list[dict] = []
        self.report: list[str] = []

    def after_kill(self, killed_at: float, frozen_at: float | None = None) -> None:
        time.sleep(0.1)  # the server finishes answering what was in flight
        log = self.server.requests(path="/v1/chat/completions")
        run = log[self.seen:]
        asked_again = [r for r in run if prompt(r["body"]) in self.done]
        assert not asked_again, f"{len(asked_again)} prompts answered before were asked again"
        done, torn = ledger_state(self.data_dir)
        assert len(done) == len(set(done)), "a prompt was recorded as done twice"
        lost = [r for r in run if prompt(r["body"]) not in done]
        # In flight at the kill: not answered, or answered just before it (in transit to the
        # ledger). With a frozen writer (slow disk) everything after the freeze is in flight.
        since = (killed_at if frozen_at is None else frozen_at) - TRANSIT
        in_flight = {r["id"] for r in run if not r["answered"] or r["answered_at"] > since}
        assert {r["id"] for r in lost} <= in_flight, "an answer that had arrived was lost"
        assert len(lost) <= CONCURRENCY
        transit = [killed_at - r["answered_at"] for r in lost if r["answered"]]
        self.report.append(f"kill: {len(run)} requests, {len(done) - len(self.done)} new "
                           f"answers recorded, {len(lost)} lost (max transit "
                           f"{max(transit, default=0) * 1000:.0f} ms), torn lines {torn}")
        self.seen, self.done = len(log), set(done)
        self.lost += lost

    def resume(self, pipeline_dir: Path, reference: bytes):
        result = in_process(pipeline_dir, self.data_dir)
        assert len(result) == N and not result.held
        c = result.calls
        assert (c.new_calls, c.cache_hits) == (N - len(self.done), len(self.done))
        log = self.server.requests(path="/v1/chat/completions")
        resumed = [prompt(r["body"]) for r in log[self.seen:]]
        assert len(resumed) == len(set(resumed)) == N - len(self.done)
        assert not set(resumed) & self.done
        assert len(log) == N + len(self.lost), "the server saw more than prompts + lost"
        done, _ = ledger_state(self.data_dir)
        assert len(done) == len(set(done)) == N
        out = self.data_dir / "crash_v1.0.0" / "out" / "answers.jsonl"
        assert out.read_bytes() == reference, "the output differs from an uninterrupted run"
        self.report.append(f"resume: {c.new_calls} new calls, {c.cache_hits} cache hits; "
                           f"server total {len(log)} = {N} prompts + {len(self.lost)} lost")
        return result


# --------------------------------------------------------------------------- the kill points
def kill_before_dispatch(run_in, book: Ledgerbook, server) -> None:
    run = run_in(BF_HOLD_AT="before_dispatch")
    wait_for(marker(run.out, "HOLD"), proc=run.proc)
    assert server.count() == 0
    book.after_kill(run.kill())


def kill_during_dispatch(run_in, book: Ledgerbook, server) -> None:
    for answers in (1, 1000, 1900):
        run = run_in()
        wait_for(lambda a=answers: server.count(status=200) >= a, proc=run.proc)
        book.after_kill(run.kill())


def kill_mid_record_write(run_in, book: Ledgerbook, server) -> None:
    run = run_in(BF_TEAR="llm.jsonl:600")
    frozen_at = wait_for(marker(run.out, "TORN"), proc=run.proc)
    book.after_kill(run.kill(), frozen_at)
    done, torn = ledger_state(book.data_dir)
    assert len(done) == 600 and torn == 1  # the half-written record is skipped


def kill_mid_append_many(run_in, book: Ledgerbook, server) -> None:
    run = run_in(BF_TEAR="call.jsonl:0")
    frozen_at = wait_for(marker(run.out, "TORN"), proc=run.proc)
    book.after_kill(run.kill(), frozen_at)
    with JsonlLedger(book.data_dir / "crash_v1.0.0" / "cache" / "call.jsonl") as journal:
        # one write of 2,000 records, cut in half: the complete lines before the cut are read
        assert 0 < len(journal) < N and journal.torn_lines == 1
    assert len(book.done) == N


def kill_before_outputs(run_in, book: Ledgerbook, server) -> None:
    run = run_in(BF_HOLD_AT="before_outputs")
    wait_for(marker(run.out, "HOLD"), proc=run.proc)
    book.after_kill(run.kill())
    assert len(book.done) == N
    assert not (book.data_dir / "crash_v1.0.0" / "out" / "answers.jsonl").exists()


KILL_POINTS = {f.__name__.removeprefix("kill_"): f for f in (
    kill_before_dispatch, kill_during_dispatch, kill_mid_record_write, kill_mid_append_many,
    kill_before_outputs)}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume(point, server, pipeline_dir, reference, env, tmp_path):
    server.reset()
    data_dir = tmp_path / "data"
    book = Ledgerbook(server, data_dir)
    KILL_POINTS[point](lambda **extra: Run(pipeline_dir, data_dir, env, **extra), book, server)
    book.resume(pipeline_dir, reference)
    print(f"\n{point}: " + "; ".join(book.report))


@pytest.mark.slow
@pytest.mark.dagster
def test_dagster_job_execute_killed_then_rerun(server, pipeline_dir, reference, env, tmp_path):
    """The same pipeline as a Dagster job run by the CLI with a persistent DAGSTER_HOME and the
    key from an EnvVar: killed after 1,000 answers, run again. Also: the key is nowhere."""
    server.reset()
    data_dir, home = tmp_path / "data", tmp_path / "dagster_home"
    home.mkdir()
    (tmp_path / "defs.py").write_text(DEFINITIONS)
    cli_env = {**env, "DAGSTER_HOME": str(home), "BF_DATA_DIR": str(data_dir),
               "BF_PIPELINE_DIR": str(pipeline_dir)}
    command = [str(BIN / "dagster"), "job", "execute", "-f", str(tmp_path / "defs.py"),
               "-j", "crash_job"]
    book = Ledgerbook(server, data_dir)
    first_log = tmp_path / "first.log"
    with first_log.open("w") as out:
        proc = subprocess.Popen(command, env=cli_env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: server.count(status=200) >= 1000, timeout=120, proc=proc)
    os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait(30)
    book.after_kill(killed_at)

    second = subprocess.run(command, env=cli_env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=180)
    logs = second.stdout + second.stderr
    assert second.returncode == 0, logs[-3000:]
    summary = next(line for line in logs.splitlines() if "crash_job: " in line)
    assert f"{N} entries out; {N - len(book.done)} new calls, {len(book.done)} cache hits" \
        in summary
    log = server.requests(path="/v1/chat/completions")
    assert not {prompt(r["body"]) for r in log[book.seen:]} & book.done
    assert len(log) == N + len(book.lost)
    out = data_dir / "crash_v1.0.0" / "out" / "answers.jsonl"
    assert out.read_bytes() == reference, "the Dagster re-run differs from an uninterrupted run"

    scanned = [first_log.read_bytes(), logs.encode()]
    scanned += [p.read_bytes() for root in (home, data_dir) for p in root.rglob("*")
                if p.is_file()]
    assert any(p.suffix == ".db" for p in home.rglob("*"))  # runs and events were stored
    for blob in scanned:
        assert SECRET.encode() not in blob and b"SECRET-7f3a9c" not in blob
    stored = sorted({str(p.relative_to(home)).split("/")[0] for p in home.rglob("*")
                     if p.is_file()})
    print(f"\ndagster: {book.report[0]}; re-run: {summary.split(': ', 1)[1]}; server total "
          f"{len(log)}; {len(scanned)} files and logs scanned for the key (DAGSTER_HOME: "
          f"{', '.join(stored)}): none")


LOOPER = textwrap.dedent('''
    import sys
    from batchfactory_dagster.core.ledger import JsonlLedger

    led = JsonlLedger(sys.argv[1])
    pad = "x" * (512 << 10)
    for i in range(32):  # 4 records of 512 KiB in one append_many: 2 MiB per write, 64 at most
        led.append_many({"key": f"{i}-{j}", "i": i, "j": j, "pad": pad} for j in range(4))
''')


def _mid_write(path: Path, size: int) -> bool:
    """The file is past ``size`` and does not end with a newline: a write is under way."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            if end < size:
                return False
            f.seek(end - 1)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def test_sigkill_during_real_large_appends_keeps_every_complete_record(tmp_path):
    """No simulation: a process appending 2 MiB at a time, without pause, is SIGKILLed while
    its file does not end with a newline (in the middle of a write). Each time the ledger
    opens with every complete record and at most one torn line, and the next append seals
    the tail."""
    script = tmp_path / "looper.py"
    script.write_text(LOOPER)
    torn_rounds = kills = 0
    for size_mb in (3, 5, 8, 13) * 3:
        if kills >= 4 and torn_rounds:
            break
        kills += 1
        path = tmp_path / f"big{size_mb}.jsonl"
        proc = subprocess.Popen([sys.executable, str(script), str(path)])
        try:
            wait_for(lambda p=path, mb=size_mb: _mid_write(p, mb << 20), proc=proc)
        except AssertionError:
            # The writer finished before the watcher caught it mid-write (a fast disk): this
            # round proves nothing about torn writes, but its ledger must still load whole.
            pass
        proc.kill()
        proc.wait(10)
        with JsonlLedger(path) as led:
            assert led.torn_lines <= 1
            torn_rounds += led.torn_lines
            count = len(led)
            assert count >= size_mb * 2 - 4
            for key, record in led.items():
                assert key == f"{record['i']}-{record['j']}" and len(record["pad"]) == 512 << 10
            led.append({"key": "after", "ok": True})
        with JsonlLedger(path) as led:
            assert len(led) == count + 1 and led.get("after") == {"key": "after", "ok": True}
        path.unlink()  # keep disk use small
    if not torn_rounds:
        pytest.skip(f"none of {kills} kills landed in the middle of a write on this machine")
    print(f"\nreal SIGKILL during 2 MiB appends: {kills} kills, {torn_rounds} left a torn "
          "line; every complete record kept")
