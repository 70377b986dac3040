"""Dagster definitions for the example gallery: wiring only.

    dagster job execute -f definitions.py -j quickstart      # the README quick-start, offline
    dagster asset materialize -f definitions.py --select poems+
    dagster dev -f definitions.py                            # UI on http://127.0.0.1:3000

Without OPENAI_API_KEY every model runs on the offline ``local`` provider (labelled synthetic
answers, no network); with it, on OpenAI (or wherever OPENAI_BASE_URL points).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import dagster as dg

import batchfactory_dagster as bf
from batchfactory_dagster.brokers import BatchLLMCallBroker
from batchfactory_dagster.dagster import (
    LLMBrokerResource,
    bf_resources,
    build_graph_asset,
    build_held_back_check,
    build_job,
    build_pending_sensor,
)
from batchfactory_dagster.llm.providers import offline_unless_key
from batchfactory_dagster.op import (
    Apply,
    CollectAllToList,
    ConcurrentLLMCall,
    ExtractResponseText,
    GenerateLLMRequest,
    ReadMarkdownEntries,
    ReadMarkdownLines,
    Shuffle,
    SpawnFromList,
    TakeFirstN,
)

EXAMPLES = Path(__file__).resolve().parent / "examples"
sys.path.insert(0, str(EXAMPLES))
offline_unless_key(quiet=True)
quickstart, role_play, split_summarize, long_text, math_ops = (
    importlib.import_module(m) for m in ("01_basic_pipeline", "02_role_playing_loop",
                                         "03_split_and_summarize", "04_long_text_segmentation",
                                         "05_math_ops"))

DATA_DIR = os.environ.get("BATCHFACTORY_DATA_DIR", "data")
MODEL = "gpt-4o-mini@openai"

# One content-addressed ledger serves every job and asset: a prompt is paid for once, anywhere.
llm_broker = LLMBrokerResource(
    cache_path=f"{DATA_DIR}/llm_broker.jsonl",
    openai_api_key=dg.EnvVar("OPENAI_API_KEY") if os.environ.get("OPENAI_API_KEY") else None,
)
broker = llm_broker.make_broker()  # stands for the resource while the graphs are built
resources = {"llm_broker": llm_broker}


def project(name: str) -> bf.CacheFolder:
    return bf.CacheFolder(name, 1, 0, 0, data_dir=DATA_DIR)


def deprecated(make, *args):
    """Build example 03 without its (intended) DeprecationWarnings on every CLI call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return make(*args)


# -- jobs: the seed gallery as written --------------------------------------------------------
jobs = [
    build_job(quickstart.pipeline(project("quickstart"), broker), "quickstart",
              resources=resources, description="README quick-start: three myths as poems"),
    build_job(role_play.pipeline(project("role_play"), broker), "role_playing",
              resources=resources, description="teacher and student, Repeat + Character"),
    build_job(deprecated(split_summarize.pipeline, project("split_summarize"), broker),
              "split_and_summarize", resources=resources,
              description="deprecated shared-idx fan-out/fan-in"),
    build_job(long_text.pipeline(project("spawn_demo"), broker), "long_text_segmentation",
              resources=resources, description="fable -> paragraphs -> synopsis"),
    build_job(math_ops.factorial_pipeline(), "math_factorial"),
    build_job(math_ops.sum_of_squares_pipeline(), "math_sum_of_squares"),
]
quickstart_multiprocess = build_job(
    quickstart.pipeline(project("quickstart"), broker), "quickstart_multiprocess",
    resources=resources,
    # forkserver: each step process starts ~3x faster than with spawn (dagster-notes P2)
    executor_def=dg.multiprocess_executor.configured({"start_method": {"forkserver": {}}}))

# -- assets: the same work as a lineage graph --------------------------------------------------
myth_passages = build_graph_asset(
    ReadMarkdownLines(str(EXAMPLES / "data" / "myths.txt"), key_field="keyword",
                      directory_str_field="directory") | Shuffle(42) | TakeFirstN(3),
    "myth_passages", group_name="poems", description="three myth titles, shuffled")
poems = build_graph_asset(
    GenerateLLMRequest(quickstart.PROMPT, model=MODEL) | ConcurrentLLMCall(broker)
    | ExtractResponseText(),
    "poems", upstream="myth_passages", group_name="poems", resources=resources,
    description="each passage rewritten as a four-line poem")
fable_chapters = build_graph_asset(
    ReadMarkdownEntries(str(EXAMPLES / "data" / "fables.md"), "text")
    | Apply(long_text.split_paragraphs, "text", "paragraphs"),
    "fable_chapters", group_name="fables", description="one entry per fable, split in paragraphs")
paragraph_summaries = build_graph_asset(
    SpawnFromList("paragraphs", "para")
    | GenerateLLMRequest("Summarise:\n{para}", model=MODEL) | ConcurrentLLMCall(broker)
    | ExtractResponseText() | CollectAllToList("text", "para_summaries"),
    "paragraph_summaries", upstream="fable_chapters", group_name="fables", resources=resources,
    description="every paragraph summarised, gathered back per fable")
fable_synopses = build_graph_asset(
    Apply("\n".join, "para_summaries", "summaries_text")
    | GenerateLLMRequest("Fable synopsis in two sentences:\n{summaries_text}", model=MODEL)
    | ConcurrentLLMCall(broker) | ExtractResponseText(output_field="synopsis"),
    "fable_synopses", upstream="paragraph_summaries", group_name="fables", resources=resources,
    description="a synopsis per fable from its paragraph summaries")
# The same poems through the OpenAI Batch API at half price: a run submits and ends with the
# entries pending; the sensor runs it again until every answer is collected.
poems_batch = build_graph_asset(
    GenerateLLMRequest(quickstart.PROMPT, model=MODEL)
    | ConcurrentLLMCall(BatchLLMCallBroker(f"{DATA_DIR}/batch_broker.jsonl", poll_interval=0))
    | ExtractResponseText(),
    "poems_batch", upstream="myth_passages", group_name="poems",
    description="the poems via the Batch API (half price, collected on a later run)")
assets = [myth_passages, poems, poems_batch, fable_chapters, paragraph_summaries, fable_synopses]

build_datasets = dg.define_asset_job("build_datasets", selection=dg.AssetSelection.assets(*assets))
nightly = dg.ScheduleDefinition(name="nightly_datasets", cron_schedule="0 3 * * *",
                                target=build_datasets)

defs = dg.Definitions(
    assets=assets,
    asset_checks=[build_held_back_check(a) for a in (poems, poems_batch, paragraph_summaries,
                                                      fable_synopses)],
    jobs=[*jobs, quickstart_multiprocess, build_datasets],
    schedules=[nightly],
    sensors=[build_pending_sensor(poems_batch)],
    resources={**resources, **bf_resources(f"{DATA_DIR}/assets")},
    # the broker runs each step's calls concurrently; one process per step only adds start-up
    executor=dg.in_process_executor,
)
