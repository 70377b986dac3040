"""Plan -> Dagster graph: one Dagster op per BatchFactory op, payloads on the edges.

* plain ops: one Dagster op each, named after the BatchFactory op;
* a top-level SpawnFromList: its children leave as chunks (DynamicOutput), the ops between it
  and its CollectAllToList are mapped over the chunks and a regroup op collects them; spawns
  nested deeper (Dagster allows one level of fan-out) run with their body inside one op;
* Repeat/While: unrolled into gate ops and body copies (``_it<k>``); a gate with nobody left
  to loop emits nothing, so the later iterations are skipped; loops longer than
  ``unroll_limit`` run inside one op;
* If: a split op, both branches, a merge op that restores the input order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dagster as dg

from ..brokers.base import Broker
from ..core.entry import Entry
from ..core.errors import DefinitionError
from ..core.op import Op
from ..core.plan import Plan, check_unique
from ..op.control import If, Loop
from ._control import compose_if, compose_loop
from ._steps import finish_step, step_context
from .payload import Payload

__all__ = ["BuildOptions", "GraphBuilder", "assign_broker_keys", "mapping_key"]

_BAD = re.compile(r"[^A-Za-z0-9_]")


def mapping_key(i: int, first_idx: str) -> str:
    """Deterministic, sanitised, unique: the chunk number keeps it unique, the idx explains it."""
    return f"c{i:05d}_{_BAD.sub('_', first_idx)[:40]}"


@dataclass
class BuildOptions:
    chunk_size: int = 1000
    unroll_limit: int = 20
    final_io_manager_key: str | None = None
    prefix: str = ""  # graph assets prefix op names: two assets may both have a "Filter"
    fuse_chunks: bool = False  # the ops between a spawn and its collect as one op per chunk


def assign_broker_keys(plan: Plan) -> dict[str, Broker]:
    """Give every broker object in the plan tree a resource key and tell its ops; returns
    key -> broker. Keys name the kind: ``llm_broker`` (ConcurrentLLMCallBroker),
    ``batch_llm_broker``, otherwise the class name in snake case; ``_2``, ``_3`` for more."""
    keys: dict[str, Broker] = {}
    for op in _all_ops(plan):
        broker = getattr(op, "broker", None)
        if not isinstance(broker, Broker):
            continue
        key = next((k for k, b in keys.items() if b is broker), None)
        if key is None:
            base = _key_base(broker)
            n = sum(1 for k in keys if k == base or k.startswith(base + "_"))
            key = base if n == 0 else f"{base}_{n + 1}"
            keys[key] = broker
        op.broker_key = key  # type: ignore[attr-defined]
    return keys


def _key_base(broker: Broker) -> str:
    name = type(broker).__name__
    if name == "ConcurrentLLMCallBroker":
        return "llm_broker"
    if name == "BatchLLMCallBroker":
        return "batch_llm_broker"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _all_ops(plan: Plan) -> list[Op]:
    ops: list[Op] = []
    for node in plan.nodes:
        ops.append(node.op)
        for sub in node.op.sub_plans():
            ops.extend(_all_ops(sub))
    return ops


def _broker_keys_of(ops: list[Op]) -> set[str]:
    keys: set[str] = set()
    for op in ops:
        if getattr(op, "broker_key", None):
            keys.add(op.broker_key)  # type: ignore[attr-defined]
        for sub in op.sub_plans():
            keys |= _broker_keys_of([n.op for n in sub.nodes])
    return keys


class GraphBuilder:
    """Composes a plan's ops inside a ``@dg.graph`` body."""

    def __init__(self, plan: Plan, options: BuildOptions) -> None:
        self.plan, self.opts = plan, options

    # -- op factories ---------------------------------------------------------------------------
    def _op(self, name: str, fn: Callable[..., Any], ins: list[str], outs: dict[str, dg.Out],
            ops: list[Op], description: str) -> dg.OpDefinition:
        return dg.op(name=self.opts.prefix + name, ins={i: dg.In(dg.Any) for i in ins}, out=outs,
                     required_resource_keys=_broker_keys_of(ops), description=description,
                     tags={"kind": "batchfactory"})(fn)

    def node_op(self, plan: Plan, i: int, name: str) -> dg.OpDefinition:
        node = plan.nodes[i]
        op, n_in, n_out = node.op, node.op.n_in, node.op.n_out
        outs = {f"out{p}": dg.Out(dg.Any) for p in range(n_out)}

        def fn(context, **kw):
            payloads = [kw[f"in{p}"] for p in range(n_in)]
            ctx = step_context(context, payloads, name)
            before = len(ctx.warnings)
            inputs = [list(p.entries) for p in payloads]
            outputs = op.process(inputs, ctx)
            report = finish_step(context, ctx, before)
            for p, batch in enumerate(outputs):
                check_unique(name, batch)
                yield dg.Output(Payload(batch, report), f"out{p}",
                                metadata={"entries": len(batch)})

        return self._op(name, fn, [f"in{p}" for p in range(n_in)], outs, [op], op.describe())

    def fused_op(self, plan: Plan, indices: list[int], name: str, ext_in: list[tuple[int, int]],
                 ext_out: list[tuple[int, int]]) -> dg.OpDefinition:
        """Several plan nodes run in one op (nested spawns, long loops)."""
        chosen = set(indices)
        outs = {f"out{k}": dg.Out(dg.Any) for k in range(len(ext_out))}

        def fn(context, **kw):
            payloads = [kw[f"in{k}"] for k in range(len(ext_in))]
            ctx = step_context(context, payloads, name)
            before = len(ctx.warnings)
            buffers = {src: list(p.entries) for src, p in zip(ext_in, payloads)}
            for i in sorted(chosen):
                plan.run_node(i, buffers, _plan_input(plan, i, buffers), ctx)
            report = finish_step(context, ctx, before)
            for k, src in enumerate(ext_out):
                yield dg.Output(Payload(buffers[src], report), f"out{k}")

        ops = [plan.nodes[i].op for i in indices]
        return self._op(name, fn, [f"in{k}" for k in range(len(ext_in))], outs, ops,
                        " + ".join(plan.nodes[i].name for i in indices))

    # -- composition ------------------------------------------------------------------------------
    def compose(self, plan: Plan, plan_input: Any, suffix: str = "", mapped: bool = False) -> Any:
        handles: dict[tuple[int, int], Any] = {}
        if plan.input_port is not None:
            handles[("input", 0)] = plan_input  # type: ignore[index]
        units = self._units(plan, mapped)
        while units:
            unit = next((u for u in units if all(self._ready(plan, handles, s) for s in u.sources)),
                        None)
            if unit is None:
                raise DefinitionError("cannot order the ops for Dagster; please report this graph")
            units.remove(unit)
            unit.compose(self, plan, handles, suffix, mapped)
        return handles[plan.output]

    @staticmethod
    def _ready(plan: Plan, handles: dict, src: tuple[int, int] | None) -> bool:
        return (("input", 0) if src is None else src) in handles

    def _units(self, plan: Plan, mapped: bool) -> list[_Unit]:
        units: list[_Unit] = []
        taken: set[int] = set()
        for i, node in enumerate(plan.nodes):
            if i in taken:
                continue
            op = node.op
            if getattr(op, "is_spawn", False):
                collect, body = plan.spawn_region(i)
                group = [i, *body, collect]
                taken.update(group)
                dynamic = not mapped and self._mappable(plan, i, collect, body)
                units.append(_SpawnUnit(plan, i, collect, body) if dynamic
                             else _FusedUnit(plan, group))
            elif isinstance(op, Loop) and (op.max_iterations > self.opts.unroll_limit or mapped):
                # mapped over chunks, an unrolled loop's exit would be a fan-in, which Dagster
                # does not allow downstream of a dynamic output: the loop runs inside one op
                units.append(_FusedUnit(plan, [i]))
            else:
                units.append(_NodeUnit(plan, i))
        return units

    @staticmethod
    def _mappable(plan: Plan, spawn: int, collect: int, body: list[int]) -> bool:
        """The ops between spawn and collect take children only and feed only the collect."""
        if not body:
            return False
        inside = set(body)
        for j in body:
            for src in plan.nodes[j].inputs:
                if src is None or (src[0] not in inside and src != (spawn, 1)):
                    return False
        for j, node in enumerate(plan.nodes):
            if j in inside:
                continue
            for src in node.inputs:
                if src is not None and src[0] in inside and not (j == collect):
                    return False
        return plan.nodes[collect].inputs[1] is not None and plan.nodes[collect].inputs[1][0] in inside


