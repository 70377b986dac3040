"""Example 01: the README quick-start, a linear LLM transform with caching.

Reads the Greek-myth titles in ``examples/data/myths.txt`` (one per line under a
``# Greek Myths`` heading), shuffles them with a fixed seed, keeps 3 and asks
``gpt-4o-mini@openai`` to rewrite each as a four-line poem. Writes
``./data/quickstart_v1.0.0/out/poems.jsonl`` (relative to the current directory) with one row
per poem: ``keyword`` (the title), ``text`` (the poem) and ``directory`` ("Greek Myths"),
prints the poems and the run summary, and returns the RunResult.

Run it twice: the second run is served from the ledger (0 new calls, same poems).
Offline (no OPENAI_API_KEY) the poems are labelled synthetic text.

    python examples/01_basic_pipeline.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # for _common, also when loaded by file path

from _common import DATA, MODEL, run  # noqa: E402

import batchfactory_dagster as bf  # noqa: E402
from batchfactory_dagster.op import *  # noqa: E402

PROMPT = 'Rewrite the passage from "{directory}" titled "{keyword}" as a four‑line poem.'


def pipeline(project: bf.CacheFolder, broker: bf.brokers.ConcurrentLLMCallBroker) -> bf.Segment:
    return (
        ReadMarkdownLines(DATA / "myths.txt", key_field="keyword", directory_str_field="directory")
        | Shuffle(42)
        | TakeFirstN(3)
        | GenerateLLMRequest(PROMPT, model=MODEL)
        | ConcurrentLLMCall(project["cache/llm_call.jsonl"], broker)
        | ExtractResponseText()
        | WriteJsonl(project["out/poems.jsonl"], output_fields=["keyword", "text", "directory"])
        | Print()
    )


def main() -> bf.RunResult:
    result = run("quickstart", pipeline)
    print(result.summary())
    return result


if __name__ == "__main__":
    main()
