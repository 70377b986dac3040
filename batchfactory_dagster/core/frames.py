"""Entries <-> pandas DataFrames and Parquet files (the Dagster adapter stores outputs this way).

Parquet files hold the columns ``idx``, ``rev`` and one column per data field. They must
round-trip exactly, so a column is stored natively only if Arrow gives back the very same
values (types included); otherwise it is stored as JSON text and listed in the schema metadata.
Fields some entries lack are recorded per row in ``__absent__`` (only when needed), so that
"missing" and "None" stay different after a round trip.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .entry import Entry
from .errors import ConfigError, EntryError

if TYPE_CHECKING:
    import pandas
    import pyarrow

__all__ = [
    "atomic_path",
    "entries_to_frame",
    "frame_to_entries",
    "read_parquet",
    "read_rows",
    "write_parquet",
]

META_KEY = b"batchfactory"
ABSENT = "__absent__"


# -- pandas ------------------------------------------------------------------------------------
def entries_to_frame(entries: Sequence[Entry]) -> pandas.DataFrame:
    """One row per entry: columns idx, rev, then every data field (missing ones are empty)."""
    import pandas as pd

    _check_reserved(entries, "entries_to_frame", ("idx", "rev"))
    columns: dict[str, Any] = {"idx": [e.idx for e in entries], "rev": [e.rev for e in entries]}
    for f in _field_names(entries):
        columns[f] = _column([e.data.get(f) for e in entries])
    return pd.DataFrame(columns, columns=list(columns))


def _column(values: list[Any]) -> Any:
    """Ints with gaps as nullable Int64: pandas would otherwise turn them into floats."""
    import pandas as pd

    ints = [v for v in values if v is not None]
    if len(ints) < len(values) and ints and all(type(v) is int for v in ints):
        return pd.array(values, dtype="Int64")
    return values


def frame_to_entries(df: pandas.DataFrame, idx_column: str = "idx") -> list[Entry]:
    """Entries from a DataFrame: idx from ``idx_column``, rev from "rev" if present.

    Missing values (NaN, None, NA) become None; numpy values become plain Python values.
    """
    from .plan import check_unique

    if idx_column not in df.columns:
        raise ConfigError(f"frame_to_entries: the frame has no column {idx_column!r} (columns: "
                          f"{', '.join(map(str, df.columns))}); pass idx_column=")
    entries = [_record_entry(rec, i, idx_column)
               for i, rec in enumerate(df.to_dict("records"))]
    check_unique("frame_to_entries", entries)
    return entries


def _record_entry(rec: dict[Any, Any], i: int, idx_column: str) -> Entry:
    raw_idx = _native(rec.pop(idx_column))
    if isinstance(raw_idx, bool) or not isinstance(raw_idx, str | int) or raw_idx == "":
        raise ConfigError(f"frame_to_entries: row {i} has idx {raw_idx!r}; column "
                          f"{idx_column!r} must hold non-empty str (or int) values")
    rev = _native(rec.pop("rev", 0)) if idx_column != "rev" else 0
    data = {str(k): _native(v) for k, v in rec.items()}
    return Entry(str(raw_idx), data, int(rev or 0), origin=f"frame row {i}")


def _native(v: Any) -> Any:
    """Plain Python values: pandas hands out numpy scalars/arrays and NaN for missing."""
    if isinstance(v, dict):
        return {k: _native(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_native(x) for x in v]
    if hasattr(v, "tolist") and not isinstance(v, str | bytes):
        return _native(v.tolist())
    if isinstance(v, float) and math.isnan(v):
        return None
    if type(v).__name__ in ("NAType", "NaTType"):
        return None
    return v


# -- parquet -----------------------------------------------------------------------------------
def write_parquet(entries: Sequence[Entry], path: str | os.PathLike[str]) -> None:
    """Write entries to one Parquet file, atomically (temp file + os.replace)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_reserved(entries, "write_parquet", ("idx", "rev", ABSENT))
    fields = _field_names(entries)
    columns: dict[str, Any] = {
        "idx": pa.array([e.idx for e in entries], pa.string()),
        "rev": pa.array([e.rev for e in entries], pa.int64()),
    }
    json_columns = []
    for f in fields:
        arr = _native_array([e.data.get(f) for e in entries])
        if arr is None:
            arr = _json_array(entries, f)
            json_columns.append(f)
        columns[f] = arr
    absent = [[f for f in fields if f not in e.data] for e in entries]
    if any(absent):
        columns[ABSENT] = pa.array(absent, pa.list_(pa.string()))
    meta = {"format": 1, "json_columns": json_columns, "absent_column": any(absent)}
    table = pa.table(columns).replace_schema_metadata({META_KEY: orjson.dumps(meta)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | os.PathLike[str]) -> list[Entry]:
    """Entries written by ``write_parquet`` (or any Parquet file with a str ``idx`` column)."""
    from .plan import check_unique

    rows = read_rows(path)
    entries = []
    for i, row in enumerate(rows):
        if "idx" not in row:
            raise ConfigError(f"cannot read entries from {os.fspath(path)!r}: it has no 'idx' "
                              "column; use ReadParquet(..., idx_field=...) for other tables")
        idx, rev = str(row.pop("idx")), row.pop("rev", 0)
        entries.append(Entry(idx, row, int(rev or 0), origin=f"{os.fspath(path)} row {i}"))
    check_unique("read_parquet", entries)
    return entries


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a Parquet file as dicts, with JSON columns and absent fields restored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"cannot read Parquet file {os.fspath(path)!r}: {exc}") from exc
    meta = _metadata(table.schema)
    json_columns = meta.get("json_columns", [])
    rows = table.to_pylist()
    for row in rows:
        absent = row.pop(ABSENT, None) if meta.get("absent_column") else None
        for c in json_columns:
            if row.get(c) is not None:
                row[c] = orjson.loads(row[c])
        for f in absent or ():
            row.pop(f, None)
    return rows


