"""The Dagster-free core: entries, ops, graphs, plans, the ledger, the cache folder, errors."""

from . import errors as _errors
from .cache_folder import CacheFolder
from .context import CallStats, Held, RunContext
from .entry import Entry
from .errors import *
from .graph import Edge, GraphSegment, Segment, wire
from .hashing import canonical_json, content_hash, hash_texts, short_hash
from .ledger import JsonlLedger, Ledger, MemoryLedger, open_ledger
from .op import ApplyOp, BatchOp, FilterOp, Op, OutputOp, SourceOp
from .plan import Plan, RunResult

__all__ = sorted([
    "ApplyOp", "BatchOp", "CacheFolder", "CallStats", "Edge", "Entry", "FilterOp",
    "GraphSegment", "Held", "JsonlLedger", "Ledger", "MemoryLedger", "Op", "OutputOp", "Plan",
    "RunContext", "RunResult", "Segment", "SourceOp", "canonical_json", "content_hash",
    "hash_texts", "open_ledger", "short_hash", "wire", *_errors.__all__,
])
