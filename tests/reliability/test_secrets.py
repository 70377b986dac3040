"""The API key appears nowhere: not in ledgers, outputs, logs, reprs, pickles or errors, locally
and through Dagster with a persistent instance (every file under DAGSTER_HOME, sqlite included,
is scanned as bytes). tests/op/test_llm_ops.py covers ledgers and reprs of a local run; this adds
logging at DEBUG, stdout/stderr, a server that echoes the key in its error, keys given to the
broker directly, and Dagster's event log, run storage, metadata and resources.
(The CLI with DAGSTER_HOME set is checked in test_crash_resume.py's Dagster run.)"""

from __future__ import annotations

import json
import logging
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

import batchfactory_dagster as bf
from batchfactory_dagster.core.errors import ConfigError
from batchfactory_dagster.op import *

SECRET = "sk-test-SECRET-7f3a9c"
MODEL = "gpt-4o-mini@openai"
FAULTS = [401, (429, 0.05), 500, "bad_json", "reset"]


def leaks(text: str | bytes) -> bool:
    if isinstance(text, bytes):
        return SECRET.encode() in text or b"SECRET-7f3a9c" in text
    return SECRET in text or "SECRET-7f3a9c" in text


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def debug_logs(caplog):
    """Every logger at DEBUG, the openai client's and Dagster's included."""
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpx2", "aiohttp", "batchfactory_dagster"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