def _metadata(schema: pyarrow.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(META_KEY)
    return orjson.loads(raw) if raw else {}


def _native_array(values: list[Any]) -> pyarrow.Array | None:
    """An Arrow array that gives back exactly ``values``, or None if there is none."""
    import pyarrow as pa

    try:
        arr = pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None
    # Arrow may widen 1 -> 1.0 or fill missing struct keys with None: that is not faithful.
    if _has_empty_struct(arr.type) or not _same(values, arr.to_pylist()):
        return None
    return arr


def _has_empty_struct(t: pyarrow.DataType) -> bool:
    """Parquet cannot store a struct without fields (what Arrow infers for {})."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(_has_empty_struct(t.field(i).type)
                                        for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_empty_struct(t.value_type)
    return False


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same JSON types (1 and 1.0 differ; NaN equals NaN)."""
    if isinstance(a, list | tuple):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(_same(v, b[k]) for k, v in a.items()))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _json_array(entries: Sequence[Entry], field: str) -> pyarrow.Array:
    import pyarrow as pa

    out: list[str | None] = []
    for e in entries:
        if field not in e.data:
            out.append(None)
            continue
        try:
            out.append(orjson.dumps(e.data[field]).decode())
        except TypeError as exc:
            raise EntryError("write_parquet", field, e.idx,
                             f"a {type(e.data[field]).__name__} value can be stored neither as "
                             f"an Arrow column nor as JSON ({exc})",
                             "convert it to str, numbers, lists or dicts first") from exc
    return pa.array(out, pa.string())


# -- shared ------------------------------------------------------------------------------------
def _field_names(entries: Sequence[Entry]) -> list[str]:
    """Every data field, in order of first appearance."""
    return list(dict.fromkeys(k for e in entries for k in e.data))


def _check_reserved(entries: Sequence[Entry], op: str, reserved: Sequence[str]) -> None:
    for e in entries:
        for name in reserved:
            if name in e.data:
                raise EntryError(op, name, e.idx,
                                 f"a data field named {name!r} clashes with the {name!r} column",
                                 "rename the field (RenameField) before storing the entries")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` in one step.

    Readers never see a half-written file, and a failed write leaves the old file intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the final file.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
