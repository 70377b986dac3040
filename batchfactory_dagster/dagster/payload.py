"""What travels on a Dagster edge: a batch of entries plus the run report so far.

The report travels with the entries because each Dagster step may run in its own process: the
last op of a graph sums what every op before it did (calls, cache hits, cost, held entries).
Reports are keyed by step name, so merging the two halves of a branch counts nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.context import CallStats, Held, RunContext
from ..core.entry import Entry

__all__ = ["Payload", "Report"]


@dataclass
class Report:
    calls: dict[str, CallStats] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    held: dict[tuple[str, str], str] = field(default_factory=dict)
    warnings: dict[str, None] = field(default_factory=dict)  # an ordered set

    @classmethod
    def merged(cls, reports: list[Report]) -> Report:
        out = cls()
        for r in reports:
            out.calls.update(r.calls)
            out.counts.update(r.counts)
            out.held.update(r.held)
            out.warnings.update(r.warnings)
        return out

    def to_context(self, step: str) -> RunContext:
        ctx = RunContext(dispatch_brokers=True, progress=False, op_name=step)
        ctx.calls = dict(self.calls)
        ctx.counts = dict(self.counts)
        ctx.held = [Held(op, idx, reason) for (op, idx), reason in self.held.items()]
        ctx.warnings = list(self.warnings)
        return ctx

    @classmethod
    def from_context(cls, ctx: RunContext) -> Report:
        return cls(dict(ctx.calls), dict(ctx.counts),
                   {(h.op, h.idx): h.reason for h in ctx.held}, dict.fromkeys(ctx.warnings))

    def total(self) -> CallStats:
        total = CallStats()
        for stats in self.calls.values():
            total.add(stats)
        return total

    def to_json(self) -> dict[str, Any]:
        return {"calls": self.total().to_dict(),
                "held": [{"op": op, "idx": idx, "reason": r} for (op, idx), r in self.held.items()],
                "warnings": list(self.warnings)}


@dataclass
class Payload:
    entries: list[Entry]
    report: Report = field(default_factory=Report)
