"""Plan: a validated, topologically ordered pipeline, and the local executor that runs it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .context import CallStats, Held, RunContext, log
from .entry import Entry
from .errors import DuplicateIdxError
from .op import Op

if TYPE_CHECKING:
    import pandas

    from .graph import Segment

__all__ = ["Node", "Plan", "RunResult", "build_plan", "check_unique"]


@dataclass
class Node:
    """One op in a plan. ``inputs[port]`` is ``(node index, out-port)``, or None for the plan input."""

    name: str
    op: Op
    inputs: list[tuple[int, int] | None]


@dataclass
class RunResult(Sequence[Entry]):
    """What ``execute()`` returns: the output entries plus the run report."""

    entries: list[Entry]
    ctx: RunContext = field(repr=False)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):  # type: ignore[override]
        return self.entries[i]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    @property
    def held(self) -> list[Held]:
        """Entries that ops did not pass on (failed calls under STAY, incomplete collects...)."""
        return self.ctx.held

    @property
    def warnings(self) -> list[str]:
        return self.ctx.warnings

    @property
    def calls(self) -> CallStats:
        return self.ctx.total_calls()

    def data(self) -> list[dict[str, Any]]:
        return [e.data for e in self.entries]

    def to_pandas(self) -> pandas.DataFrame:
        from .frames import entries_to_frame

        return entries_to_frame(self.entries)

    def summary(self) -> str:
        c = self.calls
        cost = "unknown" if c.cost_usd is None else f"${c.cost_usd:.4f}"
        parts = [f"{len(self.entries)} entries out in {self.seconds:.2f}s"]
        if c.requests:
            parts.append(f"{c.new_calls} new calls, {c.cache_hits} cache hits, "
                         f"{c.failed} failed, {c.pending} pending, {c.total_tokens} tokens, "
                         f"cost {cost}, saved ${c.saved_usd:.4f}")
        if self.held:
            parts.append(f"{len(self.held)} entries held back")
        if self.warnings:
            parts.append(f"{len(self.warnings)} warnings")
        return "; ".join(parts)


class Plan:
    """A compiled pipeline. ``execute()`` runs it locally; the Dagster adapter maps it to ops."""

    def __init__(self, nodes: list[Node], output: tuple[int, int],
                 input_port: tuple[int, int] | None) -> None:
        self.nodes = nodes
        self.output = output  # (node index, out-port) whose entries the plan returns
        self.input_port = input_port  # (node index, in-port) fed by the plan input, if any
        self._pumping: Iterator[str] | None = None
        self._pump_ctx: RunContext | None = None
        self._pump_out: list[Entry] = []

    def execute(self, dispatch_brokers: bool = True, inputs: Iterable[Any] | None = None,
                progress: bool | None = None) -> RunResult:
        """Run every op once over its whole batch and return the tail's entries with a report.

        With ``dispatch_brokers=False`` broker ops spend nothing: they serve cached answers,
        hold the rest back and report how many calls and what cost a real run would make.
        """
        ctx = RunContext(dispatch_brokers=dispatch_brokers, progress=progress)
        start = time.perf_counter()
        out = self.run(to_entries(inputs), ctx)
        result = RunResult(out, ctx, time.perf_counter() - start)
        log.info("run finished: %s", result.summary())
        return result

    def run(self, batch: list[Entry] | None, ctx: RunContext) -> list[Entry]:
        """Run on a batch inside an existing context (loop bodies, branches, Dagster)."""
        out: list[Entry] = []
        for _ in self._steps(batch, ctx, out):
            pass
        return out

    def pump(self, dispatch_brokers: bool = True, inputs: Iterable[Any] | None = None) -> str | None:
        """Run the next op only (for debugging); returns its name, or None once finished."""
        if self._pumping is None:
            self._pump_ctx = RunContext(dispatch_brokers=dispatch_brokers)
            self._pump_out = []
            self._pumping = self._steps(to_entries(inputs), self._pump_ctx, self._pump_out)
        name = next(self._pumping, None)
        if name is None:
            self._pumping = None
        return name

    @property
    def pumped(self) -> list[Entry]:
        """The output collected by ``pump()`` once it returned None."""
        return self._pump_out

    def _steps(self, batch: list[Entry] | None, ctx: RunContext,
               out: list[Entry]) -> Iterator[str]:
        buffers: dict[tuple[int, int], list[Entry]] = {}
        for i in range(len(self.nodes)):
            self.run_node(i, buffers, batch, ctx)
            yield self.nodes[i].name
        out.extend(buffers.get(self.output, []))

    def run_node(self, i: int, buffers: dict[tuple[int, int], list[Entry]],
                 batch: list[Entry] | None, ctx: RunContext) -> None:
        """Run node ``i`` on the buffers of its inputs (consumed) and store its outputs."""
        node, outer = self.nodes[i], ctx.op_name
        inputs = [buffers.pop(src) if src is not None else list(batch or [])
                  for src in node.inputs]
        ctx.op_name = node.name
        outputs = node.op.process(inputs, ctx)
        if len(outputs) != node.op.n_out:
            raise RuntimeError(f"op {node.name!r} returned {len(outputs)} batches for "
                               f"{node.op.n_out} out-ports")
        for port, produced in enumerate(outputs):
            check_unique(node.name, produced)
            buffers[(i, port)] = produced
        prev = ctx.counts.get(node.name, (0, 0))
        ctx.counts[node.name] = (prev[0] + sum(map(len, inputs)),
                                 prev[1] + sum(map(len, outputs)))
        ctx.op_name = outer

    def spawn_region(self, i: int) -> tuple[int, list[int]]:
        """For spawn node ``i``: its collect's node index and the nodes between them (in order)."""
        collect = next(j for j, n in enumerate(self.nodes)
                       if getattr(n.op, "spawn", None) is self.nodes[i].op)
        inside: set[tuple[int, int]] = {(i, 1)}
        body: list[int] = []
        for j in range(i + 1, collect):
            if any(src in inside for src in self.nodes[j].inputs):
                body.append(j)
                inside.update((j, p) for p in range(self.nodes[j].op.n_out))
        return collect, body

    @property
    def ops(self) -> list[Op]:
        return [n.op for n in self.nodes]

    def names(self, recursive: bool = True) -> list[str]:
        """Every op name in run order, sub-plans included."""
        names: list[str] = []
        for n in self.nodes:
            names.append(n.name)
            if recursive:
                for sub in n.op.sub_plans():
                    names.extend(sub.names())
        return names

    def __repr__(self) -> str:
        return f"Plan({' -> '.join(n.name for n in self.nodes)})"


