"""The Dagster adapter: the only package that imports dagster.

    from batchfactory_dagster.dagster import build_job, build_graph_asset, LLMBrokerResource
"""

from .assets import (
    IO_MANAGER_KEY,
    AssetEntries,
    EntriesIOManager,
    bf_resources,
    build_graph,
    build_graph_asset,
    build_held_back_check,
    build_job,
    build_pending_sensor,
    run_metadata,
)
from .payload import Payload, Report
from .resources import LLMBrokerResource

__all__ = [
    "IO_MANAGER_KEY", "AssetEntries", "EntriesIOManager", "LLMBrokerResource", "Payload",
    "Report", "bf_resources", "build_graph", "build_graph_asset", "build_held_back_check",
    "build_job", "build_pending_sensor", "run_metadata",
]
