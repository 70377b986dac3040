"""The public surface is pinned, and the core runs without dagster."""

from __future__ import annotations

import subprocess
import sys

import batchfactory_dagster as bf
import batchfactory_dagster.brokers as brokers
import batchfactory_dagster.op as op

README_OPS = {
    "ReadMarkdownLines", "FromList", "Apply", "Filter", "SetField", "SpawnFromList",
    "CollectAllToList", "If", "While", "Repeat", "GenerateLLMRequest", "ConcurrentLLMCall",
    "ExtractResponseText", "CleanupLLMData", "PrintTotalCost", "Shuffle", "TakeFirstN",
    "WriteJsonl", "Print", "ChatHistoryToText", "Replicate", "Collect", "JoinByParent",
    "Character", "ReadMarkdownEntries", "ReadJsonl", "ReadParquet", "RemoveField",
    "RenameField", "Sort", "WriteParquet", "ToList", "ExtractResponseMeta", "UpdateChatHistory",
    "TransformCharacterDialogueForLLM", "SplitCot", "BrokerFailureBehavior", "wire",
}


def test_op_catalogue_exports_every_seed_name():
    assert README_OPS <= set(op.__all__)
    for name in op.__all__:
        assert getattr(op, name) is not None


def test_top_level_and_brokers_exports():
    assert {"CacheFolder", "Entry", "Segment", "GraphSegment", "Plan", "RunResult", "brokers",
            "op", "Ledger", "JsonlLedger", "DefinitionError", "EntryError"} <= set(bf.__all__)
    assert {"ConcurrentLLMCallBroker", "BatchLLMCallBroker", "DeferredBroker",
            "ImmediateBroker", "BrokerFailureBehavior"} <= set(brokers.__all__)
    assert bf.brokers.ConcurrentLLMCallBroker is brokers.ConcurrentLLMCallBroker
    for module in (bf, brokers, op):
        assert sorted(module.__all__) == sorted(set(module.__all__))


def test_core_imports_and_runs_without_dagster():
    code = ("import sys; sys.modules['dagster'] = None\n"
            "import batchfactory_dagster as bf, batchfactory_dagster.op as o\n"
            "import batchfactory_dagster.brokers, batchfactory_dagster.llm\n"
            "import batchfactory_dagster.testing\n"
            "r = (o.FromList([{'n': 3}]) | o.Repeat(o.SetField('x', 1), 2)).compile().execute()\n"
            "assert r[0].rev == 2\n"
            "assert 'dagster' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n")
    subprocess.run([sys.executable, "-c", code], check=True)
