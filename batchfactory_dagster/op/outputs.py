"""Output ops: show, keep or write the whole batch once per run, then pass it on unchanged.

Ops are batch-synchronous, so unlike the original (which printed and rewrote files on every
partial batch) each of these sees the complete batch exactly once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..core.entry import Entry
from ..core.errors import ConfigError, EntryError
from ..core.frames import atomic_path, entries_to_frame, write_parquet
from ..core.op import Op, OutputOp

if TYPE_CHECKING:
    import pandas

    from ..core.context import RunContext

__all__ = ["Print", "PrintEntry", "ToList", "WriteJsonl", "WriteParquet"]


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, indent=2, default=repr)


def _shown(entries: Sequence[Entry], first_n: int | None) -> Sequence[Entry]:
    return entries if first_n is None else entries[:first_n]


def _footer(entries: Sequence[Entry], first_n: int | None, name: str) -> None:
    if not entries:
        print(f"{name}: no entries")
    elif first_n is not None and len(entries) > first_n:
        print(f"... {len(entries) - first_n} more entries not shown")


def _check_first_n(op: str, first_n: int | None) -> None:
    if first_n is not None and (type(first_n) is not int or first_n < 0):
        raise ConfigError(f"{op}: first_n must be None or an int >= 0, got {first_n!r}")


class Print(OutputOp):
    """Prints one field of each entry (the whole data if field is None)."""

    def __init__(self, field: str | None = "text", first_n: int | None = None) -> None:
        _check_first_n("Print", first_n)
        self.field, self.first_n = field, first_n

    def write(self, entries: Sequence[Entry], ctx: RunContext) -> None:
        missing = 0
        for e in _shown(entries, self.first_n):
            print(f"--- {e.idx} (rev {e.rev}) ---")
            if self.field is None:
                print(_show(e.data))
            elif self.field in e.data:
                print(_show(e.data[self.field]))
            else:
                missing += 1
                print(f"<no field {self.field!r}>")
        _footer(entries, self.first_n, ctx.op_name or "Print")
        if missing:
            # Printing is for looking, not a reason to stop the run; but do not stay silent.
            ctx.warn(f"{missing} printed entries have no field {self.field!r}")


class PrintEntry(OutputOp):
    """Prints each whole entry: idx, rev and data."""

    def __init__(self, first_n: int | None = None) -> None:
        _check_first_n("PrintEntry", first_n)
        self.first_n = first_n

    def write(self, entries: Sequence[Entry], ctx: RunContext) -> None:
        for e in _shown(entries, self.first_n):
            print(_show({"idx": e.idx, "rev": e.rev, "data": e.data}))
        _footer(entries, self.first_n, ctx.op_name or "PrintEntry")


class ToList(OutputOp):
    """Keeps a copy of the batch of the last run: ``get_output()`` / ``to_pandas()``."""

    def __init__(self) -> None:
        self._output: list[Entry] = []

    def write(self, entries: Sequence[Entry], ctx: RunContext) -> None:
        # Copies: the entries flow on, and later ops may change them in place.
        self._output = [e.copy() for e in entries]

    def get_output(self) -> list[Entry]:
        return list(self._output)

    def to_pandas(self) -> pandas.DataFrame:
        return entries_to_frame(self._output)


# -- files -------------------------------------------------------------------------------------
def _fields_arg(op: str, output_fields: Sequence[str] | str | None) -> list[str] | None:
    if output_fields is None:
        return None
    fields = [output_fields] if isinstance(output_fields, str) else list(output_fields)
    if not all(isinstance(f, str) for f in fields):
        raise ConfigError(f"{op}: output_fields must be field names (str), got {fields!r}")
    return fields


def _row(op: Op, ctx: RunContext, entry: Entry, fields: list[str] | None) -> dict[str, Any]:
    """The chosen fields of one entry plus idx and rev, checked to be JSON-serialisable."""
    row: dict[str, Any] = {"idx": entry.idx, "rev": entry.rev}
    for f in entry.data if fields is None else fields:
        if f not in entry.data:
            have = ", ".join(map(repr, entry.data)) or "no fields"
            raise op.error(ctx, entry, f, f"the entry has no field {f!r} (it has {have})",
                           "add the field upstream, drop it from output_fields, or filter "
                           "such entries out first")
        value = entry.data[f]
        if f in row:
            if value != row[f]:
                raise op.error(ctx, entry, f, f"data field {f!r}={value!r} clashes with the "
                               f"entry's own {f} ({row[f]!r}) written in every row",
                               "rename the field (RenameField) before writing")
            continue
        _check_json(op, ctx, entry, f, value)
        row[f] = value
    return row


def _check_json(op: Op, ctx: RunContext, entry: Entry, field: str, value: Any) -> None:
    try:
        orjson.dumps(value)
    except TypeError as exc:
        raise op.error(ctx, entry, field,
                       f"a {type(value).__name__} value is not JSON-serialisable ({exc})",
                       "convert it to str, numbers, lists or dicts before writing") from exc


def _write_failed(ctx: RunContext, op: str, path: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"op {ctx.op_name or op!r}: cannot write {str(path)!r}: "
                       f"{exc.strerror or exc}. Check that the folder is writable")


class WriteJsonl(OutputOp):
    """Writes the batch to a JSONL file (one object per entry: chosen fields + idx + rev).

    With ``only_current=False`` rows of earlier runs whose idx is not in this batch are kept.
    """

    def __init__(self, path: str | os.PathLike[str],
                 output_fields: Sequence[str] | str | None = None, *,
                 only_current: bool = True) -> None:
        self.path = Path(path)
        self.output_fields = _fields_arg("WriteJsonl", output_fields)
        self.only_current = only_current

    def write(self, entries: Sequence[Entry], ctx: RunContext) -> None:
        rows = [_row(self, ctx, e, self.output_fields) for e in entries]
        if not self.only_current:
            current = {e.idx for e in entries}
            rows = [r for r in self._earlier_rows(ctx) if r["idx"] not in current] + rows
        try:
            with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
                f.writelines(orjson.dumps(r) + b"\n" for r in rows)
        except OSError as exc:
            raise _write_failed(ctx, "WriteJsonl", self.path, exc) from exc

    def _earlier_rows(self, ctx: RunContext) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        with open(self.path, "rb") as f:  # bytes: orjson reports bad UTF-8 as bad JSON
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append(self._earlier_row(ctx, line, lineno))
        return rows

    def _earlier_row(self, ctx: RunContext, line: bytes, lineno: int) -> dict[str, Any]:
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            row, problem = None, f"is not valid JSON ({exc})"
        else:
            problem = "is not an object with an 'idx'"
        if not isinstance(row, dict) or "idx" not in row:
            raise EntryError(ctx.op_name or "WriteJsonl", None, None,
                             f"the existing file {self.path}:{lineno} {problem}",
                             "fix or delete the file, or use only_current=True to overwrite it")
        return row


class WriteParquet(OutputOp):
    """Writes the batch to a Parquet file (chosen fields + idx + rev), atomically."""

    def __init__(self, path: str | os.PathLike[str],
                 output_fields: Sequence[str] | str | None = None) -> None:
        self.path = Path(path)
        self.output_fields = _fields_arg("WriteParquet", output_fields)

    def write(self, entries: Sequence[Entry], ctx: RunContext) -> None:
        chosen = []
        for e in entries:
            row = _row(self, ctx, e, self.output_fields)
            data = {k: v for k, v in row.items() if k not in ("idx", "rev")}
            chosen.append(Entry(e.idx, data, e.rev))
        try:
            write_parquet(chosen, self.path)
        except OSError as exc:
            raise _write_failed(ctx, "WriteParquet", self.path, exc) from exc
