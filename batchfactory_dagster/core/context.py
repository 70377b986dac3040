"""RunContext: what one execution knows and reports (held-back entries, call stats, warnings)."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CallStats", "Held", "RunContext"]

log = logging.getLogger("batchfactory_dagster")


@dataclass
class CallStats:
    """What the broker ops of one run did; summed over ops for the run report and Dagster metadata.

    ``cost_usd`` is None when some call had no known price (never reported as 0 then).
    """

    requests: int = 0  # entries that needed an answer
    new_calls: int = 0  # requests sent to a provider this run (attempts counted in ``attempts``)
    attempts: int = 0
    cache_hits: int = 0
    deduplicated: int = 0  # entries served by another entry's identical request in this run
    failed: int = 0
    pending: int = 0  # not dispatched (dispatch_brokers=False) or submitted to a deferred broker
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    unpriced_calls: int = 0
    saved_usd: float = 0.0  # what the cache hits would have cost
    estimated_cost_usd: float | None = 0.0  # for pending requests
    models: set[str] = field(default_factory=set)

    def add(self, other: CallStats) -> None:
        for name in ("requests", "new_calls", "attempts", "cache_hits", "deduplicated", "failed",
                     "pending", "prompt_tokens", "completion_tokens", "unpriced_calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.saved_usd += other.saved_usd
        self.cost_usd = _add_cost(self.cost_usd, other.cost_usd)
        self.estimated_cost_usd = _add_cost(self.estimated_cost_usd, other.estimated_cost_usd)
        self.models |= other.models

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "models"}
        d["models"] = sorted(self.models)
        d["total_tokens"] = self.total_tokens
        return d


def _add_cost(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


@dataclass(frozen=True)
class Held:
    """An entry an op did not pass on, and why (a failed call under STAY, a missing child...)."""

    op: str
    idx: str
    reason: str


@dataclass
class RunContext:
    """State shared by the ops of one execution."""

    dispatch_brokers: bool = True
    progress: bool | None = None  # None: show bars only on an interactive terminal
    op_name: str = ""
    held: list[Held] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calls: dict[str, CallStats] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # op -> (entries in, out)
    extra: dict[str, Any] = field(default_factory=dict)

    def hold(self, idx: str, reason: str) -> None:
        self.held.append(Held(self.op_name, idx, reason))

    def warn(self, message: str) -> None:
        """Record a warning in the run report and raise it as a UserWarning."""
        text = f"op {self.op_name!r}: {message}" if self.op_name else message
        self.warnings.append(text)
        warnings.warn(text, UserWarning, stacklevel=3)

    def call_stats(self) -> CallStats:
        """The stats of the op that is running now (created on first use)."""
        return self.calls.setdefault(self.op_name, CallStats())

    def total_calls(self) -> CallStats:
        total = CallStats()
        for stats in self.calls.values():
            total.add(stats)
        return total

    @property
    def show_progress(self) -> bool:
        if self.progress is not None:
            return self.progress
        return sys.stderr.isatty()
