"""Example 03: split and summarise, fan-out/fan-in in the deprecated shared-idx style.

Each fable of ``examples/data/fables.md`` is copied three ways with ``Replicate(3)`` (same idx
on every branch). Branch 0 summarises the ``plot``, branch 1 lists the ``characters``,
branch 2 states the ``moral``; two ``Collect`` ops copy ``characters`` and ``moral`` back onto
branch 0's entry, and a last prompt writes a ``review`` from the three. That is 4 LLM calls per
fable (16 for the 4 fables). Writes ``./data/split_summarize_v1.0.0/out/reviews.jsonl`` with
``title``, ``plot``, ``characters``, ``moral`` and ``review``, and returns the RunResult.

``Replicate`` and ``Collect`` emit a DeprecationWarning when built: they go away in v0.4.
New code fans out with SpawnFromList/CollectAllToList (example 04) or JoinByParent.
Run it twice: the second run makes 0 new calls.

    python examples/03_split_and_summarize.py
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


def ask_llm(prompt: str, output_field: str, project: bf.CacheFolder,
            broker: bf.brokers.ConcurrentLLMCallBroker) -> bf.Segment:
    """Prompt -> call (retrying failures) -> answer text in ``output_field`` -> tidy up."""
    return (
        GenerateLLMRequest(prompt, model=MODEL)
        | ConcurrentLLMCall(project[f"cache/call_{output_field}.jsonl"], broker,
                            failure_behavior=BrokerFailureBehavior.RETRY)
        | ExtractResponseText(output_field=output_field)
        | CleanupLLMData()
    )


def pipeline(project: bf.CacheFolder, broker: bf.brokers.ConcurrentLLMCallBroker) -> bf.Segment:
    replicate = Replicate(3)
    plot = ask_llm("Summarise the plot of this fable in two sentences:\n\n{text}", "plot",
                   project, broker)
    characters = ask_llm("List the characters of this fable, one line each:\n\n{text}",
                         "characters", project, broker)
    moral = ask_llm("State the moral of this fable in one sentence:\n\n{text}", "moral",
                    project, broker)
    collect_characters = Collect("characters")
    collect_moral = Collect("moral")
    g = (
        ReadMarkdownEntries(DATA / "fables.md", "text")
        | replicate
        | plot
        | collect_characters
        | collect_moral
        | ask_llm("Write a three-sentence review of the fable {title}. Plot: {plot}\n"
                  "Characters: {characters}\nMoral: {moral}", "review", project, broker)
        | WriteJsonl(project["out/reviews.jsonl"],
                     output_fields=["title", "plot", "characters", "moral", "review"])
    )
    g.wire(replicate, characters, 1, 0)
    g.wire(characters, collect_characters, 0, 1)
    g.wire(replicate, moral, 2, 0)
    g.wire(moral, collect_moral, 0, 1)
    return g


def main() -> bf.RunResult:
    result = run("split_summarize", pipeline)
    for e in result:
        print(f"## {e.data['title']}\n{e.data['review']}\n")
    print(result.summary())
    return result


if __name__ == "__main__":
    main()
