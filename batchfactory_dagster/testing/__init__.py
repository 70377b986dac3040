"""Test helpers: a loopback fake of the OpenAI API (in-thread or in a child process)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchfactory_dagster.testing.fake_openai import (
        FakeOpenAIServer,
        FakeServerProcess,
        serve_fake_openai,
    )

__all__ = ["FakeOpenAIServer", "FakeServerProcess", "serve_fake_openai"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m batchfactory_dagster.testing.fake_openai` does not import the
    # module twice (runpy warns when the package already imported it).
    if name in __all__:
        from batchfactory_dagster.testing import fake_openai

        return getattr(fake_openai, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
