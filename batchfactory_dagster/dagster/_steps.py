"""What every generated Dagster op does first and last: rebuild the run context from its input
payloads (plus the brokers its resources provide), and turn the context back into a report."""

from __future__ import annotations

from typing import Any

from ..core.context import RunContext
from .payload import Payload, Report

__all__ = ["finish_step", "step_context"]


def step_context(context: Any, payloads: list[Payload], name: str) -> RunContext:
    step = name
    key = _mapping_key(context)
    if key:
        step = f"{name}[{key}]"
    ctx = Report.merged([p.report for p in payloads]).to_context(step)
    brokers = {}
    for k in context.op_def.required_resource_keys:
        res = getattr(context.resources, k)
        brokers[k] = res.get_broker() if hasattr(res, "get_broker") else res
    ctx.extra["brokers"] = brokers
    ctx.extra["step"] = step
    return ctx


def _mapping_key(context: Any) -> str | None:
    try:
        return context.get_mapping_key()
    except Exception:  # not every context kind has one
        return None


def finish_step(context: Any, ctx: RunContext, before: int) -> Report:
    for w in ctx.warnings[before:]:
        context.log.warning(w)
    return Report.from_context(ctx)
