"""Transforms: field tweaks and whole-batch reorderings."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from typing import Any

from ..core.context import RunContext
from ..core.entry import Entry
from ..core.errors import DefinitionError
from ..core.op import ApplyOp, BatchOp, FilterOp, Op, call_user

__all__ = [
    "Apply", "Filter", "FilterFailedEntries", "FilterMissingField", "MapField", "RemoveField",
    "RenameField", "SetField", "Shuffle", "Sort", "TakeFirstN", "get_field", "pairs",
]

_MISSING = object()


def get_field(op: Op, ctx: RunContext, entry: Entry, field: str, default: Any = _MISSING) -> Any:
    """``entry.data[field]``, or an EntryError that lists the fields the entry does have."""
    try:
        return entry.data[field]
    except KeyError:
        if default is not _MISSING:
            return default
        have = ", ".join(sorted(entry.data)) or "none"
        raise op.error(ctx, entry, field, f"the entry has no field {field!r} (it has: {have})",
                       "set it upstream (SetField, Apply) or filter such entries out with "
                       f"FilterMissingField({field!r})") from None


def pairs(args: Sequence[Any], what: str) -> dict[str, Any]:
    """``({"a": 1},)`` or ``("a", 1, "b", 2)`` -> ``{"a": 1, "b": 2}``."""
    if len(args) == 1 and isinstance(args[0], dict):
        return dict(args[0])
    if len(args) % 2:
        raise DefinitionError(f"{what} takes a dict or name/value pairs, got {args!r}")
    return {str(args[i]): args[i + 1] for i in range(0, len(args), 2)}


def _as_list(fields: str | Sequence[str]) -> list[str]:
    return [fields] if isinstance(fields, str) else list(fields)


class Apply(ApplyOp):
    """Run a function on each entry: ``Apply(fn)`` gives fn the data dict to change in place;
    ``Apply(fn, ["a", "b"], ["c"])`` calls ``fn(a, b)`` and writes the result to ``c``."""

    def __init__(self, func: Callable[..., Any], in_fields: str | Sequence[str] | None = None,
                 out_fields: str | Sequence[str] | None = None) -> None:
        self.func = func
        self.in_fields = None if in_fields is None else _as_list(in_fields)
        self.out_fields = (self.in_fields if out_fields is None and in_fields is not None
                           else None if out_fields is None else _as_list(out_fields))

    def update(self, entry: Entry, ctx: RunContext) -> None:
        if self.in_fields is None:
            result = call_user(self, ctx, self.func, entry, None, entry.data)
            if isinstance(result, dict) and result is not entry.data:
                entry.data = result
            return
        args = [get_field(self, ctx, entry, f) for f in self.in_fields]
        result = call_user(self, ctx, self.func, entry, self.in_fields[0], *args)
        outs = self.out_fields or []
        if len(outs) == 1:
            entry.data[outs[0]] = result
            return
        if not isinstance(result, tuple | list) or len(result) != len(outs):
            raise self.error(ctx, entry, outs[0], f"expected {len(outs)} values for {outs}, "
                             f"got {result!r}", "return a tuple with one value per output field")
        entry.data.update(zip(outs, result))


class MapField(Apply):
    """``MapField(fn, "in", "out")``: out = fn(in) for each entry."""


class Filter(FilterOp):
    """Keep entries where ``criteria(data)`` (or ``criteria(*fields)``) is true."""

    def __init__(self, criteria: Callable[..., Any], *fields: str) -> None:
        self.criteria, self.fields = criteria, list(fields)

    def keep(self, entry: Entry, ctx: RunContext) -> bool:
        if not self.fields:
            return bool(call_user(self, ctx, self.criteria, entry, None, entry.data))
        args = [get_field(self, ctx, entry, f) for f in self.fields]
        return bool(call_user(self, ctx, self.criteria, entry, self.fields[0], *args))


class FilterFailedEntries(FilterOp):
    """Drop entries whose status field says "failed"."""

    def __init__(self, status_field: str = "status") -> None:
        self.status_field = status_field

    def keep(self, entry: Entry, ctx: RunContext) -> bool:
        return entry.data.get(self.status_field) != "failed"


class FilterMissingField(FilterOp):
    """Keep entries that have every listed field (and, unless allow_none, not None)."""

    def __init__(self, *fields: str, allow_none: bool = True) -> None:
        self.fields, self.allow_none = list(fields), allow_none

    def keep(self, entry: Entry, ctx: RunContext) -> bool:
        d = entry.data
        return all(f in d and (self.allow_none or d[f] is not None) for f in self.fields)


class SetField(ApplyOp):
    """Set constant fields: ``SetField({"a": 1})`` or ``SetField("a", 1, "b", 2)``."""

    def __init__(self, *fields_and_values: Any) -> None:
        self.values = pairs(fields_and_values, "SetField")

    def update(self, entry: Entry, ctx: RunContext) -> None:
        for k, v in self.values.items():
            entry.data[k] = copy.deepcopy(v)


class RemoveField(ApplyOp):
    """Remove fields if present."""

    def __init__(self, *fields: str) -> None:
        self.fields = [f for spec in fields for f in _as_list(spec)]

    def update(self, entry: Entry, ctx: RunContext) -> None:
        for f in self.fields:
            entry.data.pop(f, None)


class RenameField(ApplyOp):
    """Rename fields: ``RenameField("old", "new")`` or ``RenameField({"old": "new"})``."""

    def __init__(self, *pairs_: Any) -> None:
        self.mapping = pairs(pairs_, "RenameField")
        clash = set(self.mapping) & set(self.mapping.values())
        if clash:
            raise DefinitionError(f"RenameField renames to and from {sorted(clash)}; "
                                  "rename in two steps")

    def update(self, entry: Entry, ctx: RunContext) -> None:
        for old, new in self.mapping.items():
            if old in entry.data:
                entry.data[new] = entry.data.pop(old)


class Shuffle(BatchOp):
    """Shuffle the whole batch with a fixed seed (the same order on every run)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def process_batch(self, entries: list[Entry], ctx: RunContext) -> list[Entry]:
        # Sort by idx first so the result does not depend on upstream order quirks.
        out = sorted(entries, key=lambda e: e.idx)
        random.Random(self.seed).shuffle(out)
        return out


class TakeFirstN(BatchOp):
    """Keep the first n entries of the whole batch."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise DefinitionError(f"TakeFirstN needs n >= 0, got {n}")
        self.n = n

    def process_batch(self, entries: list[Entry], ctx: RunContext) -> list[Entry]:
        return entries[: self.n]


class Sort(BatchOp):
    """Sort the batch by fields (``Sort("score", reverse=True)``) or by ``key(data)``."""

    def __init__(self, *fields: str, key: Callable[[dict], Any] | None = None,
                 reverse: bool = False) -> None:
        if not fields and key is None:
            raise DefinitionError("Sort needs field names or key=")
        self.fields, self.key, self.reverse = list(fields), key, reverse

    def process_batch(self, entries: list[Entry], ctx: RunContext) -> list[Entry]:
        def sort_key(e: Entry) -> Any:
            if self.key is not None:
                return call_user(self, ctx, self.key, e, None, e.data)
            return tuple(get_field(self, ctx, e, f) for f in self.fields)

        return sorted(entries, key=sort_key, reverse=self.reverse)