def check_unique(op_name: str, entries: list[Entry]) -> None:
    """An idx is unique within a batch; a collision names both origins."""
    seen: dict[str, Entry] = {}
    for e in entries:
        first = seen.setdefault(e.idx, e)
        if first is not e:
            raise DuplicateIdxError(
                op_name, "idx", e.idx,
                f"two entries share this idx (from {first.origin or 'unknown origin'} and from "
                f"{e.origin or 'unknown origin'})",
                "every entry needs its own idx: check a custom idx field or a join that "
                "creates copies")


def to_entries(items: Iterable[Any] | None) -> list[Entry] | None:
    """Plan input: entries as they are; dicts become entries with content-derived idx."""
    if items is None:
        return None
    from ..op.sources import entries_from_items

    return entries_from_items(list(items), origin="input")


def build_plan(seg: Segment, order: list[Op], names: dict[int, str]) -> Plan:
    index = {id(op): i for i, op in enumerate(order)}
    feeds = {(id(e.dst), e.dst_port): (index[id(e.src)], e.src_port) for e in seg.edges}
    nodes = [Node(names[id(op)], op, [feeds.get((id(op), p)) for p in range(op.n_in)])
             for op in order]
    head = seg.head
    input_port = None
    if head.n_in and (id(head), head.pipe_in) not in feeds:
        input_port = (index[id(head)], head.pipe_in)
    return Plan(nodes, (index[id(seg.tail)], seg.tail.pipe_out), input_port)
