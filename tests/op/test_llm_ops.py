"""LLM ops end to end: the real openai client against the loopback fake server.

Requests are counted where they land (the fake server's log), never by mocking the client.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import uuid
from pathlib import Path

import pytest

import batchfactory_dagster as bf
from batchfactory_dagster.core.errors import ConfigError
from batchfactory_dagster.llm.models import GENERATION_PARAMS
from batchfactory_dagster.op import *  # the README's import style

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini@openai"
SECRET = "sk-test-SECRET-123456"
MYTHS = ["Prometheus Steals Fire", "Pandora Opens the Jar", "Orpheus Descends",
         "Icarus Flies Too High", "Theseus and the Minotaur"]


@pytest.fixture
def brokers():
    """Make brokers with fast backoff; closed at the end of the test."""
    made: list[bf.brokers.ConcurrentLLMCallBroker] = []

    def make(path=None, **kw):
        kw.setdefault("backoff_base", 0.01)
        broker = bf.brokers.ConcurrentLLMCallBroker(None if path is None else str(path), **kw)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


def ask(items, broker, prompt="Say something about {w}.", model=MODEL, **call_kw):
    return (FromList(items)
            | GenerateLLMRequest(prompt, model=model)
            | ConcurrentLLMCall(broker, **call_kw)
            | ExtractResponseText())


def bodies(server):
    return [r["body"] for r in server.requests if r["path"] == CHAT]


def prompts_sent(server):
    return [b["messages"][-1]["content"] for b in bodies(server)]


# --------------------------------------------------------------------------- 1. quickstart
def quickstart(data_dir: Path) -> bf.RunResult:
    """The seed README's quick-start, word for word but for the package name and data_dir."""
    project = bf.CacheFolder("quickstart", 1, 0, 0, data_dir=data_dir)
    broker  = bf.brokers.ConcurrentLLMCallBroker(project["cache/llm_broker.jsonl"])  # noqa: E221

    # Rewrite the first three passages of every *.txt file into four‑line poems.

    g = (
        ReadMarkdownLines("./data/*.txt", key_field="keyword", directory_str_field="directory")
        | Shuffle(42)
        | TakeFirstN(3)
        | GenerateLLMRequest(
            'Rewrite the passage from "{directory}" titled "{keyword}" as a four‑line poem.',
            model="gpt-4o-mini@openai",
        )
        | ConcurrentLLMCall(project["cache/llm_call.jsonl"], broker)
        | ExtractResponseText()
        | WriteJsonl(project["out/poems.jsonl"], output_fields=["keyword", "text", "directory"])
        | Print()
    )

    result = g.compile().execute(dispatch_brokers=True)
    broker.close()
    return result


def test_readme_quickstart_writes_three_poems_and_reruns_free(fake_openai, tmp_path,
                                                             monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "myths.txt").write_text("# Greek Myths\n\n" + "\n".join(MYTHS) + "\n")
    (tmp_path / "data" / "more.txt").write_text("# Heroes\n\nPerseus\nJason\n")

    first = quickstart(tmp_path)
    assert fake_openai.count() == 3
    assert first.calls.new_calls == 3 and first.calls.cache_hits == 0
    out = tmp_path / "quickstart_v1.0.0" / "out" / "poems.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"idx", "rev", "keyword", "text", "directory"}
        assert row["directory"] in ("Greek Myths", "Heroes")
        assert row["text"].startswith("[synthetic]") and len(row["text"].splitlines()) == 4
    assert "[synthetic]" in capsys.readouterr().out  # Print() showed the poems

    second = quickstart(tmp_path)  # fresh objects, same CacheFolder
    assert fake_openai.count() == 3, "the second run must be served from the ledger"
    assert second.calls.new_calls == 0 and second.calls.cache_hits == 3
    assert second.calls.saved_usd > 0 and second.calls.cost_usd == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


# --------------------------------------------------------------------------- 2. content keys
def test_changed_prompt_sends_exactly_the_changed_prompts(fake_openai, tmp_path, brokers):
    ledger = tmp_path / "ledger.jsonl"
    items = [{"w": "herons"}, {"w": "owls"}, {"w": "larks"}]
    ask(items, brokers(ledger)).execute()
    assert fake_openai.count() == 3

    fake_openai.reset()
    changed = [{"w": "herons"}, {"w": "owls"}, {"w": "swifts"}]  # one prompt differs
    result = ask(changed, brokers(ledger)).execute()
    assert prompts_sent(fake_openai) == ["Say something about swifts."]
    assert result.calls.new_calls == 1 and result.calls.cache_hits == 2

    fake_openai.reset()
    result = ask(changed, brokers(ledger), prompt="Describe {w}.").execute()  # new template
    assert sorted(prompts_sent(fake_openai)) == [
        "Describe herons.", "Describe owls.", "Describe swifts."]


