"""Shared setup for the examples: offline by default, data files next to the scripts.

Every example calls :func:`offline_unless_key` first. Without ``OPENAI_API_KEY`` it sets
``BATCHFACTORY_OFFLINE=1``, so every ``model@provider`` is answered by the built-in ``local``
provider: deterministic synthetic text labelled ``[synthetic]``, no key, no network, $0.
With a key the examples call the real API (or whatever ``OPENAI_BASE_URL`` points at).
"""

from __future__ import annotations

import os
from pathlib import Path

from batchfactory_dagster.llm.providers import OFFLINE_ENV, offline_mode

__all__ = ["DATA", "MODEL", "offline_unless_key"]

DATA = Path(__file__).resolve().parent / "data"
MODEL = "gpt-4o-mini@openai"


def offline_unless_key() -> bool:
    """Switch to offline mode when no OpenAI key is configured; True when offline."""
    if not os.environ.get("OPENAI_API_KEY"):
        os.environ[OFFLINE_ENV] = "1"
    if offline_mode():
        print(f"{OFFLINE_ENV}=1 (no OPENAI_API_KEY): answers are synthetic, labelled "
              "[synthetic], made offline at no cost; set OPENAI_API_KEY for real answers.")
        return True
    return False
