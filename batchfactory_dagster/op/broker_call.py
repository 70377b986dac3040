"""BrokerCall: send any JSON-able job through any broker (search, human labels, custom APIs).

ConcurrentLLMCall is the LLM-shaped version; this one builds the job from entry fields, so a
custom broker (see examples/06_custom_broker.py) needs no LLM request format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..brokers.base import Broker, BrokerFailureBehavior, JobResult
from ..core.context import RunContext
from ..core.entry import Entry
from ..core.errors import ConfigError, DefinitionError
from ..core.op import Op
from .common import get_field

__all__ = ["BrokerCall"]


class BrokerCall(Op):
    """Answer one job per entry through ``broker``: the job is ``{field: value}`` for
    ``input_fields`` plus ``params``; its content hash is the cache key, so equal jobs are paid
    for once. Pending jobs hold their entry back (with the broker's reason); failures follow
    ``failure_behavior`` as in ConcurrentLLMCall.
    """

    def __init__(self, broker: Broker, input_fields: str | Sequence[str],
                 output_field: str = "result", *, params: dict[str, Any] | None = None,
                 failure_behavior: BrokerFailureBehavior | str = BrokerFailureBehavior.STAY,
                 status_field: str = "status", error_field: str = "error",
                 job_idx_field: str = "job_idx") -> None:
        if not isinstance(broker, Broker):
            raise DefinitionError(f"BrokerCall needs a Broker, got {broker!r}")
        try:
            self.failure_behavior = BrokerFailureBehavior(
                str(getattr(failure_behavior, "value", failure_behavior)).lower())
        except ValueError:
            raise DefinitionError(f"failure_behavior must be RETRY, STAY or EMIT, got "
                                  f"{failure_behavior!r}") from None
        self.broker = broker
        self.input_fields = [input_fields] if isinstance(input_fields, str) else list(input_fields)
        self.params = dict(params or {})
        clash = sorted(set(self.params) & set(self.input_fields))
        if clash:
            raise DefinitionError(f"BrokerCall: {clash} are both input fields and params")
        self.output_field, self.status_field = output_field, status_field
        self.error_field, self.job_idx_field = error_field, job_idx_field

    def _job(self, entry: Entry, ctx: RunContext) -> dict[str, Any]:
        return {**self.params, **{f: get_field(self, ctx, entry, f) for f in self.input_fields}}

    def process(self, inputs: list[list[Entry]], ctx: RunContext) -> list[list[Entry]]:
        entries = inputs[0]
        try:
            results = self.broker.run(
                [self._job(e, ctx) for e in entries], dispatch=ctx.dispatch_brokers,
                stats=ctx.call_stats(), progress=ctx.show_progress,
                retry_malformed=self.failure_behavior is BrokerFailureBehavior.RETRY)
        except ConfigError as exc:
            raise ConfigError(f"op {ctx.op_name!r}: {exc}") from exc
        return [[e for e, res in zip(entries, results) if self._place(e, res, ctx)]]

    def _place(self, entry: Entry, res: JobResult, ctx: RunContext) -> bool:
        """Write the result into the entry; False when the entry is held back."""
        entry.data[self.job_idx_field] = res.key
        if res.status == "done":
            entry.data.update({self.output_field: res.response, self.status_field: "done"})
            entry.data.pop(self.error_field, None)
            return True
        if res.status == "pending":
            ctx.hold(entry.idx, f"pending: {res.error or 'the job was not dispatched'}")
            return False
        if self.failure_behavior is BrokerFailureBehavior.EMIT:
            entry.data.update({self.output_field: None, self.status_field: "failed",
                               self.error_field: res.error})
            return True
        ctx.hold(entry.idx, f"job failed ({res.error}); retried on the next run")
        return False
