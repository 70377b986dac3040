"""Segments (what `|` and `wire()` build) and compile(): validation into a Plan."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DefinitionError
from .op import Op

if TYPE_CHECKING:
    from .plan import Plan, RunResult

__all__ = ["Edge", "GraphSegment", "Segment", "wire"]

NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Edge:
    src: Op
    src_port: int
    dst: Op
    dst_port: int


class Segment:
    """A piece of graph: ops, edges between their ports, a head (input side) and a tail (output).

    ``a | b`` returns a new segment (a and b are left as they were); ``wire()`` adds an edge to
    this segment in place and returns it. Each op appears once.
    """

    def __init__(self, nodes: list[Op], edges: list[Edge], head: Op, tail: Op) -> None:
        self.nodes, self.edges, self.head, self.tail = nodes, edges, head, tail

    @classmethod
    def of(cls, op: Op | Segment) -> Segment:
        if isinstance(op, Segment):
            return op
        if not isinstance(op, Op):
            raise DefinitionError(
                f"expected an op or a segment, got {type(op).__name__}: {op!r}. "
                "Every step of a pipeline must be an op (e.g. Apply(fn) to wrap a function)"
            )
        return cls([op], [], op, op)

    def to_segment(self) -> Segment:
        return self

    def __or__(self, other: Op | Segment) -> Segment:
        right = Segment.of(other)
        _check_disjoint(self, right)
        if right.head.n_in == 0:
            raise DefinitionError(
                f"{right.head!r} is a source (no input port) and cannot follow {self.tail!r} "
                "with `|`; start a new pipeline with it or join them with wire()")
        seg = Segment(self.nodes + right.nodes, self.edges + right.edges, self.head, right.tail)
        seg._add(Edge(self.tail, self.tail.pipe_out, right.head, right.head.pipe_in))
        return seg

    def __ror__(self, other: Op) -> Segment:
        return Segment.of(other) | self

    def wire(self, src: Op | Segment, dst: Op | Segment, src_port: int = 0,
             dst_port: int = 0) -> Segment:
        """Connect ``src``'s out-port to ``dst``'s in-port; segments not yet here are merged in."""
        src_op = src.tail if isinstance(src, Segment) else src
        dst_op = dst.head if isinstance(dst, Segment) else dst
        for part in (src, dst):
            self._merge(Segment.of(part))
        self._add(Edge(src_op, src_port, dst_op, dst_port))
        if src_op is self.tail and src_port == src_op.pipe_out:
            self.tail = dst_op  # the output moved on: `g | x` and compile() follow it
        return self

    def _merge(self, other: Segment) -> None:
        ids = {id(n) for n in self.nodes}
        if id(other.head) in ids:
            return  # already part of this graph
        _check_disjoint(self, other)
        self.nodes = self.nodes + other.nodes
        self.edges = self.edges + other.edges

    def _add(self, edge: Edge) -> None:
        if not 0 <= edge.src_port < edge.src.n_out:
            raise DefinitionError(f"has no out-port {edge.src_port} (it has {edge.src.n_out})",
                                  op=repr(edge.src))
        if not 0 <= edge.dst_port < edge.dst.n_in:
            raise DefinitionError(f"has no in-port {edge.dst_port} (it has {edge.dst.n_in})",
                                  op=repr(edge.dst))
        for e in self.edges:
            if e.src is edge.src and e.src_port == edge.src_port:
                raise DefinitionError(
                    f"out-port {edge.src_port} is already wired to {e.dst!r}; an out-port feeds "
                    "one op (use If, Replicate or SpawnFromList to fan out)", op=repr(edge.src))
            if e.dst is edge.dst and e.dst_port == edge.dst_port:
                raise DefinitionError(
                    f"in-port {edge.dst_port} is already fed by {e.src!r}; an in-port takes one "
                    "edge (use a merge op such as JoinByParent to fan in)", op=repr(edge.dst))
        self.edges = self.edges + [edge]

    # -- compile ------------------------------------------------------------------------------
    def compile(self, *, _namer: Namer | None = None) -> Plan:
        """Validate and order the graph. Errors are DefinitionErrors naming the op."""
        from .plan import build_plan

        namer = _namer or Namer()
        _pair_spawns(self)
        _check_ports(self)
        order = _toposort(self)
        names = {id(op): namer(op) for op in order}
        for op in order:
            op.compile_children(namer)
        plan = build_plan(self, order, names)
        if _namer is None:  # the top of the tree: sub-plans are checked through their owners
            from .fields import check_fields

            check_fields(plan)
        return plan

    def execute(self, dispatch_brokers: bool = True, **kwargs: Any) -> RunResult:
        """Shortcut for ``compile().execute(...)``."""
        return self.compile().execute(dispatch_brokers=dispatch_brokers, **kwargs)

    def __repr__(self) -> str:
        return f"Segment({' | '.join(repr(n) for n in self.nodes)})"


GraphSegment = Segment  # the seed README's name


def wire(src: Op | Segment, dst: Op | Segment, src_port: int = 0, dst_port: int = 0) -> Segment:
    """Start a graph from one explicit edge: ``wire(spawn, body, 1, 0)``."""
    return Segment.of(src).wire(src, dst, src_port, dst_port)


class Namer:
    """Gives each op of a plan tree a unique Dagster-valid name."""

    def __init__(self) -> None:
        self.taken: dict[str, Op] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, op: Op) -> str:
        if op.name is not None:
            if not NAME_RE.match(op.name):
                raise DefinitionError(
                    f"name {op.name!r} is not valid: names must match ^[A-Za-z0-9_]+$ "
                    "(they become Dagster op names)", op=op.name)
            if op.name in self.taken and self.taken[op.name] is not op:
                raise DefinitionError("two ops share this name; give one of them another name",
                                      op=op.name)
            self.taken[op.name] = op
            return op.name
        base = type(op).__name__
        while True:
            n = self.counts.get(base, 0) + 1
            self.counts[base] = n
            name = base if n == 1 else f"{base}_{n}"
            if name not in self.taken:
                self.taken[name] = op
                return name


def _check_disjoint(a: Segment, b: Segment) -> None:
    ids = {id(n) for n in a.nodes}
    for n in b.nodes:
        if id(n) in ids:
            raise DefinitionError(
                "this op is already part of the pipeline; each op appears once. Create a new "
                "instance (e.g. a function that returns the op) to use it twice", op=repr(n))


def _in_edges(seg: Segment) -> dict[tuple[int, int], Edge]:
    return {(id(e.dst), e.dst_port): e for e in seg.edges}


def _out_edges(seg: Segment) -> dict[tuple[int, int], Edge]:
    return {(id(e.src), e.src_port): e for e in seg.edges}


def _pair_spawns(seg: Segment) -> None:
    """Find each spawn's collect by nesting depth and wire the parents port if left open.

    This is what makes the README's linear ``SpawnFromList(...) | body | CollectAllToList(...)``
    work: the children go through the body, the parents wait at the collect.
    """
    outs = _out_edges(seg)
    ins = _in_edges(seg)
    for op in seg.nodes:
        if not getattr(op, "is_spawn", False):
            continue
        collect = _find_collect(op, outs)
        if collect is None:
            raise DefinitionError(
                "no CollectAllToList downstream of this spawn; add one after the per-item steps "
                "to gather the children back into their parents", op=repr(op))
        collect.spawn = op  # type: ignore[attr-defined]
        if (id(op), 0) not in outs and (id(collect), 0) not in ins:
            seg._add(Edge(op, 0, collect, 0))


def _find_collect(spawn: Op, outs: dict[tuple[int, int], Edge]) -> Op | None:
    found: list[Op] = []
    stack: list[tuple[Op, int]] = [(spawn, 1)]
    seen: set[tuple[int, int]] = set()
    while stack:
        op, depth = stack.pop()
        for port in range(op.n_out):
            if op is spawn and port == 0:
                continue  # the parents path does not count
            edge = outs.get((id(op), port))
            if edge is None:
                continue
            nxt, d = edge.dst, depth
            if getattr(nxt, "is_collect", False) and edge.dst_port == nxt.pipe_in:
                d -= 1
            elif getattr(nxt, "is_spawn", False):
                d += 1
            if d == 0:
                if all(f is not nxt for f in found):
                    found.append(nxt)
                continue
            if (id(nxt), d) not in seen:
                seen.add((id(nxt), d))
                stack.append((nxt, d))
    if len(found) > 1:
        raise DefinitionError(f"children reach several collects ({found}); each spawn needs "
                              "exactly one CollectAllToList", op=repr(spawn))
    return found[0] if found else None


def _check_ports(seg: Segment) -> None:
    ins, outs = _in_edges(seg), _out_edges(seg)
    for op in seg.nodes:
        for port in range(op.n_in):
            if (id(op), port) in ins or (op is seg.head and port == op.pipe_in):
                continue
            raise DefinitionError(
                f"in-port {port} is not wired, so this op would never get its entries; "
                "wire it with seg.wire(src, this_op, src_port, " + str(port) + ")", op=repr(op))
        for port in range(op.n_out):
            if (id(op), port) in outs or (op is seg.tail and port == op.pipe_out):
                continue
            raise DefinitionError(
                f"out-port {port} is not wired, so its entries would be lost; wire it to "
                "another op", op=repr(op))


def _toposort(seg: Segment) -> list[Op]:
    position = {id(n): i for i, n in enumerate(seg.nodes)}
    indeg = {id(n): 0 for n in seg.nodes}
    succ: dict[int, list[Op]] = {id(n): [] for n in seg.nodes}
    for e in seg.edges:
        indeg[id(e.dst)] += 1
        succ[id(e.src)].append(e.dst)
    ready = sorted((n for n in seg.nodes if indeg[id(n)] == 0), key=lambda n: position[id(n)])
    order: list[Op] = []
    while ready:
        op = ready.pop(0)
        order.append(op)
        for nxt in succ[id(op)]:
            indeg[id(nxt)] -= 1
            if indeg[id(nxt)] == 0:
                ready.append(nxt)
                ready.sort(key=lambda n: position[id(n)])
    if len(order) < len(seg.nodes):
        stuck = [repr(n) for n in seg.nodes if indeg[id(n)] > 0]
        raise DefinitionError(
            f"the graph has a cycle through {', '.join(stuck)}; loop with Repeat(body, n) or "
            "While(cond, body, max_iterations) instead of wiring an op back")
    return order
