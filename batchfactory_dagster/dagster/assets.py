"""build_job / build_graph_asset: any pipeline as a Dagster job or a graph-backed asset."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from pydantic import Field

from ..core.entry import Entry
from ..core.frames import read_parquet, write_parquet
from ..core.graph import Segment
from ..core.op import Op
from ..core.plan import Plan
from .builder import BuildOptions, GraphBuilder, assign_broker_keys
from .payload import Payload

__all__ = [
    "AssetEntries", "EntriesIOManager", "IO_MANAGER_KEY", "build_graph", "build_graph_asset",
    "build_held_back_check", "build_job", "build_pending_sensor", "run_metadata",
]

IO_MANAGER_KEY = "bf_entries_io_manager"
PREVIEW_ROWS = 5


def _plan(pipeline: Plan | Segment | Op) -> Plan:
    return pipeline if isinstance(pipeline, Plan) else pipeline.compile()


def build_graph(pipeline: Plan | Segment | Op, name: str, *, chunk_size: int = 1000,
                unroll_limit: int = 20, final_io_manager_key: str | None = None,
                description: str | None = None, prefix: str = "", fuse_chunks: bool = False
                ) -> tuple[dg.GraphDefinition, dict[str, Any]]:
    """The Dagster graph of a pipeline, plus the broker objects found in it by resource key."""
    plan = _plan(pipeline)
    brokers = assign_broker_keys(plan)
    opts = BuildOptions(chunk_size=chunk_size, unroll_limit=unroll_limit,
                        final_io_manager_key=final_io_manager_key, prefix=prefix,
                        fuse_chunks=fuse_chunks)
    builder = GraphBuilder(plan, opts)
    final = _final_op(name, final_io_manager_key)

    if plan.input_port is None:
        @dg.graph(name=name, description=description)
        def graph():
            return final(builder.compose(plan, None))
    else:
        @dg.graph(name=name, description=description, ins={"entries": dg.GraphIn()})
        def graph(entries):
            return final(builder.compose(plan, _to_payload_op(name)(entries)))

    return graph, brokers


def _to_payload_op(name: str) -> dg.OpDefinition:
    @dg.op(name=f"{name}_input", ins={"entries": dg.In(dg.Any)}, out=dg.Out(dg.Any),
           description="upstream asset rows as entries")
    def to_payload(entries):
        from ..op.sources import entries_from_items

        items = entries.to_dict("records") if hasattr(entries, "to_dict") else list(entries)
        return Payload(entries_from_items(items, origin="upstream"))

    return to_payload


def _final_op(name: str, io_manager_key: str | None) -> dg.OpDefinition:
    out = dg.Out(dg.Any, io_manager_key=io_manager_key) if io_manager_key else dg.Out(dg.Any)

    @dg.op(name=f"{name}_output", ins={"payload": dg.In(dg.Any)}, out=out,
           description="the pipeline's output entries with the run report as metadata")
    def finalize(context, payload: Payload):
        context.log.info(f"{name}: {summary(payload)}")
        for (op, idx), reason in list(payload.report.held.items())[:20]:
            context.log.warning(f"held back by {op}: entry {idx}: {reason}")
        return dg.Output(payload, metadata=run_metadata(payload))

    return finalize


def summary(payload: Payload) -> str:
    """One line for logs: what the run produced, called, reused and spent."""
    s = payload.report.total()
    cost = "unknown" if s.cost_usd is None else f"${s.cost_usd:.4f}"
    return (f"{len(payload.entries)} entries out; {s.new_calls} new calls, {s.cache_hits} cache "
            f"hits, {s.failed} failed, {len(payload.report.held)} held back, {s.total_tokens} "
            f"tokens, cost {cost}, saved ${s.saved_usd:.4f}")


def run_metadata(payload: Payload) -> dict[str, Any]:
    """What a materialisation tells the UI: counts, calls, cache hits, tokens, cost, a preview."""
    stats = payload.report.total()
    first = next(iter(payload.report.counts.values()), (0, 0))
    meta: dict[str, Any] = {
        "dagster/row_count": len(payload.entries),
        "bf/entries_in": first[0],
        "bf/entries_out": len(payload.entries),
        "bf/requests": stats.requests,
        "bf/new_calls": stats.new_calls,
        "bf/cache_hits": stats.cache_hits,
        "bf/deduplicated": stats.deduplicated,
        "bf/attempts": stats.attempts,
        "bf/failed": stats.failed,
        "bf/held_back": len(payload.report.held),
        "bf/pending": stats.pending,
        "bf/prompt_tokens": stats.prompt_tokens,
        "bf/completion_tokens": stats.completion_tokens,
        "bf/cost_usd": dg.MetadataValue.float(stats.cost_usd) if stats.cost_usd is not None
        else dg.MetadataValue.text("unknown (a model has no price)"),
        "bf/saved_usd": dg.MetadataValue.float(stats.saved_usd),
        # the keys dagster-openai writes, so Insights charts work the same way
        "openai.calls": stats.new_calls,
        "openai.prompt_tokens": stats.prompt_tokens,
        "openai.completion_tokens": stats.completion_tokens,
        "openai.total_tokens": stats.total_tokens,
    }
    if stats.models:
        meta["openai.models"] = sorted(stats.models)
    if payload.entries:
        meta["preview"] = _preview(payload.entries[:PREVIEW_ROWS])
    if payload.report.warnings:
        meta["bf/warnings"] = dg.MetadataValue.md("\n".join(f"- {w}" for w in
                                                            payload.report.warnings))
    return meta


def _preview(entries: list[Entry]) -> dg.MetadataValue:
    columns = ["idx"] + [k for k in entries[0].data if not k.startswith("llm_")][:6]
    rows = []
    for e in entries:
        row = {"idx": e.idx}
        for c in columns[1:]:
            v = e.data.get(c)
            row[c] = v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v)[:200]
            if isinstance(row[c], str):
                row[c] = row[c][:200]
        rows.append(dg.TableRecord(row))
    schema = dg.TableSchema(columns=[dg.TableColumn(c, "string") for c in columns])
    return dg.MetadataValue.table(records=rows, schema=schema)


def build_job(pipeline: Plan | Segment | Op, name: str, *,
              resources: Mapping[str, Any] | None = None, chunk_size: int = 1000,
              unroll_limit: int = 20, executor_def: dg.ExecutorDefinition | None = None,
              description: str | None = None, tags: Mapping[str, str] | None = None,
              fuse_chunks: bool = False) -> dg.JobDefinition:
    """A Dagster job that runs the pipeline: one Dagster op per op.

    ``fuse_chunks=True`` runs the ops between a spawn and its collect as one op per chunk:
    fewer steps where a step is expensive (a process, a pod, SQLite event writes).

    Brokers in the pipeline become resources (``llm_broker``, ``llm_broker_2``...); pass
    ``resources={"llm_broker": LLMBrokerResource(...)}`` to configure them from Dagster,
    otherwise the broker objects themselves are used. The default executor is in-process:
    the broker already runs each chunk's calls concurrently.

    Examples:
        .. code-block:: python

            job = build_job(pipeline, "quickstart")
            defs = dg.Definitions(jobs=[job], resources={"llm_broker": LLMBrokerResource(
                cache_path="data/llm.jsonl", openai_api_key=dg.EnvVar("OPENAI_API_KEY"))})
    """
    # op names are unique per code location, so every op carries its job's name
    graph, brokers = build_graph(pipeline, name, chunk_size=chunk_size,
                                 unroll_limit=unroll_limit, description=description,
                                 prefix=f"{name}__", fuse_chunks=fuse_chunks)
    resource_defs = _resource_defs(brokers, resources)
    return graph.to_job(name=name, resource_defs=resource_defs,
                        executor_def=executor_def or dg.in_process_executor, tags=tags)


def _resource_defs(brokers: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    defs: dict[str, Any] = {k: dg.ResourceDefinition.hardcoded_resource(b)
                            for k, b in brokers.items()}
    for key, value in (given or {}).items():
        if isinstance(value, dg.ResourceDefinition):
            defs[key] = value
        elif hasattr(value, "get_resource_definition"):  # also configure_at_launch()
            defs[key] = value.get_resource_definition()
        else:
            defs[key] = dg.ResourceDefinition.hardcoded_resource(value)
    return defs


def build_graph_asset(pipeline: Plan | Segment | Op, name: str, *,
                      upstream: str | Sequence[str] | dg.AssetKey | None = None,
                      group_name: str | None = None, chunk_size: int = 1000,
                      unroll_limit: int = 20, resources: Mapping[str, Any] | None = None,
                      description: str | None = None, code_version: str | None = None,
                      partitions_def: dg.PartitionsDefinition | None = None,
                      fuse_chunks: bool = False) -> dg.AssetsDefinition:
    """A graph-backed asset whose value is the pipeline's output entries, stored as Parquet.

    A pipeline that starts with a source needs no upstream; one that starts with an op that
    takes entries reads them from the ``upstream`` asset (rows become entries), so lineage shows
    in the UI. Bind ``EntriesIOManager`` to ``"bf_entries_io_manager"`` (``bf_resources()`` does).
    """
    plan = _plan(pipeline)
    graph, brokers = build_graph(plan, name, chunk_size=chunk_size, unroll_limit=unroll_limit,
                                 fuse_chunks=fuse_chunks,
                                 final_io_manager_key=IO_MANAGER_KEY, description=description,
                                 prefix=f"{name}__")
    if plan.input_port is not None and upstream is None:
        raise dg.DagsterInvalidDefinitionError(
            f"pipeline {name!r} starts with {plan.nodes[plan.input_port[0]].name}, which needs "
            "entries: pass upstream='<asset key>' or start the pipeline with a source op")
    keys_by_input = {}
    if plan.input_port is not None:
        keys_by_input["entries"] = dg.AssetKey.from_coercible(upstream)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        # resource_defs on from_graph is "beta" in 1.13; it is how broker objects travel along.
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.AssetsDefinition.from_graph(
            graph, keys_by_input_name=keys_by_input,
            keys_by_output_name={"result": dg.AssetKey(name)}, group_name=group_name,
            # brokers given as resources come from Definitions(resources=...); only the plain
            # broker objects travel with the asset
            resource_defs=_resource_defs({k: b for k, b in brokers.items()
                                          if k not in (resources or {})}, None) or None,
            descriptions_by_output_name={"result": description} if description else None,
            code_versions_by_output_name={"result": code_version} if code_version else None,
            partitions_def=partitions_def)


class AssetEntries(list):
    """A loaded asset: the entries (a list) plus the report of the run that made them."""

    report: dict[str, Any]

    def to_pandas(self) -> Any:
        from ..core.frames import entries_to_frame

        return entries_to_frame(self)


class EntriesIOManager(dg.ConfigurableIOManager):
    """Stores pipeline outputs as Parquet (``<base_dir>/<asset path>.parquet``) with the run
    report beside it (``.report.json``); downstream assets and pandas read the Parquet."""

    base_dir: str = Field(default="data/assets", description="Folder for asset files.")

    def _path(self, context: dg.InputContext | dg.OutputContext) -> str:
        parts = list(context.asset_key.path) if context.has_asset_key else [context.name]
        if context.has_asset_partitions:
            parts.append(context.asset_partition_key)
        return os.path.join(self.base_dir, *parts) + ".parquet"

    def handle_output(self, context: dg.OutputContext, obj: Payload) -> None:
        path = self._path(context)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_parquet(obj.entries, path)
        with open(path[: -len(".parquet")] + ".report.json", "w") as f:
            json.dump(obj.report.to_json(), f, indent=1)
        context.add_output_metadata({"path": dg.MetadataValue.path(os.path.abspath(path))})

    def load_input(self, context: dg.InputContext) -> AssetEntries:
        path = self._path(context)
        entries = AssetEntries(read_parquet(path))
        report_path = path[: -len(".parquet")] + ".report.json"
        entries.report = json.load(open(report_path)) if os.path.exists(report_path) else {}
        return entries


def build_held_back_check(asset: dg.AssetsDefinition | str) -> dg.AssetChecksDefinition:
    """An asset check that fails when the last materialisation held entries back (a call that
    failed under STAY, children that never came back, a loop out of iterations)."""
    key = asset.key if isinstance(asset, dg.AssetsDefinition) else dg.AssetKey(asset)

    @dg.asset_check(asset=key, name="no_entries_held_back", blocking=False,
                    description="Fails when entries were held back; they are retried next run.")
    def held_back_check(asset_value: AssetEntries) -> dg.AssetCheckResult:
        held = getattr(asset_value, "report", {}).get("held", [])
        return dg.AssetCheckResult(
            passed=not held, severity=dg.AssetCheckSeverity.WARN,
            metadata={"held_back": len(held),
                      "examples": dg.MetadataValue.json(held[:10])})

    return held_back_check


def build_pending_sensor(asset: dg.AssetsDefinition, *, name: str | None = None,
                         minimum_interval_seconds: int = 300) -> dg.SensorDefinition:
    """Re-materialise ``asset`` while its last materialisation reported pending jobs (a
    deferred broker such as the Batch API still working). One request per materialisation,
    so a run in progress is never doubled; it stops once nothing is pending."""
    key = asset.key
    ident = key.to_python_identifier()
    job = dg.define_asset_job(f"{ident}_collect", selection=dg.AssetSelection.assets(key))

    @dg.sensor(name=name or f"{ident}_pending", job=job,
               minimum_interval_seconds=minimum_interval_seconds,
               description=f"re-runs {key.to_user_string()} until its deferred jobs are collected")
    def pending_sensor(context: dg.SensorEvaluationContext):
        event = context.instance.get_latest_materialization_event(key)
        if event is None or event.asset_materialization is None:
            return dg.SkipReason(f"{key.to_user_string()} was never materialised")
        pending = event.asset_materialization.metadata.get("bf/pending")
        if pending is None or not pending.value:
            return dg.SkipReason("nothing pending")
        return dg.RunRequest(run_key=event.run_id, tags={"batchfactory/reason": "pending"})

    return pending_sensor


def bf_resources(base_dir: str = "data/assets") -> dict[str, Any]:
    """Resources every batchfactory asset needs: the Parquet IO manager."""
    return {IO_MANAGER_KEY: EntriesIOManager(base_dir=base_dir)}

