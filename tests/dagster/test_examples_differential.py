"""Every example: a Dagster run and the local executor give identical entries."""

from __future__ import annotations

import warnings

import pytest

import batchfactory_dagster as bf
from batchfactory_dagster.dagster import build_job
from tests.helpers import load_example

pytestmark = pytest.mark.dagster

LLM_EXAMPLES = ["01_basic_pipeline", "02_role_playing_loop", "03_split_and_summarize",
                "04_long_text_segmentation"]


def rows(entries):
    return [(e.idx, e.rev, e.data) for e in entries]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHFACTORY_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", LLM_EXAMPLES)
def test_llm_example_dagster_equals_local(name, offline, tmp_path):
    module = load_example(name)
    project = bf.CacheFolder(name.split("_", 1)[1], 1, 0, 0, data_dir=tmp_path / "data")
    broker = bf.brokers.ConcurrentLLMCallBroker(project["cache/llm_broker.jsonl"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # example 03 is deprecated style
        local = module.pipeline(project, broker).compile().execute()
        job = build_job(module.pipeline(project, broker), f"ex_{name[:2]}")
    result = job.execute_in_process()
    assert result.success
    dagster_out = result.output_value()
    assert rows(dagster_out.entries) == rows(local.entries) and len(local) > 0
    assert dagster_out.report.total().new_calls == 0  # the local run paid, Dagster reused
    broker.close()


@pytest.mark.parametrize("make", ["factorial_pipeline", "sum_of_squares_pipeline"])
def test_math_example_dagster_equals_local(make):
    build = getattr(load_example("05_math_ops"), make)
    local = build().compile().execute()
    result = build_job(build(), make).execute_in_process()
    assert rows(result.output_value().entries) == rows(local.entries)
