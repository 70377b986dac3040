"""Control flow: If, Repeat, While. Composite ops that hold compiled sub-plans.

Locally they run their sub-plans in a loop; the Dagster adapter unrolls them into bounded
subgraphs using the same hooks (``split``/``merge`` for If, ``begin``/``gate``/``after_body``/
``finish`` for loops), so both paths share one semantics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.context import RunContext
from ..core.entry import Entry
from ..core.errors import DefinitionError, DuplicateIdxError, IterationLimitError
from ..core.graph import Namer, Segment
from ..core.op import Op, call_user
from ..core.plan import Plan
from .common import get_field

__all__ = ["If", "Loop", "Repeat", "While", "restore_order"]

Body = Op | Segment


def _compile_body(owner: Op, body: Body, namer: Namer, role: str) -> Plan:
    seg = Segment.of(body)
    if seg.head.n_in == 0:
        raise DefinitionError(f"the {role} starts with a source ({seg.head!r}); it must start "
                              "with an op that takes entries", op=repr(owner))
    return seg.compile(_namer=namer)


def restore_order(entries: list[Entry], order: dict[str, int]) -> list[Entry]:
    """Put entries back in the order their idx had on the way in (new ones go last)."""
    last = len(order)
    return sorted(entries, key=lambda e: order.get(e.idx, last))


class If(Op):
    """``If(cond, then, else_=None)``: entries where ``cond(data)`` holds go through ``then``,
    the others through ``else_`` (or straight on); both meet again in input order."""

    def __init__(self, cond: Callable[[dict], Any], then: Body, else_: Body | None = None) -> None:
        if not callable(cond):
            raise DefinitionError(f"If needs a callable condition, got {cond!r}")
        self.cond, self.then, self.else_ = cond, then, else_
        self.then_plan: Plan | None = None
        self.else_plan: Plan | None = None

    def compile_children(self, namer: Namer) -> None:
        self.then_plan = _compile_body(self, self.then, namer, "then-branch")
        if self.else_ is not None:
            self.else_plan = _compile_body(self, self.else_, namer, "else-branch")

    def sub_plans(self) -> list[Plan]:
        return [p for p in (self.then_plan, self.else_plan) if p is not None]

    def split(self, entries: list[Entry], ctx: RunContext) -> tuple[list[Entry], list[Entry]]:
        yes: list[Entry] = []
        no: list[Entry] = []
        for e in entries:
            (yes if call_user(self, ctx, self.cond, e, None, e.data) else no).append(e)
        return yes, no

    def merge(self, yes: list[Entry], no: list[Entry], order: dict[str, int],
              ctx: RunContext) -> list[Entry]:
        seen = {e.idx for e in yes}
        for e in no:
            if e.idx in seen:
                raise DuplicateIdxError(ctx.op_name, "idx", e.idx,
                                        "the same idx came out of both branches",
                                        "a branch must not create entries with the other's idx")
        return restore_order(yes + no, order)

    def process(self, inputs: list[list[Entry]], ctx: RunContext) -> list[list[Entry]]:
        assert self.then_plan is not None, "compile() first"
        order = {e.idx: i for i, e in enumerate(inputs[0])}
        yes, no = self.split(inputs[0], ctx)
        yes = self.then_plan.run(yes, ctx) if yes else []
        if self.else_plan is not None and no:
            no = self.else_plan.run(no, ctx)
        return [self.merge(yes, no, order, ctx)]


class Loop(Op):
    """Runs ``body`` while ``continues(entry)`` holds, at most ``max_iterations`` times.

    Each pass through the body bumps ``rev``, so every iteration is a distinct (idx, rev).
    Entries still looping when the bound is hit are reported (``on_limit``: "warn" passes them
    on with a warning, "raise" raises IterationLimitError, "drop" holds them back).
    """

    def __init__(self, body: Body, max_iterations: int, on_limit: str = "warn") -> None:
        if max_iterations < 0:
            raise DefinitionError(f"max_iterations must be >= 0, got {max_iterations}")
        if on_limit not in ("warn", "raise", "drop"):
            raise DefinitionError(f"on_limit must be 'warn', 'raise' or 'drop', got {on_limit!r}")
        self.body, self.max_iterations, self.on_limit = body, max_iterations, on_limit
        self.body_plan: Plan | None = None

    def compile_children(self, namer: Namer) -> None:
        self.body_plan = _compile_body(self, self.body, namer, "loop body")

    def sub_plans(self) -> list[Plan]:
        return [self.body_plan] if self.body_plan is not None else []

    # hooks shared with the Dagster adapter
    def begin(self, entries: list[Entry], ctx: RunContext) -> None:
        """Set up loop state on entries entering the loop."""

    def continues(self, entry: Entry, ctx: RunContext) -> bool:
        raise NotImplementedError

    def enter(self, entry: Entry, ctx: RunContext) -> None:
        """Called on an entry about to go through the body (e.g. rounds += 1)."""

    def gate(self, active: list[Entry], ctx: RunContext) -> tuple[list[Entry], list[Entry]]:
        """Split into (go round again, leave the loop)."""
        go: list[Entry] = []
        stop: list[Entry] = []
        for e in active:
            if self.continues(e, ctx):
                self.enter(e, ctx)
                go.append(e)
            else:
                stop.append(e)
        return go, stop

    def after_body(self, entries: list[Entry]) -> list[Entry]:
        for e in entries:
            e.rev += 1
        return entries

    def finish(self, still_going: list[Entry], ctx: RunContext) -> list[Entry]:
        """Handle entries that want another round after max_iterations; returns those to emit."""
        if not still_going:
            return []
        msg = (f"{len(still_going)} entries still met the loop condition after "
               f"max_iterations={self.max_iterations} (first: {still_going[0].idx!r}); "
               "raise max_iterations or make the condition reach False")
        if self.on_limit == "raise":
            raise IterationLimitError(f"op {ctx.op_name!r}: {msg}")
        if self.on_limit == "drop":
            for e in still_going:
                ctx.hold(e.idx, "loop ran out of iterations")
            ctx.warn(msg + "; they were held back")
            return []
        ctx.warn(msg + "; they were passed on as they are")
        return still_going

    def process(self, inputs: list[list[Entry]], ctx: RunContext) -> list[list[Entry]]:
        assert self.body_plan is not None, "compile() first"
        order = {e.idx: i for i, e in enumerate(inputs[0])}
        active = inputs[0]
        self.begin(active, ctx)
        done: list[Entry] = []
        for _ in range(self.max_iterations):
            go, stop = self.gate(active, ctx)
            done.extend(stop)
            if not go:
                active = []
                break
            active = self.after_body(self.body_plan.run(go, ctx))
        else:
            go, stop = self._final_gate(active, ctx)
            done.extend(stop)
            done.extend(self.finish(go, ctx))
        return [restore_order(done, order)]

    def _final_gate(self, active: list[Entry], ctx: RunContext) -> tuple[list[Entry], list[Entry]]:
        go = [e for e in active if self.continues(e, ctx)]
        ids = {id(e) for e in go}
        return go, [e for e in active if id(e) not in ids]


class Repeat(Loop):
    """``Repeat(body, n)``: run the body n times. The body sees ``rounds`` = 1..n; entries leave
    with rounds = n and rev bumped n times. ``max_rounds_field`` reads n per entry."""

    def __init__(self, body: Body, max_rounds: int | None = None, *, rounds_field: str = "rounds",
                 max_rounds_field: str | None = None, initial_value: int | None = 0,
                 max_iterations: int | None = None, on_limit: str = "warn") -> None:
        if max_rounds is None and max_rounds_field is None:
            raise DefinitionError("Repeat needs a number of rounds (Repeat(body, 3)) "
                                  "or max_rounds_field=")
        bound = max_iterations if max_iterations is not None else (
            max_rounds if max_rounds is not None else 100)
        super().__init__(body, bound, on_limit)
        self.max_rounds, self.max_rounds_field = max_rounds, max_rounds_field
        self.rounds_field, self.initial_value = rounds_field, initial_value

    def begin(self, entries: list[Entry], ctx: RunContext) -> None:
        for e in entries:
            if self.initial_value is not None:
                e.data[self.rounds_field] = self.initial_value
            else:
                get_field(self, ctx, e, self.rounds_field)

    def continues(self, entry: Entry, ctx: RunContext) -> bool:
        limit = (self.max_rounds if self.max_rounds_field is None
                 else get_field(self, ctx, entry, self.max_rounds_field))
        return entry.data[self.rounds_field] < limit

    def enter(self, entry: Entry, ctx: RunContext) -> None:
        entry.data[self.rounds_field] += 1


class While(Loop):
    """``While(cond, body, max_iterations=100)``: run the body while ``cond(data)`` holds."""

    def __init__(self, cond: Callable[[dict], Any], body: Body, max_iterations: int = 100,
                 on_limit: str = "warn") -> None:
        if not callable(cond):
            raise DefinitionError(f"While needs a callable condition, got {cond!r}")
        super().__init__(body, max_iterations, on_limit)
        self.cond = cond

    def continues(self, entry: Entry, ctx: RunContext) -> bool:
        return bool(call_user(self, ctx, self.cond, entry, None, entry.data))
