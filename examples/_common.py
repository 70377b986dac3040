"""Shared setup for the examples: offline by default, data files next to the scripts.

Every example calls :func:`offline_unless_key` first. Without ``OPENAI_API_KEY`` it sets
``BATCHFACTORY_OFFLINE=1`` and says so in one line (on stderr), so every ``model@provider``
is answered by the built-in ``local`` provider: deterministic synthetic text labelled
``[synthetic]``, no key, no network, $0. With a key the examples call the real API (or
whatever ``OPENAI_BASE_URL`` points at).
"""

from __future__ import annotations

from pathlib import Path

from batchfactory_dagster.llm.providers import offline_unless_key

__all__ = ["DATA", "MODEL", "offline_unless_key"]

DATA = Path(__file__).resolve().parent / "data"
MODEL = "gpt-4o-mini@openai"
