"""Bad input gets a clear error that names the op, the field and the entry where those apply,
says how to fix it, and costs nothing already paid for.

The messages users see are kept in tests/reliability/BAD_INPUT.md, generated from this file:

    BF_WRITE_BAD_INPUT=1 .venv/bin/python -m pytest tests/reliability/test_bad_input.py

and checked against what the code says now on every run.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
import pytest

import batchfactory_dagster as bf
from batchfactory_dagster.brokers.base import ImmediateBroker
from batchfactory_dagster.core.errors import (
    ConfigError,
    DefinitionError,
    DuplicateIdxError,
    EntryError,
)
from batchfactory_dagster.core.op import BatchOp
from batchfactory_dagster.op import *

MODEL = "gpt-4o-mini@openai"
TABLE = Path(__file__).with_name("BAD_INPUT.md")


class CountingBroker(ImmediateBroker):
    """A custom broker that answers instantly and counts what it was asked."""

    def __init__(self) -> None:
        super().__init__(None)
        self.calls = 0

    async def call(self, request):
        self.calls += 1
        return {"echo": True}, {}, 0.0


class Duplicate(BatchOp):
    """A user op with a bug: it emits a copy of every entry under the same idx."""

    def process_batch(self, entries, ctx):
        return entries + [e.copy() for e in entries]


@dataclass
class Case:
    id: str
    given: str  # what the user wrote, for the table
    run: Callable[[Path], Any]  # raises, or returns what to show (warnings, summary)
    error: type[BaseException] | None
    says: tuple[str, ...]  # must appear in the message (op, field, entry, fix)


def _pipe(*ops):
    seg = ops[0]
    for op in ops[1:]:
        seg = seg | op
    return seg


def _llm(broker=None, prompt="Describe {topic}.", model=MODEL, rows=({"topic": "tea"},)):
    return _pipe(FromList(list(rows)), GenerateLLMRequest(prompt, model=model),
                 ConcurrentLLMCall(broker or bf.brokers.ConcurrentLLMCallBroker(None)),
                 ExtractResponseText())


def _unpriced(tmp: Path) -> str:
    from batchfactory_dagster.llm import prices

    prices._warned.discard("my-finetune@openai")  # it warns once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _llm(model="my-finetune@openai").execute()
    shown = [str(w.message) for w in caught]
    return " / ".join([*shown, result.summary().split("; ", 1)[1]])


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _dup_jsonl(tmp: Path) -> Any:
    path = _write(tmp, "rows.jsonl", b'{"id": "a", "t": 1}\n{"id": "b"}\n{"id": "a", "t": 2}\n')
    return ReadJsonl(path, idx_field="id").compile().execute()


def _not_utf8(tmp: Path) -> Any:
    return ReadMarkdownLines(_write(tmp, "latin1.txt", "caf\xe9\n".encode("latin-1"))
                             ).compile().execute()


def _run_config_resource(tmp: Path) -> Any:
    from batchfactory_dagster.dagster import LLMBrokerResource, build_job

    job = build_job(_llm(), "bad_config",
                    resources={"llm_broker": LLMBrokerResource.configure_at_launch()})
    config = {"resources": {"llm_broker": {"config": {"cache_path": str(tmp / "l.jsonl"),
                                                      "concurrency": 0}}}}
    return job.execute_in_process(run_config=config)


CASES = [
    Case("template_field_unknown", 'FromList([{"topic": ...}]) | GenerateLLMRequest("Describe '
         '{topc}.")', lambda tmp: _llm(prompt="Describe {topc}.").compile(),
         DefinitionError, ("'GenerateLLMRequest'", "'topc'", "topic", "fix the name")),
    Case("template_field_missing_in_one_entry", "an entry without the field the prompt uses",
         lambda tmp: _llm(rows=[{"topic": "tea"}, {"subject": "rain"}]).execute(),
         EntryError, ("'GenerateLLMRequest'", "field 'topic'", "entry '", "FilterMissingField")),
    Case("template_malformed", 'GenerateLLMRequest("Use {braces", ...)',
         lambda tmp: GenerateLLMRequest("Use {braces", model=MODEL),
         DefinitionError, ("malformed", "{{ and }}")),
    Case("generation_param_unknown", "GenerateLLMRequest(..., temprature=0.2)",
         lambda tmp: GenerateLLMRequest("Hi", model=MODEL, temprature=0.2),
         DefinitionError, ("temprature", "temperature")),
    Case("generation_param_not_json", "GenerateLLMRequest(..., logit_bias={1: object()})",
         lambda tmp: GenerateLLMRequest("Hi", model=MODEL, logit_bias={1: object()}),
         DefinitionError, ("GenerateLLMRequest", "not JSON-serialisable")),
    Case("data_not_json_source", "FromList([{\"when\": object()}])",
         lambda tmp: FromList([{"when": object()}]),
         EntryError, ("'FromList'", "item 0", "not JSON-serialisable")),
    Case("data_not_json_output", 'SetField("tags", {"a", "b"}) | WriteJsonl(path)',
         lambda tmp: _pipe(FromList([{"x": 1}]), SetField("tags", {"a"}),
                           WriteJsonl(tmp / "out.jsonl")).execute(),
         EntryError, ("'WriteJsonl'", "field 'tags'", "entry '", "set value")),
    Case("job_not_recordable", "BrokerCall(custom_broker, \"payload\") on "
         "payload={1: \"x\"} (int dict keys)",
         lambda tmp: _pipe(FromList([{"payload": {1: "x"}}]),
                           BrokerCall(CountingBroker(), "payload")).execute(),
         ConfigError, ("'BrokerCall'", "cannot be recorded", "nothing was sent")),
    Case("duplicate_idx_source", 'FromList([{"idx": "a", ...}, {"idx": "a", ...}])',
         lambda tmp: FromList([{"idx": "a", "v": 1}, {"idx": "a", "v": 2}]),
         DuplicateIdxError, ("'FromList'", "entry 'a'", "item 0", "item 1")),
    Case("duplicate_idx_file", 'ReadJsonl(path, idx_field="id") with id "a" twice',
         _dup_jsonl, DuplicateIdxError, ("'ReadJsonl'", "entry 'a'", "rows.jsonl:1",
                                         "rows.jsonl:3")),
    Case("duplicate_idx_op", "a user op that emits two entries with one idx",
         lambda tmp: _pipe(FromList([{"v": 1}]), Duplicate()).execute(),
         DuplicateIdxError, ("'Duplicate'", "field 'idx'", "FromList item 0")),
    Case("provider_unknown", 'GenerateLLMRequest(..., model="gpt-4o-mini@opneai")',
         lambda tmp: GenerateLLMRequest("Hi", model="gpt-4o-mini@opneai"),
         ConfigError, ("GenerateLLMRequest", "unknown provider 'opneai'", "register_provider")),
    Case("model_without_provider", 'GenerateLLMRequest(..., model="gpt-4o-mini")',
         lambda tmp: GenerateLLMRequest("Hi", model="gpt-4o-mini"),
         ConfigError, ("GenerateLLMRequest", "name@provider")),
    Case("model_empty_name", 'GenerateLLMRequest(..., model="@openai")',
         lambda tmp: GenerateLLMRequest("Hi", model="@openai"),
         ConfigError, ("GenerateLLMRequest", "empty name")),
    Case("model_without_price", 'model="my-finetune@openai" (not in the price table)',
         _unpriced, None, ("no price known", "set_price", "cost unknown")),
    Case("api_key_missing", "OPENAI_API_KEY not set, model on openai",
         lambda tmp: _llm().execute(), ConfigError,
         ("'ConcurrentLLMCall'", "OPENAI_API_KEY", "BATCHFACTORY_OFFLINE")),
    Case("glob_matches_nothing", 'ReadMarkdownLines("<tmp>/nothing/*.md")',
         lambda tmp: ReadMarkdownLines(str(tmp / "nothing" / "*.md")).compile().execute(),
         ConfigError, ("'ReadMarkdownLines'", "matches no file")),
    Case("file_not_utf8", "ReadMarkdownLines on a Latin-1 file", _not_utf8,
         ConfigError, ("'ReadMarkdownLines'", "latin1.txt", "not UTF-8", "Convert")),
    Case("cache_folder_name_escapes", 'CacheFolder("../elsewhere", 1, 0, 0)',
         lambda tmp: bf.CacheFolder("../elsewhere", 1, 0, 0, data_dir=tmp),
         ConfigError, ("../elsewhere", "data_dir=")),
    Case("cache_folder_path_escapes", 'CacheFolder("p", 1, 0, 0)["../../etc/passwd"]',
         lambda tmp: bf.CacheFolder("p", 1, 0, 0, data_dir=tmp)["../../etc/passwd"],
         ConfigError, ("../../etc/passwd", "no '..'")),
    Case("spawn_from_non_list", 'SpawnFromList("paragraphs") on a str field',
         lambda tmp: _pipe(FromList([{"paragraphs": "one. two."}]),
                           SpawnFromList("paragraphs", "p"), CollectAllToList("p", "ps")
                           ).execute(),
         EntryError, ("'SpawnFromList'", "field 'paragraphs'", "entry '", "got str")),
    Case("failure_behavior_typo", 'ConcurrentLLMCall(broker, failure_behavior="retyr")',
         lambda tmp: ConcurrentLLMCall(bf.brokers.ConcurrentLLMCallBroker(None),
                                       failure_behavior="retyr"),
         DefinitionError, ("RETRY, STAY or EMIT", "'retyr'")),
    Case("broker_concurrency_zero", "ConcurrentLLMCallBroker(path, concurrency=0)",
         lambda tmp: bf.brokers.ConcurrentLLMCallBroker(None, concurrency=0),
         ValueError, ("concurrency", ">= 1", "got 0")),
    Case("broker_rpm_zero", "ConcurrentLLMCallBroker(path, rpm=0)",
         lambda tmp: bf.brokers.ConcurrentLLMCallBroker(None, rpm=0),
         ValueError, ("rpm", "None for no limit", "got 0")),
    Case("broker_timeout_negative", "ConcurrentLLMCallBroker(path, timeout=-1)",
         lambda tmp: bf.brokers.ConcurrentLLMCallBroker(None, timeout=-1),
         ValueError, ("timeout", "> 0", "got -1")),
    Case("resource_concurrency_zero", 'LLMBrokerResource(cache_path="...", concurrency=0)',
         lambda tmp: __import__("batchfactory_dagster.dagster", fromlist=["x"])
         .LLMBrokerResource(cache_path="l.jsonl", concurrency=0),
         pydantic.ValidationError, ("LLMBrokerResource", "concurrency", "greater than 0")),
    Case("resource_run_config_invalid", "llm_broker: {config: {concurrency: 0}} as run config "
         "(LLMBrokerResource.configure_at_launch())", _run_config_resource,
         dg.DagsterResourceFunctionError, ("llm_broker", "concurrency", "greater than 0")),
]


def shown(case: Case, tmp: Path) -> tuple[str, str]:
    """(what kind of outcome, the message) exactly as the user sees it."""
    if case.error is None:
        return "warning", str(case.run(tmp))
    with pytest.raises(case.error) as info:
        case.run(tmp)
    message = str(info.value)
    if isinstance(info.value, dg.DagsterError) and info.value.__cause__ is not None:
        cause = info.value.__cause__  # Dagster shows the cause below its own line
        message += f" / caused by {type(cause).__name__}: {cause}"
    return type(info.value).__name__, message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_error(case, fake_openai, monkeypatch, tmp_path):
    if case.id == "api_key_missing":
        monkeypatch.delenv("OPENAI_API_KEY")
    kind, message = shown(case, tmp_path)
    for part in case.says:
        assert part in message, (part, message)
    assert fake_openai.count() == (1 if case.id == "model_without_price" else 0)


def _normalise(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp), "<tmp>").replace(os.getcwd(), "<cwd>")
    text = re.sub(r"\s*For further information visit \S+", "", text)  # pydantic's URL
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f-]{27}", "<run id>", text)
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def render(rows: list[tuple[Case, str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["# Bad input: what the user sees",
           "",
           "Generated by `BF_WRITE_BAD_INPUT=1 .venv/bin/python -m pytest "
           "tests/reliability/test_bad_input.py`; checked on every test run. Temporary paths "
           "are shown as `<tmp>`. No case sends a request (the unpriced model sends one, on "
           "purpose) and none loses an answer already paid for "
           "(`test_a_typo_in_the_second_stage_costs_nothing_paid_for`).",
           "",
           "| Input | Outcome | What the user sees |",
           "| --- | --- | --- |"]
    for case, kind, message in rows:
        out.append(f"| `{cell(case.given)}` | `{kind}` | {cell(message)} |")
    return "\n".join(out) + "\n"


def test_bad_input_table_matches_the_messages(fake_openai, monkeypatch, tmp_path):
    rows = []
    for case in CASES:
        with monkeypatch.context() as patch:
            if case.id == "api_key_missing":
                patch.delenv("OPENAI_API_KEY")
            kind, message = shown(case, tmp_path)
        rows.append((case, kind, _normalise(message, tmp_path)))
    table = render(rows)
    if os.environ.get("BF_WRITE_BAD_INPUT"):
        TABLE.write_text(table)
    assert TABLE.read_text() == table, ("the messages changed: regenerate BAD_INPUT.md with "
                                        "BF_WRITE_BAD_INPUT=1 (see this module's docstring)")


def test_a_typo_in_the_second_stage_costs_nothing_paid_for(fake_openai, tmp_path):
    """Stage 1 pays for 6 answers, then stage 2's prompt names a field that is not there.
    Where compile() can see it, nothing is spent at all; where it cannot (after a function),
    the run stops at stage 2 with an error naming op, field and entry, and the fixed re-run
    makes 0 new calls for stage 1."""
    topics = [{"topic": t} for t in ("tea", "rain", "salt", "iron", "moss", "glass")]

    def make(second_prompt: str, opaque: bool):
        broker = bf.brokers.ConcurrentLLMCallBroker(str(tmp_path / "llm.jsonl"))
        first = _pipe(FromList(topics), GenerateLLMRequest("Describe {topic}.", model=MODEL),
                      ConcurrentLLMCall(broker), ExtractResponseText(output_field="desc"))
        middle = Apply(lambda d: None) if opaque else SetField("stage", 2)
        second = _pipe(GenerateLLMRequest(second_prompt, model=MODEL),
                       ConcurrentLLMCall(broker), ExtractResponseText(output_field="summary"))
        return first | middle | second, broker

    g, broker = make("Summarise: {descr}", opaque=False)
    with pytest.raises(DefinitionError, match="'descr'"):
        g.compile()
    assert fake_openai.count() == 0  # caught before anything was spent

    g, broker = make("Summarise: {descr}", opaque=True)  # compile() cannot know the fields
    with pytest.raises(EntryError) as info:
        g.execute()
    broker.close()
    err = info.value
    assert (err.op, err.field) == ("GenerateLLMRequest_2", "descr") and err.entry
    assert "it has: desc," in str(err) and fake_openai.count() == 6

    g, broker = make("Summarise: {desc}", opaque=True)
    result = g.execute()
    broker.close()
    stats = result.ctx.calls
    assert (stats["ConcurrentLLMCall"].new_calls, stats["ConcurrentLLMCall"].cache_hits) == (0, 6)
    assert stats["ConcurrentLLMCall_2"].new_calls == 6 and len(result) == 6
    assert fake_openai.count() == 12


def test_int_keys_in_a_generation_parameter_are_sent_and_recorded(fake_openai, tmp_path):
    """logit_bias={token_id: bias} with int keys, as Python users write it: the request is
    sent once and recorded (before, the call was paid for and then the ledger refused it)."""
    def run():
        broker = bf.brokers.ConcurrentLLMCallBroker(str(tmp_path / "llm.jsonl"))
        g = _pipe(FromList([{"topic": "tea"}]),
                  GenerateLLMRequest("Describe {topic}.", model=MODEL, logit_bias={1234: -100}),
                  ConcurrentLLMCall(broker), ExtractResponseText())
        try:
            return g.execute()
        finally:
            broker.close()

    first, second = run(), run()
    assert first.calls.new_calls == 1 and second.calls.cache_hits == 1
    assert fake_openai.count() == 1
    assert fake_openai.requests[0]["body"]["logit_bias"] == {"1234": -100}
    assert first[0].data["text"] == second[0].data["text"]