class EchoKeyHandler(BaseHTTPRequestHandler):
    """A misbehaving OpenAI-compatible server: its 401 echoes the whole Authorization header."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"error": {"message": "Incorrect API key provided: "
                                     f"{self.headers.get('Authorization')}.",
                                     "type": "invalid_request_error", "code": "invalid_api_key"}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def echo_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoKeyHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_local_run_with_faults_leaks_the_key_nowhere(fake_openai, monkeypatch, tmp_path,
                                                    capfd, debug_logs):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fake_openai.set_script("gpt-4o-mini", FAULTS)
    project = bf.CacheFolder("secrets", 1, 0, 0, data_dir=tmp_path)
    env_broker = bf.brokers.ConcurrentLLMCallBroker(project["cache/llm.jsonl"], max_attempts=3,
                                                    concurrency=2, backoff_base=0.01)
    call = ConcurrentLLMCall(project["cache/call.jsonl"], env_broker, failure_behavior="emit")
    g = (FromList([{"w": w} for w in "abcdef"])
         | GenerateLLMRequest("Say {w}.", model=MODEL)
         | call
         | ExtractResponseText()
         | WriteJsonl(project["out/rows.jsonl"])
         | WriteParquet(project["out/rows.parquet"])
         | Print())
    plan = g.compile()
    result = plan.execute(progress=True)
    env_broker.close()
    assert any("401" in (e.data.get("error") or "") for e in result)

    # The key given to the broker itself, not through the environment.
    monkeypatch.delenv("OPENAI_API_KEY")
    key_broker = bf.brokers.ConcurrentLLMCallBroker(project["cache/llm.jsonl"],
                                                    api_keys={"openai": SECRET})
    again = (FromList([{"w": "g"}]) | GenerateLLMRequest("Say {w}.", model=MODEL)
             | ConcurrentLLMCall(key_broker)).execute()
    assert again.calls.new_calls == 1
    texts: list[str | bytes] = [repr(key_broker), repr(call),
                                repr(plan), repr(g), result.summary(), repr(result.held),
                                repr(result.entries), json.dumps(result.calls.to_dict())]
    blobs = [pickle.dumps(key_broker), pickle.dumps(env_broker), pickle.dumps(call),
             pickle.dumps(plan)]
    key_broker.close()
    with pytest.raises(ConfigError) as err:  # no key at all: the error names the variable
        (FromList([{"w": "h"}]) | GenerateLLMRequest("Say {w}.", model=MODEL)
         | ConcurrentLLMCall(bf.brokers.ConcurrentLLMCallBroker(None))).execute()
    texts.append(str(err.value))
    files = files_under(tmp_path)
    assert len(files) == 4  # two ledgers, jsonl, parquet
    out, errs = capfd.readouterr()
    assert "--- " in out and debug_logs.records  # Print and the loggers did write
    texts += [out, errs, debug_logs.text]
    texts += [repr(r.__dict__) for r in debug_logs.records]
    for text in [*texts, *blobs, *files.values()]:
        assert not leaks(text)


def test_a_server_that_echoes_the_key_does_not_get_it_recorded(echo_server, monkeypatch,
                                                              tmp_path, debug_logs):
    """Some OpenAI-compatible servers and proxies quote the key in their 401: the broker
    redacts it before it reaches the ledger, the entries and their outputs."""
    from batchfactory_dagster.llm import providers

    monkeypatch.setattr(providers, "_PROVIDERS", dict(providers._PROVIDERS))  # undone after
    bf.register_provider("echoing", echo_server, "ECHOING_KEY")
    monkeypatch.setenv("ECHOING_KEY", SECRET)
    ledger = tmp_path / "llm.jsonl"
    broker = bf.brokers.ConcurrentLLMCallBroker(str(ledger))
    g = (FromList([{"w": "a"}]) | GenerateLLMRequest("Say {w}.", model="m@echoing")
         | ConcurrentLLMCall(broker, failure_behavior="emit")
         | WriteJsonl(tmp_path / "rows.jsonl"))
    result = g.execute()
    broker.close()
    (entry,) = result
    assert entry.data["status"] == "failed" and "HTTP 401: Incorrect API key" in entry.data["error"]
    assert "Bearer ***" in entry.data["error"]  # the rest of the server's message is kept
    for text in [repr(entry.data), *files_under(tmp_path).values(), debug_logs.text]:
        assert not leaks(text)


@pytest.mark.dagster
def test_dagster_run_with_a_persistent_instance_leaks_the_key_nowhere(fake_openai, monkeypatch,
                                                                      tmp_path, capfd,
                                                                      debug_logs):
    from batchfactory_dagster.dagster import (
        LLMBrokerResource,
        bf_resources,
        build_graph_asset,
        build_held_back_check,
        build_job,
    )

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fake_openai.set_script("gpt-4o-mini", FAULTS)
    home = tmp_path / "dagster_home"
    home.mkdir()
    resource = LLMBrokerResource(cache_path=str(tmp_path / "llm.jsonl"), max_attempts=2,
                                 concurrency=2, openai_api_key=dg.EnvVar("OPENAI_API_KEY"))
    plain = LLMBrokerResource(cache_path=str(tmp_path / "llm.jsonl"), openai_api_key=SECRET)
    stand_in = bf.brokers.ConcurrentLLMCallBroker(None)  # replaced by the resource at run time

    def pipeline(source=True):
        body = (GenerateLLMRequest("Say {w}.", model=MODEL)
                | ConcurrentLLMCall(stand_in, failure_behavior="emit") | ExtractResponseText())
        return FromList([{"w": w} for w in "abcd"]) | body if source else body

    @dg.asset
    def words() -> list[dict]:
        return [{"w": w} for w in "uvwxyz"]

    asset = build_graph_asset(pipeline(source=False), "said", upstream="words",
                              resources={"llm_broker": resource})
    job = build_job(pipeline(), "say", resources={"llm_broker": resource})
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        run = job.execute_in_process(instance=instance)
        # a key given as a plain string (the README says EnvVar) is not stored either
        plain_run = build_job(pipeline(), "say_plain", resources={"llm_broker": plain}
                              ).execute_in_process(instance=instance)
        assert plain_run.success
        mat = dg.materialize([words, asset, build_held_back_check(asset)], instance=instance,
                             resources={"llm_broker": resource,
                                        **bf_resources(str(tmp_path / "assets"))})
        assert run.success and mat.success
        errors = [e.data["error"] for e in run.output_value().entries if e.data.get("error")]
        assert any("401" in e for e in errors)
        records = []
        for run_id in (run.run_id, mat.run_id, plain_run.run_id):
            records += [repr(r) for r in instance.all_logs(run_id)]
            records.append(repr(instance.get_run_by_id(run_id)))
        metadata = repr(mat.asset_materializations_for_node("said")[0].metadata)
    files = files_under(home)
    assert any(name.endswith(".db") for name in files)  # sqlite run and event storage
    out, errs = capfd.readouterr()
    texts: list[str | bytes] = [*records, metadata, out, errs, debug_logs.text,
                                repr(resource), repr(plain), str(plain), repr(resource.get_broker()),
                                repr(plain.get_broker()), pickle.dumps(plain.get_broker()),
                                *files.values(), *files_under(tmp_path / "assets").values(),
                                (tmp_path / "llm.jsonl").read_bytes()]
    assert any(b"HTTP 401" in t for t in texts if isinstance(t, bytes))  # errors were stored
    for text in texts:
        assert not leaks(text)
    print(f"\nscanned {len(files)} files under DAGSTER_HOME ({sum(map(len, files.values()))} "
          f"bytes), {len(records)} event records, captured logs: {len(debug_logs.records)} "
          "records: no key")