def _plan_input(plan: Plan, i: int, buffers: dict) -> list[Entry] | None:
    return buffers.get(("input", 0)) if None in plan.nodes[i].inputs else None  # type: ignore[call-overload]


def _in_handle(handles: dict, src: tuple[int, int] | None) -> Any:
    return handles[("input", 0) if src is None else src]


class _Unit:
    sources: list[tuple[int, int] | None]

    def compose(self, b: GraphBuilder, plan: Plan, handles: dict, suffix: str,
                mapped: bool) -> None:
        raise NotImplementedError


class _NodeUnit(_Unit):
    def __init__(self, plan: Plan, i: int) -> None:
        self.i = i
        self.sources = list(plan.nodes[i].inputs)

    def compose(self, b, plan, handles, suffix, mapped):
        node = plan.nodes[self.i]
        ins = [_in_handle(handles, s) for s in self.sources]
        if isinstance(node.op, If):
            handles[(self.i, 0)] = compose_if(b, node.op, node.name + suffix, ins[0], suffix,
                                               mapped)
            return
        if isinstance(node.op, Loop):
            handles[(self.i, 0)] = compose_loop(b, node.op, node.name + suffix, ins[0], suffix,
                                                 mapped)
            return
        result = b.node_op(plan, self.i, node.name + suffix)(
            **{f"in{p}": h for p, h in enumerate(ins)})
        outs = [result] if node.op.n_out == 1 else list(result)
        for p, h in enumerate(outs):
            handles[(self.i, p)] = h