def test_identical_prompts_in_one_batch_cost_one_request(fake_openai, brokers):
    result = ask([{"w": "x"}, {"w": "x"}, {"w": "x"}], brokers()).execute()
    assert fake_openai.count() == 1
    assert len(result) == 3 and len({e.idx for e in result}) == 3
    assert len({e.data["text"] for e in result}) == 1
    assert result.calls.new_calls == 1 and result.calls.deduplicated == 2


def test_two_ops_sharing_a_broker_pay_once(fake_openai, brokers):
    broker = brokers()
    g = (FromList([{"w": "tides"}])
         | GenerateLLMRequest("Explain {w}.", model=MODEL)
         | ConcurrentLLMCall(broker)
         | ExtractResponseText(output_field="first")
         | GenerateLLMRequest("Explain {w}.", model=MODEL)
         | ConcurrentLLMCall(broker)
         | ExtractResponseText(output_field="second"))
    result = g.execute()
    assert fake_openai.count() == 1
    assert result[0].data["first"] == result[0].data["second"]
    assert result.calls.new_calls == 1 and result.calls.cache_hits == 1


# --------------------------------------------------------------------------- 3. what is the key
PARAM_VALUES = {
    "max_completion_tokens": 999, "max_tokens": 777, "temperature": 0.3, "top_p": 0.5,
    "seed": 7, "stop": ["\n\n"], "presence_penalty": 0.2, "frequency_penalty": 0.2,
    "logit_bias": {"1234": -5}, "response_format": {"type": "text"}, "reasoning_effort": "low",
    "n": 2, "tools": [{"type": "function", "function": {
        "name": "noop", "parameters": {"type": "object", "properties": {}}}}],
    "tool_choice": "none", "user": "tester", "logprobs": True, "top_logprobs": 2,
    "service_tier": "auto", "verbosity": "low",
}


def test_every_generation_parameter_and_sample_change_the_key(fake_openai, brokers):
    assert set(PARAM_VALUES) == set(GENERATION_PARAMS)
    variants: list[dict] = [{}]
    variants += [{name: value} for name, value in PARAM_VALUES.items()]
    variants += [{"temperature": 0.9}, {"sample": 1}, {"sample": 2},
                 {"system_prompt": "Be terse."}, {"role": "system"}]
    broker = brokers()
    keys = []
    for variant in variants:
        result = (FromList([{"w": "rain"}])
                  | GenerateLLMRequest("Say something about {w}.", model=MODEL, **variant)
                  | ConcurrentLLMCall(broker) | ExtractResponseText()).execute()
        assert result[0].data["text"].startswith("[synthetic]"), variant
        keys.append(result[0].data["job_idx"])
    assert len(set(keys)) == len(variants), "every variant is its own request"
    assert fake_openai.count() == len(variants)
    sent = bodies(fake_openai)
    for variant, body in zip(variants[1:len(PARAM_VALUES) + 1], sent[1:]):
        ((name, value),) = variant.items()
        assert body[name] == value, f"{name} did not reach the provider"
    samples = [b.get("seed") for b in sent[-5:-2]]
    assert samples[1:] == [1, 2]  # a sample index reaches the provider as a seed offset


def test_entry_idx_is_not_part_of_the_key(fake_openai, brokers):
    items = [{"idx": "first", "w": "fog"}, {"idx": "second", "w": "fog"}]
    result = ask(items, brokers()).execute()
    assert [e.idx for e in result] == ["first", "second"]
    assert result[0].data["job_idx"] == result[1].data["job_idx"]
    assert fake_openai.count() == 1


# --------------------------------------------------------------------------- 4. failures
def test_stay_holds_a_failed_entry_back_and_the_next_run_retries(fake_openai, tmp_path,
                                                                 brokers):
    fake_openai.set_script("gpt-4o-mini", [500, 503])  # the first job fails both attempts
    ledger = tmp_path / "ledger.jsonl"
    items = [{"w": "one"}, {"w": "two"}]
    result = ask(items, brokers(ledger, max_attempts=2, concurrency=1)).execute()
    assert [e.data["w"] for e in result] == ["two"]
    assert len(result.held) == 1
    held = result.held[0]
    assert held.op == "ConcurrentLLMCall" and "server" in held.reason and "next run" in held.reason
    first_idx = FromList(items).compile().execute()[0].idx
    assert held.idx == first_idx
    assert result.calls.failed == 1 and result.calls.attempts == 3
    assert fake_openai.count() == 3

    again = ask(items, brokers(ledger, max_attempts=2, concurrency=1)).execute()
    assert [e.data["w"] for e in again] == ["one", "two"] and not again.held
    assert fake_openai.count() == 4  # only the failed prompt was sent again
    assert again.calls.new_calls == 1 and again.calls.cache_hits == 1


