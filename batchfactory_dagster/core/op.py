"""Op: one function over a whole batch, and the kinds users subclass.

An op has fixed input and output ports. ``a | b`` wires a's ``pipe_out`` port to b's ``pipe_in``
port; ``wire()`` reaches the others. Ops are batch-synchronous: ``process`` gets every entry of
every input port at once, so ``TakeFirstN(3)`` gives exactly 3 and ``Shuffle(42)`` is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .entry import Entry
from .errors import BatchFactoryError, EntryError

if TYPE_CHECKING:
    from .context import RunContext
    from .graph import Segment
    from .plan import Plan

__all__ = ["ApplyOp", "BatchOp", "FilterOp", "Op", "OutputOp", "SourceOp", "call_user"]

Batch = list[Entry]


class Op:
    """Base of every op. Subclasses set the port counts and implement ``process``."""

    n_in: ClassVar[int] = 1
    n_out: ClassVar[int] = 1
    pipe_in: ClassVar[int] = 0  # the in-port `x | self` feeds
    pipe_out: ClassVar[int] = 0  # the out-port `self | x` reads
    name: str | None = None  # a user-chosen name; compile() gives unnamed ops unique ones

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        raise NotImplementedError

    # -- composition ------------------------------------------------------------------------
    def named(self, name: str) -> Op:
        """Give this op a name (it becomes the Dagster op name); returns self."""
        self.name = name
        return self

    def to_segment(self) -> Segment:
        from .graph import Segment

        return Segment.of(self)

    def __or__(self, other: Op | Segment) -> Segment:
        return self.to_segment() | other

    def compile(self) -> Plan:
        """A one-op pipeline."""
        return self.to_segment().compile()

    def sub_plans(self) -> list[Plan]:
        """Compiled sub-plans of a composite op (loop bodies, branches); empty for plain ops."""
        return []

    def compile_children(self, namer: Callable[[Op], str]) -> None:
        """Composite ops compile their bodies here, sharing the parent's naming scheme."""

    def describe(self) -> str:
        """One line for logs and the Dagster UI."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else type(self).__name__

    def error(self, ctx: RunContext, entry: Entry | None, field: str | None, problem: str,
              hint: str = "") -> EntryError:
        return EntryError(ctx.op_name or type(self).__name__, field,
                          entry.idx if entry is not None else None, problem, hint)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()" if self.name is None else f"{type(self).__name__}({self.name!r})"


def call_user(op: Op, ctx: RunContext, fn: Callable[..., Any], entry: Entry, field: str | None,
              *args: Any) -> Any:
    """Call user code for one entry; wrap its exception in an EntryError that says where."""
    try:
        return fn(*args)
    except BatchFactoryError:
        raise
    except Exception as exc:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise op.error(ctx, entry, field, f"{name} raised {type(exc).__name__}: {exc}",
                       "fix the function or filter such entries out before this op") from exc


class ApplyOp(Op):
    """Changes each entry in place; same idx out."""

    def update(self, entry: Entry, ctx: RunContext) -> None:
        raise NotImplementedError

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        for entry in inputs[0]:
            self.update(entry, ctx)
        return [inputs[0]]


class FilterOp(Op):
    """Keeps the entries for which ``keep`` is true; the rest are dropped (counted in the report)."""

    def keep(self, entry: Entry, ctx: RunContext) -> bool:
        raise NotImplementedError

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        return [[e for e in inputs[0] if self.keep(e, ctx)]]


class BatchOp(Op):
    """Sees and returns the whole batch: may reorder, drop or add entries."""

    def process_batch(self, entries: Batch, ctx: RunContext) -> Batch:
        raise NotImplementedError

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        return [self.process_batch(inputs[0], ctx)]


class SourceOp(Op):
    """Makes entries from outside (files, lists); has no input port."""

    n_in: ClassVar[int] = 0

    def generate(self, ctx: RunContext) -> Batch:
        raise NotImplementedError

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        return [self.generate(ctx)]


class OutputOp(Op):
    """Writes or shows the batch, then passes it on unchanged."""

    def write(self, entries: Sequence[Entry], ctx: RunContext) -> None:
        raise NotImplementedError

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        self.write(inputs[0], ctx)
        return [inputs[0]]
