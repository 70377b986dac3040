"""If and loops as Dagster ops: a split op, both branches and a merge; loops unrolled into gate
ops and body copies, a gate with nobody left to loop emitting nothing so later iterations skip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dagster as dg

from ..op.control import If, Loop, restore_order
from ._steps import finish_step, step_context
from .payload import Payload, Report

if TYPE_CHECKING:
    from .builder import GraphBuilder

__all__ = ["compose_if", "compose_loop"]


def compose_if(b: GraphBuilder, op: If, name: str, handle: Any, suffix: str, mapped: bool) -> Any:
    def split(context, in0):
        ctx = step_context(context, [in0], name)
        entries = list(in0.entries)
        yes, no = op.split(entries, ctx)
        report = Report.from_context(ctx)
        yield dg.Output(Payload(yes, report), "yes")
        yield dg.Output(Payload(no, report), "no")
        yield dg.Output([e.idx for e in entries], "order")

    def merge(context, yes, no, order):
        ctx = step_context(context, [yes, no], name + "_merge")
        out = op.merge(list(yes.entries), list(no.entries), {k: i for i, k in enumerate(order)}, ctx)
        yield dg.Output(Payload(out, Report.from_context(ctx)), "out0")

    ops_all = [op]
    outs = {"yes": dg.Out(dg.Any), "no": dg.Out(dg.Any), "order": dg.Out(dg.Any)}
    yes, no, order = b._op(name, split, ["in0"], outs, ops_all, op.describe())(handle)
    assert op.then_plan is not None
    yes_out = b.compose(op.then_plan, yes, suffix, mapped)
    no_out = b.compose(op.else_plan, no, suffix, mapped) if op.else_plan is not None else no
    merge_def = b._op(name + "_merge", merge, ["yes", "no", "order"], {"out0": dg.Out(dg.Any)},
                      [], "If: both branches back together, in input order")
    return merge_def(yes_out, no_out, order)


def compose_loop(b: GraphBuilder, op: Loop, name: str, handle: Any, suffix: str,
                  mapped: bool) -> Any:
    assert op.body_plan is not None
    n = op.max_iterations
    final = _loop_final_op(b, op, f"{name}_it{n}_exit" if n else f"{name}_exit", bump=n > 0)
    if n == 0:
        stop, order = _loop_gate_op(b, op, f"{name}_begin", first=True, last=True)(handle)
        return _loop_merge_op(b, op, name + "_merge")([stop], order)
    go, stop, order = _loop_gate_op(b, op, f"{name}_it1_gate", first=True, last=False)(handle)
    stops = [stop]
    for it in range(1, n + 1):
        body_out = b.compose(op.body_plan, go, f"{suffix}_it{it}", mapped)
        if it < n:
            go, stop = _loop_gate_op(b, op, f"{name}_it{it + 1}_gate", first=False,
                                     last=False)(body_out)
        else:
            stop = final(body_out)
        stops.append(stop)
    return _loop_merge_op(b, op, name + "_merge")(stops, order)


def _loop_gate_op(b: GraphBuilder, op: Loop, name: str, first: bool, last: bool) -> Any:
    def fn(context, in0):
        ctx = step_context(context, [in0], name)
        before = len(ctx.warnings)
        entries = list(in0.entries)
        if first:
            op.begin(entries, ctx)
        else:
            op.after_body(entries)
        if last:  # zero iterations: everything leaves now
            go, stop = op._final_gate(entries, ctx)
            stop = stop + op.finish(go, ctx)
            go = []
        else:
            go, stop = op.gate(entries, ctx)
        report = finish_step(context, ctx, before)
        if go:
            yield dg.Output(Payload(go, report), "go")
        yield dg.Output(Payload(stop, report), "stop")
        if first:
            yield dg.Output([e.idx for e in entries], "order")

    outs: dict[str, dg.Out] = {}
    if not last:
        outs["go"] = dg.Out(dg.Any, is_required=False)
    outs["stop"] = dg.Out(dg.Any)
    if first:
        outs["order"] = dg.Out(dg.Any)
    return b._op(name, fn, ["in0"], outs, [], op.describe())


def _loop_final_op(b: GraphBuilder, op: Loop, name: str, bump: bool) -> Any:
    def fn(context, in0):
        ctx = step_context(context, [in0], name)
        before = len(ctx.warnings)
        entries = op.after_body(list(in0.entries)) if bump else list(in0.entries)
        go, stop = op._final_gate(entries, ctx)
        out = stop + op.finish(go, ctx)
        yield dg.Output(Payload(out, finish_step(context, ctx, before)), "out0")

    return b._op(name, fn, ["in0"], {"out0": dg.Out(dg.Any)}, [], op.describe())


def _loop_merge_op(b: GraphBuilder, op: Loop, name: str) -> Any:
    def fn(context, stops, order):
        ctx = step_context(context, list(stops), name)
        done = [e for p in stops for e in p.entries]
        out = restore_order(done, {k: i for i, k in enumerate(order)})
        yield dg.Output(Payload(out, Report.from_context(ctx)), "out0")

    return b._op(name, fn, ["stops", "order"], {"out0": dg.Out(dg.Any)}, [],
                 "loop exit: every iteration's leavers, in input order")
