"""Dagster vs the local executor on one cached spawn pipeline of 10,000 children.

    .venv/bin/python benchmarks/dagster_spawn.py [--children 10000] [--repeats 3]

100 parents x 100 items -> SpawnFromList -> GenerateLLMRequest -> ConcurrentLLMCall ->
ExtractResponseText -> CollectAllToList. The ledger is filled first (offline ``local``
provider), then each runner is timed on the cached data, interleaved, median of the repeats:
local ``plan.execute()``; Dagster ``job.execute_in_process()`` (in-memory instance) and with a
persistent SQLite instance (what ``dagster job execute`` uses), the latter also with
``fuse_chunks=True`` (one step per chunk instead of one per op per chunk). The Dagster start-up constant is
measured with the same job on a single child. Target: Dagster <= 2 x local + start-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ["BATCHFACTORY_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dagster as dg  # noqa: E402

import batchfactory_dagster as bf  # noqa: E402
from batchfactory_dagster.dagster import build_job  # noqa: E402
from batchfactory_dagster.op import (  # noqa: E402
    CollectAllToList,
    ConcurrentLLMCall,
    ExtractResponseText,
    FromList,
    GenerateLLMRequest,
    SpawnFromList,
)


def pipeline(broker, parents: int, per_parent: int) -> bf.Segment:
    rows = [{"chapter": p, "paras": [f"paragraph {p}.{i}" for i in range(per_parent)]}
            for p in range(parents)]
    return (FromList(rows) | SpawnFromList("paras", "para")
            | GenerateLLMRequest("Summarise: {para}", model="gpt-4o-mini@local",
                                 max_completion_tokens=256)
            | ConcurrentLLMCall(broker) | ExtractResponseText()
            | CollectAllToList("text", "summaries"))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--children", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=1000)
    args = ap.parse_args()
    per_parent = 100
    parents = args.children // per_parent
    tmp = tempfile.mkdtemp()
    broker = bf.brokers.ConcurrentLLMCallBroker(os.path.join(tmp, "ledger.jsonl"), concurrency=256)
    warm = pipeline(broker, parents, per_parent).compile().execute()
    assert warm.calls.new_calls == args.children, warm.summary()

    plan = pipeline(broker, parents, per_parent).compile()
    job = build_job(pipeline(broker, parents, per_parent), "spawn_bench",
                    chunk_size=args.chunk_size)
    fused = build_job(pipeline(broker, parents, per_parent), "spawn_fused",
                      chunk_size=args.chunk_size, fuse_chunks=True)
    tiny = build_job(pipeline(broker, 1, 1), "spawn_tiny", chunk_size=args.chunk_size)
    home = tempfile.mkdtemp()
    results: dict[str, list[float]] = {"local": [], "dagster": [], "dagster_sqlite": [],
                                       "fused_sqlite": [], "startup": [], "startup_sqlite": []}
    steps = 0
    with dg.instance_for_test(temp_dir=home) as instance:
        for _ in range(args.repeats):
            results["local"].append(timed(lambda: check(plan.execute(progress=False))))
            start = time.perf_counter()
            run = job.execute_in_process()
            results["dagster"].append(time.perf_counter() - start)
            steps = len({e.step_key for e in run.all_events if e.step_key})
            results["dagster_sqlite"].append(timed(lambda: job.execute_in_process(instance=instance)))
            results["fused_sqlite"].append(timed(lambda: fused.execute_in_process(instance=instance)))
            results["startup"].append(timed(lambda: tiny.execute_in_process()))
            results["startup_sqlite"].append(timed(lambda: tiny.execute_in_process(instance=instance)))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"children={args.children} chunk_size={args.chunk_size} dagster steps={steps}")
    print("| runner | median s | all runs |")
    print("| --- | ---: | --- |")
    for k, v in results.items():
        print(f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    for kind, start in (("dagster", "startup"), ("dagster_sqlite", "startup_sqlite"),
                        ("fused_sqlite", "startup_sqlite")):
        added = med[kind] - med[start]
        print(f"{kind}: (run - start-up) / local = {added / med['local']:.2f}x; "
              f"target <= 2x: {'met' if added <= 2 * med['local'] else 'MISSED'}")


def check(result: bf.RunResult) -> None:
    assert result.calls.new_calls == 0 and len(result) > 0, result.summary()


if __name__ == "__main__":
    main()
