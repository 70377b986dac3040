"""Fan-out and fan-in: SpawnFromList / CollectAllToList, JoinByParent, and the deprecated
shared-idx Replicate / Collect."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

from ..core.context import RunContext
from ..core.entry import Entry
from ..core.op import Op
from .common import get_field

__all__ = ["Collect", "CollectAllToList", "JoinByParent", "Replicate", "SpawnFromList"]

Batch = list[Entry]


class SpawnFromList(Op):
    """One child entry per item of ``data[list_field]``; child idx = parent idx + "-" + position.

    Out-port 0 carries the parents (they wait at the matching CollectAllToList), out-port 1 the
    children, which is the port ``|`` continues from. Children hold the item, their parent's idx
    and their position, plus any ``inherit_fields`` copied from the parent.
    """

    n_out: ClassVar[int] = 2
    pipe_out: ClassVar[int] = 1
    is_spawn: ClassVar[bool] = True

    def __init__(self, list_field: str = "list", item_field: str = "item", *,
                 parent_field: str = "parent_idx", index_field: str = "list_idx",
                 inherit_fields: tuple[str, ...] | list[str] = ()) -> None:
        self.list_field, self.item_field = list_field, item_field
        self.parent_field, self.index_field = parent_field, index_field
        self.inherit_fields = list(inherit_fields)

    def items_of(self, parent: Entry, ctx: RunContext) -> list[Any]:
        items = get_field(self, ctx, parent, self.list_field)
        if not isinstance(items, list | tuple):
            raise self.error(ctx, parent, self.list_field,
                             f"expected a list to spawn from, got {type(items).__name__}",
                             "split the text into a list first, e.g. Apply(str.split, 'text', "
                             f"{self.list_field!r})")
        return list(items)

    def children_of(self, parent: Entry, ctx: RunContext) -> Batch:
        children = []
        for i, item in enumerate(self.items_of(parent, ctx)):
            data = {self.item_field: item, self.parent_field: parent.idx, self.index_field: i}
            for f in self.inherit_fields:
                data[f] = get_field(self, ctx, parent, f)
            origin = f"{parent.origin or parent.idx} > item {i}"
            children.append(Entry(f"{parent.idx}-{i}", data, parent.rev, origin))
        return children

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        children: Batch = []
        for parent in inputs[0]:
            children.extend(self.children_of(parent, ctx))
        return [inputs[0], children]


class CollectAllToList(Op):
    """Wait for all children of each parent and write their ``item_field`` to the parent's
    ``list_field`` in item order. In-port 0 takes the parents, in-port 1 (the ``|`` port) the
    children. A parent missing children (filtered out, or held back by a failed call) is held
    back and reported, unless ``allow_missing=True``."""

    n_in: ClassVar[int] = 2
    pipe_in: ClassVar[int] = 1
    is_collect: ClassVar[bool] = True

    def __init__(self, item_field: str = "item", list_field: str = "list", *,
                 allow_missing: bool = False) -> None:
        self.item_field, self.list_field, self.allow_missing = item_field, list_field, allow_missing
        self.spawn: SpawnFromList | None = None  # set by compile() when it pairs them

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        spawn = self.spawn or SpawnFromList()
        by_parent: dict[str, list[Entry]] = {}
        for child in inputs[1]:
            pid = get_field(self, ctx, child, spawn.parent_field)
            by_parent.setdefault(pid, []).append(child)
        out: Batch = []
        for parent in inputs[0]:
            kids = sorted(by_parent.pop(parent.idx, []), key=lambda c: c.data[spawn.index_field])
            expected = len(parent.data.get(spawn.list_field, ())) if self.spawn else len(kids)
            if len(kids) < expected and not self.allow_missing:
                ctx.hold(parent.idx, f"{expected - len(kids)} of {expected} children did not "
                         "come back (filtered out or held back by failures)")
                continue
            parent.data[self.list_field] = [get_field(self, ctx, c, self.item_field)
                                            for c in kids]
            out.append(parent)
        for pid, kids in by_parent.items():
            ctx.warn(f"{len(kids)} children arrived for parent {pid!r}, which is not among "
                     "the parents; they were dropped")
        return [out]


class JoinByParent(Op):
    """Copy fields from derived entries (in-port 1, carrying ``parent_field``) onto their parents
    (in-port 0). With several derived entries per parent, ``as_list=True`` gathers values in
    arrival order; otherwise that is an error."""

    n_in: ClassVar[int] = 2

    def __init__(self, *fields: str, parent_field: str = "parent_idx",
                 as_list: bool = False) -> None:
        self.fields, self.parent_field, self.as_list = list(fields), parent_field, as_list

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        derived: dict[str, list[Entry]] = {}
        for d in inputs[1]:
            derived.setdefault(get_field(self, ctx, d, self.parent_field), []).append(d)
        for parent in inputs[0]:
            rows = derived.get(parent.idx, [])
            if len(rows) > 1 and not self.as_list:
                raise self.error(ctx, parent, self.parent_field,
                                 f"{len(rows)} entries ({rows[0].idx!r}, {rows[1].idx!r}, ...) "
                                 "join onto this parent", "pass as_list=True to gather them")
            for f in self.fields:
                values = [get_field(self, ctx, r, f) for r in rows]
                if self.as_list:
                    parent.data[f] = values
                elif values:
                    parent.data[f] = values[0]
        return [inputs[0]]


class Replicate(Op):
    """Deprecated: copies each entry to every out-port under the same idx. Use JoinByParent."""

    def __init__(self, n_out_ports: int = 2, replica_idx_field: str = "replica_idx") -> None:
        warnings.warn("Replicate (shared-idx fan-out) is deprecated and goes away in v0.4; "
                      "use SpawnFromList/CollectAllToList or JoinByParent", DeprecationWarning,
                      stacklevel=2)
        self.n_out_ports, self.replica_idx_field = n_out_ports, replica_idx_field

    @property
    def n_out(self) -> int:  # type: ignore[override]
        return self.n_out_ports

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        outs: list[Batch] = []
        for port in range(self.n_out_ports):
            batch = inputs[0] if port == 0 else [e.copy() for e in inputs[0]]
            outs.append(batch)
        for port, batch in enumerate(outs):
            for e in batch:
                e.data[self.replica_idx_field] = port
        return outs


class Collect(Op):
    """Deprecated: copies ``fields`` from in-port 1 onto the entry with the same idx on in-port 0.
    Use JoinByParent."""

    n_in: ClassVar[int] = 2

    def __init__(self, *fields: str) -> None:
        warnings.warn("Collect (shared-idx fan-in) is deprecated and goes away in v0.4; "
                      "use JoinByParent", DeprecationWarning, stacklevel=2)
        self.fields = list(fields)

    def process(self, inputs: list[Batch], ctx: RunContext) -> list[Batch]:
        other = {e.idx: e for e in inputs[1]}
        out: Batch = []
        for e in inputs[0]:
            match = other.get(e.idx)
            if match is None:
                ctx.hold(e.idx, "no matching entry arrived on in-port 1")
                continue
            for f in self.fields:
                e.data[f] = get_field(self, ctx, match, f)
            out.append(e)
        return [out]
