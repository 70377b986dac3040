"""Small helpers shared by tests (imported as ``from tests.helpers import ...``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (file names start with digits, so not importable by name)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def done_prompts(path: Path) -> list[str]:
    """The last message of every complete 'done' line in a broker ledger, one per line written
    (so a prompt recorded twice shows twice); torn or foreign lines are skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("status") == "done":
            out.append(rec["request"]["messages"][-1]["content"])
    return out
