"""LLM ops: GenerateLLMRequest -> ConcurrentLLMCall -> ExtractResponseText, and their helpers."""

from __future__ import annotations

import string
from typing import Any

from ..brokers.base import Broker, BrokerFailureBehavior
from ..core.context import RunContext
from ..core.entry import Entry
from ..core.errors import ConfigError, DefinitionError
from ..core.hashing import canonical_json
from ..core.ledger import Ledger, open_ledger
from ..core.op import ApplyOp, Op, OutputOp
from ..llm.models import GENERATION_PARAMS, make_request
from ..llm.providers import parse_model
from .common import get_field

__all__ = [
    "CleanupLLMData", "ConcurrentLLMCall", "ExtractResponseMeta", "ExtractResponseText",
    "GenerateLLMRequest", "PrintTotalCost", "template_fields",
]

LLM_TEMP_FIELDS = ("llm_request", "llm_response", "status", "job_idx", "error")


def template_fields(template: str) -> list[str]:
    """The top-level field names a ``str.format`` template uses."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DefinitionError(f"prompt template {template[:60]!r} is malformed: {exc}; "
                              "write literal braces as {{ and }}") from exc
    names = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = field.split(".")[0].split("[")[0]
        if not name or name.isdigit():
            raise DefinitionError(f"prompt template {template[:60]!r} has a positional "
                                  "placeholder {}; name the field, e.g. {text}")
        if name not in names:
            names.append(name)
    return names


class GenerateLLMRequest(ApplyOp):
    """Build a chat request from templates filled with the entry's fields.

    Messages: [system_prompt] + [user_prompt as ``role``] + [chat history] + [after_prompt].
    Every generation parameter (temperature, seed, max_completion_tokens, ...) is part of the
    request's content key, as is ``sample`` (several answers to one prompt).
    """

    def __init__(self, user_prompt: str | None, model: str, max_completion_tokens: int | None = 4096,
                 role: str = "user", output_field: str = "llm_request",
                 system_prompt: str | None = None, chat_history_field: bool | str | None = None,
                 after_prompt: str | None = None, *, sample: int = 0,
                 sample_field: str | None = None, **params: Any) -> None:
        try:  # a malformed model or unknown provider fails at composition time
            parse_model(model)
        except ConfigError as exc:
            raise ConfigError(f"GenerateLLMRequest(model={model!r}): {exc}") from None
        bad = sorted(set(params) - GENERATION_PARAMS)
        if bad:
            raise DefinitionError(f"GenerateLLMRequest got unknown parameters {bad}; "
                                  f"known: {sorted(GENERATION_PARAMS)}")
        self.user_prompt, self.model, self.role = user_prompt, model, role
        self.system_prompt, self.after_prompt = system_prompt, after_prompt
        self.output_field, self.sample, self.sample_field = output_field, sample, sample_field
        self.chat_history_field = "chat_history" if chat_history_field is True else (
            chat_history_field or None)
        self.params = {"max_completion_tokens": max_completion_tokens, **params}
        try:
            canonical_json(self.params)
        except TypeError as exc:
            raise DefinitionError(f"GenerateLLMRequest: the generation parameters are not "
                                  f"JSON-serialisable ({exc}); use str, numbers, bools, None, "
                                  "lists and dicts") from None
        self.fields = [f for t in (system_prompt, user_prompt, after_prompt) if t
                       for f in template_fields(t)]

    def _fill(self, template: str, entry: Entry, ctx: RunContext) -> str:
        values = {f: get_field(self, ctx, entry, f) for f in template_fields(template)}
        return template.format(**values)

    def update(self, entry: Entry, ctx: RunContext) -> None:
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self._fill(self.system_prompt, entry, ctx)})
        if self.user_prompt:
            messages.append({"role": self.role, "content": self._fill(self.user_prompt, entry, ctx)})
        if self.chat_history_field:
            history = entry.data.get(self.chat_history_field) or []
            if not isinstance(history, list):
                raise self.error(ctx, entry, self.chat_history_field,
                                 f"expected a list of messages, got {type(history).__name__}")
            messages.extend({"role": m["role"], "content": m["content"]} for m in history)
        if self.after_prompt:
            messages.append({"role": self.role, "content": self._fill(self.after_prompt, entry, ctx)})
        sample = (get_field(self, ctx, entry, self.sample_field) if self.sample_field
                  else self.sample)
        try:
            request = make_request(self.model, messages, self.params, int(sample))
        except TypeError as exc:  # e.g. a chat history message whose content is a set
            raise self.error(ctx, entry, self.chat_history_field, "the messages are not "
                             f"JSON-serialisable ({exc})", "make every message content a "
                             "str") from None
        entry.data[self.output_field] = request


class ConcurrentLLMCall(Op):
    """Answer each entry's request through a broker: cached answers cost nothing, duplicates
    share one call, and failures follow ``failure_behavior`` (STAY by default).

    ``cache_path`` (optional) keeps this op's journal: which entry got which answer, and which
    are held back, across runs.
    """

    def __init__(self, cache_path: str | Broker | None, broker: Broker | None = None,
                 input_field: str = "llm_request", output_field: str = "llm_response",
                 status_field: str = "status", job_idx_field: str = "job_idx",
                 failure_behavior: BrokerFailureBehavior | str = BrokerFailureBehavior.STAY,
                 error_field: str = "error") -> None:
        if isinstance(cache_path, Broker):
            cache_path, broker = None, cache_path
        if not isinstance(broker, Broker):
            raise DefinitionError(f"ConcurrentLLMCall needs a broker, got {broker!r}; pass "
                                  "bf.brokers.ConcurrentLLMCallBroker(path)")
        try:
            self.failure_behavior = BrokerFailureBehavior(str(getattr(failure_behavior, "value",
                                                                      failure_behavior)).lower())
        except ValueError:
            raise DefinitionError(f"failure_behavior must be RETRY, STAY or EMIT, got "
                                  f"{failure_behavior!r}") from None
        self.cache_path, self.broker = cache_path, broker
        self.input_field, self.output_field = input_field, output_field
        self.status_field, self.job_idx_field, self.error_field = (
            status_field, job_idx_field, error_field)
        self._journal: Ledger | None = None

    @property
    def journal(self) -> Ledger | None:
        if self._journal is None and self.cache_path is not None:
            self._journal = open_ledger(self.cache_path)
        return self._journal

    def _requests(self, entries: list[Entry], ctx: RunContext) -> list[dict[str, Any]]:
        requests = []
        for e in entries:
            req = get_field(self, ctx, e, self.input_field)
            if not isinstance(req, dict) or "messages" not in req or "model" not in req:
                raise self.error(ctx, e, self.input_field, f"expected an LLM request built by "
                                 f"GenerateLLMRequest, got {type(req).__name__}",
                                 "put GenerateLLMRequest before this op")
            requests.append(req)
        return requests

    def process(self, inputs: list[list[Entry]], ctx: RunContext) -> list[list[Entry]]:
        entries = inputs[0]
        # Under Dagster the broker comes from a resource, found by the key the builder set.
        broker = ctx.extra.get("brokers", {}).get(getattr(self, "broker_key", None), self.broker)
        try:
            results = broker.run(
                self._requests(entries, ctx), dispatch=ctx.dispatch_brokers,
                stats=ctx.call_stats(), progress=ctx.show_progress,
                retry_malformed=self.failure_behavior is BrokerFailureBehavior.RETRY)
        except ConfigError as exc:
            raise ConfigError(f"op {ctx.op_name!r}: {exc}") from exc
        stats = ctx.call_stats()
        if stats.unpriced_calls:
            ctx.warn(f"{stats.unpriced_calls} calls to {', '.join(sorted(stats.models))} have "
                     "no known price: the run's cost is reported as unknown; add prices with "
                     "batchfactory_dagster.set_price(model, input_per_million, "
                     "output_per_million)")
        out: list[Entry] = []
        journal: list[dict[str, Any]] = []
        for e, res in zip(entries, results):
            e.data[self.job_idx_field] = res.key
            if res.status == "done":
                e.data[self.output_field] = res.response
                e.data[self.status_field] = "done"
                e.data.pop(self.error_field, None)
                out.append(e)
            elif res.status == "pending":
                ctx.hold(e.idx, f"pending: {res.error or 'the call was not dispatched'}")
            elif self.failure_behavior is BrokerFailureBehavior.EMIT:
                e.data[self.output_field] = None
                e.data[self.status_field] = "failed"
                e.data[self.error_field] = res.error
                out.append(e)
            else:
                ctx.hold(e.idx, f"call failed ({res.error}); retried on the next run")
            journal.append({"key": f"{e.idx}@{e.rev}", "job": res.key, "status": res.status,
                            "error": res.error})
        self._write_journal(journal)
        return [out]

    def _write_journal(self, records: list[dict[str, Any]]) -> None:
        journal = self.journal
        if journal is None:
            return
        journal.refresh()
        changed = [r for r in records if (old := journal.get(r["key"])) is None
                   or (old.get("job"), old.get("status")) != (r["job"], r["status"])]
        if changed:
            journal.append_many(changed)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_journal"] = None
        return state


class ExtractResponseText(ApplyOp):
    """Copy the answer text to ``output_field`` (None for an emitted failure)."""

    def __init__(self, input_field: str = "llm_response", output_field: str = "text") -> None:
        self.input_field, self.output_field = input_field, output_field

    def update(self, entry: Entry, ctx: RunContext) -> None:
        response = get_field(self, ctx, entry, self.input_field)
        entry.data[self.output_field] = None if response is None else response.get("content")


class ExtractResponseMeta(ApplyOp):
    """Record the model and add the answer's cost to a running per-entry total (None once any
    part of it is unknown)."""

    def __init__(self, input_response_field: str = "llm_response",
                 input_request_field: str = "llm_request", output_model_field: str = "model",
                 accumulated_cost_field: str = "api_cost") -> None:
        self.response_field, self.request_field = input_response_field, input_request_field
        self.model_field, self.cost_field = output_model_field, accumulated_cost_field

    def update(self, entry: Entry, ctx: RunContext) -> None:
        request = get_field(self, ctx, entry, self.request_field)
        response = entry.data.get(self.response_field)
        entry.data[self.model_field] = request.get("model")
        total = entry.data.get(self.cost_field, 0.0)
        cost = None if response is None else response.get("cost_usd", 0.0)
        if response is None:
            cost = 0.0  # a failed call with no answer recorded no billable usage here
        entry.data[self.cost_field] = None if total is None or cost is None else total + cost


class CleanupLLMData(ApplyOp):
    """Remove the temporary LLM fields (request, response, status, job key, error)."""

    def __init__(self, fields: list[str] | tuple[str, ...] = LLM_TEMP_FIELDS) -> None:
        self.fields = list(fields)

    def update(self, entry: Entry, ctx: RunContext) -> None:
        for f in self.fields:
            entry.data.pop(f, None)


class PrintTotalCost(OutputOp):
    """Print the total of the per-entry cost field over the whole batch and this run's spend."""

    def __init__(self, accumulated_cost_field: str = "api_cost") -> None:
        self.cost_field = accumulated_cost_field

    def write(self, entries: Any, ctx: RunContext) -> None:
        costs = [e.data.get(self.cost_field) for e in entries]
        unknown = sum(1 for c in costs if c is None)
        total = sum(c for c in costs if c is not None)
        run = ctx.total_calls()
        spent = "unknown" if run.cost_usd is None else f"${run.cost_usd:.6f}"
        note = f" ({unknown} entries with unknown cost)" if unknown else ""
        print(f"Total cost of {len(entries)} entries: ${total:.6f}{note}; this run spent "
              f"{spent} on {run.new_calls} new calls, cache hits saved ${run.saved_usd:.6f}")