def test_emit_passes_failures_on_and_downstream_ops_cope(fake_openai, brokers):
    fake_openai.set_script("gpt-4o-mini", {"forever": 500})
    g = (FromList([{"w": "one"}])
         | GenerateLLMRequest("Say {w}.", model=MODEL)
         | ConcurrentLLMCall(brokers(max_attempts=2), failure_behavior=BrokerFailureBehavior.EMIT)
         | ExtractResponseText()
         | ExtractResponseMeta()
         | SplitCot()
         | UpdateChatHistory())
    result = g.execute()
    (entry,) = result
    assert entry.data["status"] == "failed" and "HTTP 500" in entry.data["error"]
    assert entry.data["text"] is None and entry.data["llm_response"] is None
    assert entry.data["api_cost"] == 0.0 and "chat_history" not in entry.data
    assert not result.held and result.calls.failed == 1
    assert fake_openai.count() == 2
    out = (FromList([entry.data]) | FilterFailedEntries()).execute()
    assert len(out) == 0


def test_emit_accepts_lowercase_string(fake_openai, brokers):
    fake_openai.set_script("gpt-4o-mini", [400])  # a client error is not retried
    result = ask([{"w": "x"}], brokers(), failure_behavior="emit").execute()
    assert result[0].data["status"] == "failed" and result[0].data["text"] is None
    assert fake_openai.count() == 1


@pytest.mark.parametrize("fault", ["bad_json", "empty_choices", "length"])
def test_retry_also_retries_malformed_answers_stay_does_not(fake_openai, tmp_path, brokers,
                                                           fault):
    fake_openai.set_script("gpt-4o-mini", [fault, fault])
    retry = ask([{"w": "a"}], brokers(tmp_path / "l1.jsonl", max_attempts=3),
                failure_behavior=BrokerFailureBehavior.RETRY).execute()
    assert len(retry) == 1 and retry[0].data["text"].startswith("[synthetic]")
    assert retry.calls.attempts == 3 and fake_openai.count() == 3

    fake_openai.reset()
    fake_openai.set_script("gpt-4o-mini", [fault])
    stay = ask([{"w": "b"}], brokers(tmp_path / "l2.jsonl", max_attempts=3)).execute()
    assert len(stay) == 0 and len(stay.held) == 1 and fake_openai.count() == 1
    kind = "bad_response" if fault == "bad_json" else fault
    assert kind in stay.held[0].reason


def test_cleanup_removes_every_temporary_field(fake_openai, brokers):
    fake_openai.set_script("gpt-4o-mini", [500])
    g = (FromList([{"w": "ok"}, {"w": "bad"}])
         | GenerateLLMRequest("Say {w}.", model=MODEL)
         | ConcurrentLLMCall(brokers(max_attempts=1, concurrency=1),
                             failure_behavior="emit")
         | ExtractResponseText()
         | CleanupLLMData())
    result = g.execute()
    assert [sorted(e.data) for e in result] == [["text", "w"], ["text", "w"]]
    assert result[0].data["text"] is None and result[1].data["text"].startswith("[synthetic]")


def test_extract_response_meta_accumulates_cost_across_calls(fake_openai, brokers):
    broker = brokers()
    g = (FromList([{"w": "sea"}])
         | GenerateLLMRequest("Say {w}.", model=MODEL) | ConcurrentLLMCall(broker)
         | ExtractResponseMeta()
         | GenerateLLMRequest("Describe {w}.", model=MODEL) | ConcurrentLLMCall(broker)
         | ExtractResponseMeta())
    result = g.execute()
    data = result[0].data
    assert data["model"] == MODEL
    assert data["api_cost"] == pytest.approx(result.calls.cost_usd) and data["api_cost"] > 0


# --------------------------------------------------------------------------- 6. prices
def test_unpriced_model_warns_and_reports_unknown_cost_not_zero(fake_openai, brokers):
    model = f"mystery-{uuid.uuid4().hex[:8]}@openai"
    with pytest.warns(UserWarning, match="no price"):
        result = ask([{"w": "x"}], brokers(), model=model).execute()
    (entry,) = result
    assert entry.data["status"] == "done" and entry.data["text"].startswith("[synthetic]")
    assert entry.data["llm_response"]["cost_usd"] is None
    assert result.calls.cost_usd is None and result.calls.unpriced_calls == 1
    assert "cost unknown" in result.summary()
    assert fake_openai.count() == 1
    meta = (FromList([entry.data]) | ExtractResponseMeta()).execute()
    assert meta[0].data["api_cost"] is None


