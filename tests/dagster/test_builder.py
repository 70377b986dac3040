"""Differential tests: a pipeline run by Dagster gives exactly what the local executor gives."""

from __future__ import annotations

import operator

import dagster as dg
import pytest

import batchfactory_dagster as bf
from batchfactory_dagster.dagster import build_graph_asset, build_job
from batchfactory_dagster.op import (
    Apply,
    CollectAllToList,
    ConcurrentLLMCall,
    ExtractResponseText,
    Filter,
    FromList,
    GenerateLLMRequest,
    If,
    Repeat,
    SetField,
    Shuffle,
    SpawnFromList,
    TakeFirstN,
    While,
)

pytestmark = pytest.mark.dagster


def rows(entries):
    return [(e.idx, e.rev, e.data) for e in entries]


def run_both(make, **build):
    local = make().compile().execute()
    result = build_job(make(), "job", **build).execute_in_process()
    assert result.success
    return local, result.output_value()


def test_unrolled_repeat_and_if_match_local():
    def make():
        return (FromList([{"v": i} for i in range(7)]) | SetField("acc", 1)
                | Repeat(Apply(operator.mul, ["acc", "rounds"], ["acc"]), 3)
                | If(lambda d: d["v"] % 3 == 0, SetField("tag", "three"), SetField("tag", "x")))

    local, dag = run_both(make)
    assert rows(dag.entries) == rows(local.entries)
    assert all(e.rev == 3 and e.data["acc"] == 6 for e in dag.entries)


def test_while_early_exit_skips_later_iterations():
    def make():
        return FromList([{"n": 1}, {"n": 40}]) | While(
            lambda d: d["n"] < 50, Apply(lambda d: d.update(n=d["n"] * 2)), max_iterations=8)

    local, dag = run_both(make)
    assert rows(dag.entries) == rows(local.entries)
    job = build_job(make(), "w")
    result = job.execute_in_process()
    skipped = [e.step_key for e in result.all_events if e.event_type_value == "STEP_SKIPPED"]
    assert any("_it8" in s for s in skipped)  # 1 -> 64 needs 6 rounds; rounds 7-8 never ran


def test_spawn_maps_over_chunks_and_matches_local():
    def make():
        return (FromList([{"xs": list(range(i, i + 7))} for i in range(3)])
                | SpawnFromList("xs", "x") | Shuffle(3)
                | Apply(lambda x: x * x, "x", "sq") | Filter(lambda d: d["x"] >= 0)
                | CollectAllToList("sq", "squares") | Apply(sum, "squares", "total"))

    local, dag = run_both(make, chunk_size=5)
    assert rows(dag.entries) == rows(local.entries)
    result = build_job(make(), "s", chunk_size=5).execute_in_process()
    mapped = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"
              and e.step_key.startswith("s__Apply[")}
    assert len(mapped) == 5  # 21 children in chunks of 5


def test_nested_spawn_and_spawn_in_loop_run_inside_one_op():
    def make():
        inner = SpawnFromList("row", "x") | Apply(lambda x: x + 1, "x", "y") | CollectAllToList("y", "ys")
        return (FromList([{"rows": [[1, 2], [3]]}, {"rows": [[4]]}])
                | SpawnFromList("rows", "row") | inner | Apply(sum, "ys", "s")
                | CollectAllToList("s", "sums")
                | Repeat(SpawnFromList("sums", "v") | SetField("k", 1) | CollectAllToList("k", "ks"), 2))

    local, dag = run_both(make, chunk_size=1)
    assert rows(dag.entries) == rows(local.entries)


def test_take_first_n_and_long_loop_fused():
    def make():
        return (FromList([{"i": i} for i in range(10)]) | Repeat(SetField("z", 0), 30)
                | TakeFirstN(3))

    local, dag = run_both(make)
    assert rows(dag.entries) == rows(local.entries) and len(dag.entries) == 3


def test_llm_pipeline_graph_asset_from_upstream(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHFACTORY_OFFLINE", "1")
    broker = bf.brokers.ConcurrentLLMCallBroker(str(tmp_path / "llm.jsonl"))

    @dg.asset
    def topics() -> list[dict]:
        return [{"topic": t} for t in ("tea", "rain", "tea")]

    pipeline = (GenerateLLMRequest("Write one line about {topic}.", model="gpt-4o-mini@openai")
                | ConcurrentLLMCall(broker) | ExtractResponseText())
    asset = build_graph_asset(pipeline, "lines", upstream="topics")
    from batchfactory_dagster.dagster import bf_resources

    result = dg.materialize([topics, asset], resources=bf_resources(str(tmp_path / "assets")))
    assert result.success
    mat = [m for m in result.asset_materializations_for_node("lines")]
    meta = mat[0].metadata
    assert meta["bf/new_calls"].value == 2 and meta["bf/deduplicated"].value == 1
    import pandas as pd

    df = pd.read_parquet(tmp_path / "assets" / "lines.parquet")
    assert len(df) == 3 and df["text"].str.startswith("[synthetic]").all()
    again = dg.materialize([topics, asset], resources=bf_resources(str(tmp_path / "assets")))
    meta2 = again.asset_materializations_for_node("lines")[0].metadata
    assert meta2["bf/new_calls"].value == 0 and meta2["bf/cache_hits"].value == 3


def test_ten_thousand_children_run_as_a_bounded_number_of_steps():
    def make():
        rows = [{"xs": list(range(100))} for _ in range(100)]
        return (FromList(rows) | SpawnFromList("xs", "x") | Apply(lambda x: x + 1, "x", "y")
                | CollectAllToList("y", "ys"))

    result = build_job(make(), "big", chunk_size=1000).execute_in_process()
    steps = {e.step_key for e in result.all_events if e.step_key}
    # FromList, SpawnFromList, 10 chunks x Apply, CollectAllToList, output: 14 steps
    assert len(steps) == 14, sorted(steps)
    out = result.output_value().entries
    assert len(out) == 100 and out[0].data["ys"] == list(range(1, 101))


def test_fuse_chunks_runs_one_step_per_chunk_with_the_same_result():
    def make():
        rows = [{"xs": list(range(30))} for _ in range(10)]
        return (FromList(rows) | SpawnFromList("xs", "x") | Apply(lambda x: x + 1, "x", "y")
                | Filter(lambda d: d["y"] % 2 == 0) | SetField("k", 1)
                | CollectAllToList("y", "ys", allow_missing=True))

    local = make().compile().execute()
    result = build_job(make(), "fused", chunk_size=100, fuse_chunks=True).execute_in_process()
    steps = {e.step_key for e in result.all_events if e.step_key}
    assert len([s for s in steps if "[" in s]) == 3  # 300 children in 3 chunks, one step each
    assert rows(result.output_value().entries) == rows(local.entries)
