"""Example 06: a custom deferred broker, a human-labelling queue fed from JSONL files.

The first run writes the texts that need a label to ``to_label.jsonl`` and holds the entries
back. A person (here: ``label_by_hand``, a keyword rule standing in for one) writes answers
to ``labels.jsonl``. The next run collects them; labels already collected are never asked for
again, because the broker's ledger remembers them by the content of the job.

    python examples/06_custom_broker.py [folder]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import batchfactory_dagster as bf
from batchfactory_dagster.brokers.base import JobFailure
from batchfactory_dagster.brokers.deferred import DeferredBroker, Poll, Submission
from batchfactory_dagster.op import *
from batchfactory_dagster.op.broker_call import BrokerCall

REVIEWS = [
    "I love this kettle, it boils in a minute.",
    "Broke after two days. Terrible.",
    "It is a kettle.",
    "Great value and it looks lovely.",
]


class LabelQueueBroker(DeferredBroker):
    """Jobs go to ``<folder>/to_label.jsonl``; answers come from ``<folder>/labels.jsonl`` as
    ``{"key": ..., "label": ...}`` or ``{"key": ..., "skip": "why"}``."""

    def __init__(self, folder: str) -> None:
        super().__init__(os.path.join(folder, "ledger.jsonl"))
        self.queue = os.path.join(folder, "to_label.jsonl")
        self.answers = os.path.join(folder, "labels.jsonl")

    def submit(self, submission: Submission) -> dict[str, Any]:
        lines = [json.dumps({"key": k, "submission": submission.id, **job}) + "\n"
                 for k, job in submission.jobs.items()]
        with open(self.queue, "a", encoding="utf-8") as f:
            f.write("".join(lines))  # one write: a crash leaves all lines or none
        return {"queue": self.queue}

    def find(self, submission: Submission) -> dict[str, Any] | None:
        # After a crash between writing the queue and recording it: already queued?
        queued = (row.get("submission") for row in _read_jsonl(self.queue))
        return {"queue": self.queue} if submission.id in queued else None

    def poll(self, submission: Submission) -> Poll:
        poll = Poll(state="waiting for a labeller")
        for row in _read_jsonl(self.answers):
            if "label" in row:
                poll.done[row["key"]] = ({"label": row["label"]}, None, 0.0)
            elif "skip" in row:
                poll.failed[row["key"]] = JobFailure("skipped", row["skip"])
        return poll


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pipeline(broker: LabelQueueBroker) -> bf.Segment:
    return (
        FromList(REVIEWS, output_field="text")
        | BrokerCall(broker, "text", "annotation", params={"task": "sentiment"})
        | Apply(lambda a: a["label"], "annotation", "label")
    )


def label_by_hand(folder: str) -> int:
    """The human in the loop: answer every queued job not answered yet."""
    answered = {row["key"] for row in _read_jsonl(os.path.join(folder, "labels.jsonl"))}
    rows = []
    for job in _read_jsonl(os.path.join(folder, "to_label.jsonl")):
        if job["key"] not in answered:
            text = job["text"].lower()
            label = "positive" if ("love" in text or "great" in text) else (
                "negative" if "terrible" in text else "neutral")
            rows.append(json.dumps({"key": job["key"], "label": label}) + "\n")
            answered.add(job["key"])
    with open(os.path.join(folder, "labels.jsonl"), "a", encoding="utf-8") as f:
        f.writelines(rows)
    return len(rows)


def main(folder: str | None = None) -> tuple[bf.RunResult, bf.RunResult]:
    folder = folder or tempfile.mkdtemp(prefix="bf-labels-")
    broker = LabelQueueBroker(folder)
    first = pipeline(broker).compile().execute()
    print(f"run 1: {len(first)} labelled, {len(first.held)} waiting for a person "
          f"({first.held[0].reason if first.held else '-'})")
    print(f"a person labelled {label_by_hand(folder)} texts")
    second = pipeline(broker).compile().execute()
    for e in second:
        print(f"{e.data['label']:>8}: {e.data['text']}")
    broker.close()
    return first, second


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