def test_local_provider_is_free(fake_openai, brokers, recwarn):
    result = ask([{"w": "x"}], brokers(), model="gpt-4o-mini@local").execute()
    assert result.calls.cost_usd == 0.0 and result[0].data["llm_response"]["cost_usd"] == 0.0
    assert result.calls.total_tokens > 0
    assert fake_openai.count() == 0
    assert not [w for w in recwarn if "price" in str(w.message)]


# --------------------------------------------------------------------------- 7. dry run
def test_dispatch_brokers_false_spends_nothing_then_a_real_run(fake_openai, tmp_path, brokers):
    items = [{"w": "a"}, {"w": "b"}, {"w": "c"}]
    ledger = tmp_path / "ledger.jsonl"
    plan = ask(items, brokers(ledger)).compile()
    dry = plan.execute(dispatch_brokers=False)
    assert fake_openai.count() == 0 and len(dry) == 0
    assert len(dry.held) == 3 and all("pending" in h.reason for h in dry.held)
    assert dry.calls.pending == 3 and dry.calls.new_calls == 0
    assert dry.calls.estimated_cost_usd is not None and dry.calls.estimated_cost_usd > 0
    assert dry.calls.cost_usd == 0

    real = plan.execute()
    assert fake_openai.count() == 3 and len(real) == 3 and not real.held
    dry_again = ask(items, brokers(ledger)).compile().execute(dispatch_brokers=False)
    assert len(dry_again) == 3 and dry_again.calls.pending == 0  # cached answers are served


# --------------------------------------------------------------------------- 8. keys, offline
def test_missing_api_key_is_a_config_error_naming_the_variable(fake_openai, monkeypatch,
                                                               brokers):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as err:
        ask([{"w": "x"}], brokers()).execute()
    assert "ConcurrentLLMCall" in str(err.value) and "BATCHFACTORY_OFFLINE" in str(err.value)
    assert fake_openai.count() == 0


def test_offline_mode_answers_locally_with_labelled_text(fake_openai, monkeypatch, tmp_path,
                                                         brokers):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("BATCHFACTORY_OFFLINE", "1")
    result = ask([{"w": "x"}, {"w": "y"}], brokers(tmp_path / "l.jsonl")).execute()
    assert [e.data["text"][:11] for e in result] == ["[synthetic]"] * 2
    assert {e.data["llm_request"]["model"] for e in result} == {"gpt-4o-mini@local"}
    assert result.calls.cost_usd == 0.0 and fake_openai.count() == 0


def test_the_api_key_never_reaches_ledgers_outputs_reprs_or_errors(fake_openai, monkeypatch,
                                                                   tmp_path, brokers):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fake_openai.set_script("gpt-4o-mini", [401, (429, 0.05), 500, "bad_json"])
    broker = brokers(tmp_path / "cache" / "broker.jsonl", max_attempts=3, concurrency=1)
    call = ConcurrentLLMCall(str(tmp_path / "cache" / "journal.jsonl"), broker,
                             failure_behavior="emit")
    g = (FromList([{"w": "a"}, {"w": "b"}, {"w": "c"}])
         | GenerateLLMRequest("Say {w}.", model=MODEL)
         | call
         | ExtractResponseText()
         | WriteJsonl(tmp_path / "out" / "rows.jsonl"))
    result = g.execute()
    assert {e.data["status"] for e in result} == {"done", "failed"}
    assert any("401" in (e.data.get("error") or "") for e in result)
    texts = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert len(texts) == 3
    texts += [repr(broker), repr(call), repr(g), result.summary(), repr(result.held),
              repr(result.entries), str(result.calls.to_dict())]
    texts.append(repr(pickle.loads(pickle.dumps(broker)).__dict__))
    assert b"SECRET" not in pickle.dumps(broker)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError) as err:
        ask([{"w": "new"}], brokers()).execute()
    texts.append(str(err.value))
    assert fake_openai.count() == 5
    for text in texts:
        assert SECRET not in text and "SECRET" not in text


# --------------------------------------------------------------------------- 9. event loops
def test_sync_facade_works_inside_a_running_event_loop(fake_openai, brokers):
    plan = ask([{"w": "a"}, {"w": "b"}], brokers()).compile()

    async def main():
        asyncio.get_running_loop()  # we are inside a loop, like a notebook or an async op
        return plan.execute()

    result = asyncio.run(main())
    assert len(result) == 2 and fake_openai.count() == 2
    again = asyncio.run(main())  # a second loop: nothing is bound to the first one
    assert len(again) == 2 and again.calls.cache_hits == 2
