"""A deferred broker under Dagster: the run ends with entries pending (not a failure), the
sensor asks for another run until everything is collected."""

from __future__ import annotations

import dagster as dg
import pytest

from batchfactory_dagster.brokers import BatchLLMCallBroker
from batchfactory_dagster.dagster import (
    bf_resources,
    build_graph_asset,
    build_held_back_check,
    build_pending_sensor,
)
from batchfactory_dagster.op import (
    ConcurrentLLMCall,
    ExtractResponseText,
    FromList,
    GenerateLLMRequest,
)

pytestmark = pytest.mark.dagster


def test_pending_batch_then_sensor_reruns_until_collected(fake_openai, tmp_path):
    broker = BatchLLMCallBroker(str(tmp_path / "batch.jsonl"), poll_interval=0)
    asset = build_graph_asset(
        FromList([{"w": w} for w in ("sun", "moon", "star")])
        | GenerateLLMRequest("One line about {w}.", model="gpt-4o-mini@openai")
        | ConcurrentLLMCall(broker) | ExtractResponseText(), "lines")
    check = build_held_back_check(asset)
    sensor = build_pending_sensor(asset, minimum_interval_seconds=30)
    resources = bf_resources(str(tmp_path / "assets"))
    with dg.instance_for_test() as instance:
        first = dg.materialize([asset, check], resources=resources, instance=instance)
        assert first.success
        meta = first.asset_materializations_for_node("lines")[0].metadata
        assert meta["bf/pending"].value == 3 and meta["bf/held_back"].value == 3
        (evaluation,) = first.get_asset_check_evaluations()
        assert not evaluation.passed
        runs = 1
        while True:
            tick = sensor(dg.build_sensor_context(instance=instance))
            if isinstance(tick, dg.SkipReason):
                break
            assert isinstance(tick, dg.RunRequest) and runs < 8
            again = dg.materialize([asset, check], resources=resources, instance=instance)
            runs += 1
        meta = again.asset_materializations_for_node("lines")[0].metadata
        assert meta["bf/pending"].value == 0 and meta["bf/new_calls"].value == 3
        assert again.get_asset_check_evaluations()[0].passed
    # one batch was created, whatever the number of runs
    assert fake_openai.count(path="/v1/batches", status=200) >= 1
    creates = [r for r in fake_openai.requests if r["path"] == "/v1/batches" and r["method"] == "POST"]
    assert len(creates) == 1 and runs >= 2
