"""Shared setup for the examples: offline by default, data files next to the scripts.

Every example calls :func:`offline_unless_key` first. Without ``OPENAI_API_KEY`` it sets
``BATCHFACTORY_OFFLINE=1`` and says so in one line (on stderr), so every ``model@provider``
is answered by the built-in ``local`` provider: deterministic synthetic text labelled
``[synthetic]``, no key, no network, $0. With a key the examples call the real API (or
whatever ``OPENAI_BASE_URL`` points at).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import batchfactory_dagster as bf
from batchfactory_dagster.llm.providers import offline_unless_key

__all__ = ["DATA", "MODEL", "offline_unless_key", "run"]

DATA = Path(__file__).resolve().parent / "data"
MODEL = "gpt-4o-mini@openai"


def run(name: str, pipeline: Callable[..., bf.Segment],
        ledger: str = "cache/llm_broker.jsonl") -> bf.RunResult:
    """The seed's set-up (a CacheFolder, a broker on its ledger), one run, the summary."""
    offline_unless_key()
    project = bf.CacheFolder(name, 1, 0, 0)
    broker = bf.brokers.ConcurrentLLMCallBroker(project[ledger])
    try:
        result = pipeline(project, broker).compile().execute(dispatch_brokers=True)
    finally:
        broker.close()
    return result
