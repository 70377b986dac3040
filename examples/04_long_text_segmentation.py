"""Example 04: long-text segmentation, the Spawn + CollectAll power pattern.

``examples/data/fables.md`` holds four of Aesop's fables in Joseph Jacobs' public-domain
translation (The Fables of Æsop, 1894), one ``#`` heading per fable. Each fable is split into
its paragraphs (a list); ``SpawnFromList`` makes one child entry per paragraph, each
paragraph is summarised by its own LLM call (all fables' paragraphs run concurrently), and
``CollectAllToList`` waits until every paragraph of a fable is back and stores their
summaries, in paragraph order, as ``para_summaries``. A last prompt per fable turns those
into a ``synopsis``.

The 4 fables have 2 + 2 + 2 + 6 = 12 paragraphs: 12 paragraph calls plus 4 synopsis calls.
Writes ``./data/spawn_demo_v1.0.0/out/synopses.jsonl`` with ``title``, ``paragraphs``,
``para_summaries`` (one per paragraph) and ``synopsis``, and returns the RunResult.
Run it twice: the second run makes 0 new calls.

    python examples/04_long_text_segmentation.py
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


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs are separated by blank lines; lines inside one are joined."""
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def pipeline(project: bf.CacheFolder, broker: bf.brokers.ConcurrentLLMCallBroker) -> bf.Segment:
    return (
        ReadMarkdownEntries(DATA / "fables.md", "text")              # each entry = a fable
        | Apply(split_paragraphs, "text", "paragraphs")
        | SpawnFromList("paragraphs", "para")                         # fan-out per paragraph
        | GenerateLLMRequest("Summarise:\n{para}", model=MODEL)
        | ConcurrentLLMCall(project["cache/para_sum.jsonl"], broker)
        | ExtractResponseText()
        | CollectAllToList("text", "para_summaries")                  # wait until ALL paras done
        | Apply("\n".join, "para_summaries", "summaries_text")
        | GenerateLLMRequest("Fable synopsis in two sentences:\n{summaries_text}", model=MODEL)
        | ConcurrentLLMCall(project["cache/fable_sum.jsonl"], broker)
        | ExtractResponseText(output_field="synopsis")
        | CleanupLLMData()
        | WriteJsonl(project["out/synopses.jsonl"],
                     output_fields=["title", "paragraphs", "para_summaries", "synopsis"])
    )


def main() -> bf.RunResult:
    result = run("spawn_demo", pipeline, "cache/llm.jsonl")
    for e in result:
        print(f"## {e.data['title']} ({len(e.data['paragraphs'])} paragraphs)\n"
              f"{e.data['synopsis']}\n")
    print(result.summary())
    return result


if __name__ == "__main__":
    main()