class _FusedUnit(_Unit):
    def __init__(self, plan: Plan, group: list[int]) -> None:
        inside = set(group)
        self.group = sorted(group)
        self.ext_in: list[tuple[int, int]] = []
        for j in self.group:
            for src in plan.nodes[j].inputs:
                key = ("input", 0) if src is None else src
                if (src is None or src[0] not in inside) and key not in self.ext_in:
                    self.ext_in.append(key)  # type: ignore[arg-type]
        self.sources = [None if s == ("input", 0) else s for s in self.ext_in]
        consumed = {src for n in plan.nodes for src in n.inputs if src is not None}
        consumed.add(plan.output)
        self.ext_out = [(j, p) for j in self.group for p in range(plan.nodes[j].op.n_out)
                        if (j, p) in consumed and not _consumed_inside(plan, (j, p), inside)]

    def compose(self, b, plan, handles, suffix, mapped):
        name = plan.nodes[self.group[0]].name + "_group" + suffix
        op_def = b.fused_op(plan, self.group, name, self.ext_in, self.ext_out)
        result = op_def(*[handles[s] for s in self.ext_in])
        outs = [result] if len(self.ext_out) == 1 else list(result)
        for src, h in zip(self.ext_out, outs):
            handles[src] = h


def _consumed_inside(plan: Plan, src: tuple[int, int], inside: set[int]) -> bool:
    if src == plan.output:
        return False
    return any(src in plan.nodes[j].inputs for j in inside)


class _SpawnUnit(_Unit):
    def __init__(self, plan: Plan, spawn: int, collect: int, body: list[int]) -> None:
        self.spawn, self.collect, self.body = spawn, collect, body
        self.sources = list(plan.nodes[spawn].inputs)

    def compose(self, b, plan, handles, suffix, mapped):
        spawn_node, collect_node = plan.nodes[self.spawn], plan.nodes[self.collect]
        parents, children = _spawn_op(b, spawn_node.op, spawn_node.name + suffix)(
            *[_in_handle(handles, s) for s in self.sources])
        sub = _region_plan(plan, self.spawn, self.body, self.collect)
        mapped_out = children.map(lambda chunk: _compose_chunk(b, sub, chunk, suffix))
        handles[(self.collect, 0)] = _collect_op(b, collect_node.op, collect_node.name + suffix)(
            parents, mapped_out.collect())


def _compose_chunk(b: GraphBuilder, sub: Plan, chunk: Any, suffix: str) -> Any:
    """The per-chunk ops: one Dagster op each, or all in one (``fuse_chunks``: one step per
    chunk, for executors where a step costs a process or a pod)."""
    if not b.opts.fuse_chunks:
        return b.compose(sub, chunk, suffix, mapped=True)
    handles: dict[Any, Any] = {("input", 0): chunk}
    _FusedUnit(sub, list(range(len(sub.nodes)))).compose(b, sub, handles, suffix, True)
    return handles[sub.output]


def _region_plan(plan: Plan, spawn: int, body: list[int], collect: int) -> Plan:
    """The ops between a spawn and its collect as a plan whose input is the children chunk."""
    from ..core.plan import Node

    index = {j: k for k, j in enumerate(body)}
    nodes = []
    for j in body:
        n = plan.nodes[j]
        inputs = [None if src == (spawn, 1) else (index[src[0]], src[1])  # type: ignore[index]
                  for src in n.inputs]
        nodes.append(Node(n.name, n.op, inputs))
    last = plan.nodes[collect].inputs[1]
    assert last is not None
    first = next(k for k, n in enumerate(nodes) if None in n.inputs)
    port = nodes[first].inputs.index(None)
    return Plan(nodes, (index[last[0]], last[1]), (first, port))


def _spawn_op(b: GraphBuilder, spawn: Op, name: str) -> dg.OpDefinition:
    size = b.opts.chunk_size

    def fn(context, in0):
        ctx = step_context(context, [in0], name)
        before = len(ctx.warnings)
        parents, children = spawn.process([list(in0.entries)], ctx)
        check_unique(name, children)
        report = finish_step(context, ctx, before)
        yield dg.Output(Payload(parents, report), "parents", metadata={"entries": len(parents)})
        for k in range(0, len(children), size):
            chunk = children[k:k + size]
            yield dg.DynamicOutput(Payload(chunk, report), mapping_key(k // size, chunk[0].idx),
                                   output_name="children")

    return b._op(name, fn, ["in0"], {"parents": dg.Out(dg.Any), "children": dg.DynamicOut(dg.Any)},
                 [spawn], spawn.describe() + f" (children in chunks of {size})")


def _collect_op(b: GraphBuilder, collect: Op, name: str) -> dg.OpDefinition:
    def fn(context, in0, in1):
        ctx = step_context(context, [in0, *in1], name)
        before = len(ctx.warnings)
        children = [e for chunk in in1 for e in chunk.entries]
        (out,) = collect.process([list(in0.entries), children], ctx)
        report = finish_step(context, ctx, before)
        yield dg.Output(Payload(out, report), "out0", metadata={"entries": len(out)})

    return b._op(name, fn, ["in0", "in1"], {"out0": dg.Out(dg.Any)}, [collect], collect.describe())
