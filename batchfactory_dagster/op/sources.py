"""Source ops: entries from Python lists, Markdown, JSONL and Parquet files.

Every entry gets an explicit, reproducible idx. Content-derived idx values carry an occurrence
suffix (``_1``, ``_2`` ...) so identical rows stay distinct entries instead of silently merging
(the original collapsed them), and user-given idx values that repeat are an error naming both
origins.
"""

from __future__ import annotations

import copy
import glob
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ..core.entry import Entry
from ..core.errors import ConfigError, DuplicateIdxError, EntryError
from ..core.hashing import short_hash
from ..core.op import SourceOp

if TYPE_CHECKING:
    from ..core.context import RunContext

__all__ = [
    "FromList",
    "IdxAllocator",
    "ReadJsonl",
    "ReadMarkdownEntries",
    "ReadMarkdownLines",
    "ReadParquet",
    "entries_from_items",
]

# A heading is one or more '#' then whitespace (or nothing): "#hashtag" stays a text line.
_HEADING = re.compile(r"^(#+)(?:\s+(.*))?$")
# The only keys of the serialised-Entry form {"idx", "data", "rev"}.
_ENTRY_KEYS = {"idx", "data", "rev"}


class IdxAllocator:
    """Hands out the idx values of one batch and remembers where each came from."""

    def __init__(self, op: str) -> None:
        self.op = op
        self._repeats: dict[str, int] = {}
        self._origins: dict[str, str] = {}

    def derived(self, key: Any, origin: str, field: str | None = None) -> str:
        """A content hash of ``key``; the k-th repeat of the same content gets ``_k``."""
        try:
            base = short_hash(key)
        except TypeError as exc:
            raise EntryError(self.op, field, None, f"{origin} is not JSON-serialisable ({exc})",
                             "use only str, numbers, bools, None, lists and dicts") from exc
        k = self._repeats.get(base, 0)
        self._repeats[base] = k + 1
        return self.given(base if k == 0 else f"{base}_{k}", origin)

    def given(self, idx: str, origin: str) -> str:
        """A user-chosen idx; a second use is an error naming both origins."""
        first = self._origins.get(idx)
        if first is not None:
            raise DuplicateIdxError(
                self.op, "idx", idx, f"two items share this idx ({first} and {origin})",
                "every entry needs its own idx: fix the idx values, or leave idx out so it is "
                "derived from the content")
        self._origins[idx] = origin
        return idx


# -- lists -------------------------------------------------------------------------------------
def entries_from_items(items: Sequence[Any], *, origin: str, output_field: str | None = None,
                       op: str | None = None) -> list[Entry]:
    """Turn Entries, dicts and (with ``output_field``) plain values into entries.

    A dict with a str "idx" keeps it (data = its "data" dict when the dict is exactly
    {"idx", "data"[, "rev"]}, else the dict minus "idx"); other dicts get a content hash.
    ``op`` names the op in errors (defaults to ``origin``).
    """
    ids = IdxAllocator(op or origin)
    return [_item_entry(item, f"{origin} item {i}", output_field, ids)
            for i, item in enumerate(items)]


def _item_entry(item: Any, where: str, output_field: str | None, ids: IdxAllocator) -> Entry:
    if isinstance(item, Entry):
        ids.given(item.idx, where)
        item.origin = item.origin or where
        return item
    if isinstance(item, dict):
        if "idx" in item:
            return _given_dict(item, where, ids)
        data = copy.deepcopy(item)  # ops mutate data in place; keep the caller's dicts intact
        return Entry(ids.derived(data, where), data, origin=where)
    if output_field is None:
        raise EntryError(ids.op, None, None,
                         f"{where} is a {type(item).__name__} ({item!r:.60}), not a dict or Entry",
                         "give dicts such as {'text': value} (FromList also takes "
                         "output_field='text' to wrap plain values)")
    data = {output_field: copy.deepcopy(item)}
    return Entry(ids.derived(data, where, output_field), data, origin=where)


def _given_dict(item: dict[str, Any], where: str, ids: IdxAllocator) -> Entry:
    idx = item["idx"]
    if not isinstance(idx, str) or not idx:
        raise EntryError(ids.op, "idx", None,
                         f"{where} has idx {idx!r} ({type(idx).__name__}); an idx must be a "
                         "non-empty str", "convert it with str(...) or leave it out")
    rev = item.get("rev", 0)
    if item.keys() <= _ENTRY_KEYS and isinstance(item.get("data"), dict) and type(rev) is int:
        return Entry(ids.given(idx, where), copy.deepcopy(item["data"]), rev, origin=where)
    data = {k: copy.deepcopy(v) for k, v in item.items() if k != "idx"}
    return Entry(ids.given(idx, where), data, origin=where)


class FromList(SourceOp):
    """Entries from a Python list of dicts, Entries or (with output_field) plain values."""

    def __init__(self, input_list: Iterable[Any], output_field: str | None = None) -> None:
        self.input_list = list(input_list)
        self.output_field = output_field
        # Fail at definition time, not mid-run, on scalars without output_field or repeated idx.
        entries_from_items(self.input_list, origin="FromList", output_field=output_field)

    def generate(self, ctx: RunContext) -> list[Entry]:
        name = ctx.op_name or type(self).__name__
        # Fresh copies each run: downstream ops mutate entries in place.
        items = [x.copy() if isinstance(x, Entry) else x for x in self.input_list]
        return entries_from_items(items, origin=name, output_field=self.output_field, op=name)


# -- files -------------------------------------------------------------------------------------
class _FileSource(SourceOp):
    """Shared by the file readers: sorted glob, offset/max_count, idx allocation."""

    def __init__(self, glob_str: str | os.PathLike[str], offset: int, max_count: int | None,
                 fields: Sequence[str | None]) -> None:
        self.glob_str = os.fspath(glob_str)
        if type(offset) is not int or offset < 0:
            raise ConfigError(f"{type(self).__name__}: offset must be an int >= 0, got {offset!r}")
        if max_count is not None and (type(max_count) is not int or max_count < 0):
            raise ConfigError(f"{type(self).__name__}: max_count must be None or an int >= 0, "
                              f"got {max_count!r}")
        self.offset, self.max_count = offset, max_count
        _check_distinct(type(self).__name__, fields)

    def generate(self, ctx: RunContext) -> list[Entry]:
        name = ctx.op_name or type(self).__name__
        ids = IdxAllocator(name)
        # Allocate idx over the whole stream first, so slicing never changes an entry's idx.
        entries = [e for path in self._files(name) for e in self._read(path, ids, ctx)]
        stop = None if self.max_count is None else self.offset + self.max_count
        return entries[self.offset:stop]

    def _read(self, path: str, ids: IdxAllocator, ctx: RunContext) -> Iterator[Entry]:
        raise NotImplementedError

    def identity(self, path: str) -> str:
        """The file's part of an entry's identity: its path below the glob's fixed folder, so
        idx (and hence Shuffle's order) is the same in every checkout and however the folder
        is spelt ("./data/*.txt", "/home/me/proj/data/*.txt")."""
        fixed = re.split(r"[*?\[]", self.glob_str, maxsplit=1)[0]
        root = fixed if fixed.endswith(os.sep) or os.path.isdir(fixed) else os.path.dirname(fixed)
        return os.path.relpath(path, root or ".").replace(os.sep, "/")

    def _files(self, name: str) -> list[str]:
        if os.path.isfile(self.glob_str):
            return [self.glob_str]  # a literal name may hold glob metacharacters like [1]
        paths = sorted(p for p in glob.glob(self.glob_str, recursive=True) if os.path.isfile(p))
        if not paths:
            raise ConfigError(
                f"op {name!r}: the glob {self.glob_str!r} matches no file (relative paths start "
                f"at the current directory {os.getcwd()!r}). Check the path and the pattern, "
                "or use an absolute path")
        return paths


def _check_distinct(op: str, fields: Sequence[str | None]) -> None:
    named = [f for f in fields if f is not None]
    if len(set(named)) != len(named):
        raise ConfigError(f"{op}: output fields must differ, got {named}; one would overwrite "
                          "another")


def _read_text(name: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: drop a BOM, not part of line 1
            return f.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"op {name!r}: cannot read {path!r}: it is not UTF-8 text ({exc}). "
                          "Convert the file to UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"op {name!r}: cannot read {path!r}: {exc.strerror or exc}. "
                          "Check that it exists and is readable") from exc


# -- markdown ----------------------------------------------------------------------------------
def _heading(line: str) -> tuple[int, str] | None:
    m = _HEADING.match(line)
    return None if m is None else (len(m.group(1)), (m.group(2) or "").strip())


def _enter(path: list[str], level: int, title: str) -> list[str]:
    """The heading path after a level-``level`` heading: deeper levels end, missing ones are ""."""
    return (path + [""] * level)[:level - 1] + [title]


def _sections(lines: list[str]) -> Iterator[tuple[int, list[str], list[str]]]:
    """(heading line number or 0 before the first heading, heading path, body lines)."""
    headings: list[str] = []
    body: list[str] = []
    start = 0
    for lineno, raw in enumerate(lines, 1):
        h = _heading(raw.strip())
        if h is None:
            body.append(raw.rstrip())
            continue
        yield start, headings, body
        headings, body, start = _enter(headings, *h), [], lineno
    yield start, headings, body


class _MarkdownSource(_FileSource):
    def __init__(self, glob_str: str | os.PathLike[str], directory_list_field: str | None,
                 directory_str_field: str | None, filename_field: str | None, offset: int,
                 max_count: int | None, fields: Sequence[str | None]) -> None:
        super().__init__(glob_str, offset, max_count,
                         [*fields, directory_list_field, directory_str_field, filename_field])
        self.directory_list_field = directory_list_field
        self.directory_str_field = directory_str_field
        self.filename_field = filename_field

    def _place(self, data: dict[str, Any], directory: list[str], path: str) -> dict[str, Any]:
        if self.directory_list_field is not None:
            data[self.directory_list_field] = list(directory)
        if self.directory_str_field is not None:
            data[self.directory_str_field] = "/".join(directory)
        if self.filename_field is not None:
            data[self.filename_field] = path
        return data


class ReadMarkdownLines(_MarkdownSource):
    """One entry per non-empty, non-heading line of the matched Markdown/text files."""

    def __init__(self, glob_str: str | os.PathLike[str], keyword_field: str | None = None,
                 directory_list_field: str | None = None, directory_str_field: str | None = None,
                 *, offset: int = 0, max_count: int | None = None,
                 filename_field: str | None = None, key_field: str | None = None) -> None:
        # key_field= is the seed README's spelling; accept it, but not two different names.
        if keyword_field and key_field and keyword_field != key_field:
            raise ConfigError(f"ReadMarkdownLines: keyword_field={keyword_field!r} and "
                              f"key_field={key_field!r} disagree; key_field is an alias, give one")
        self.keyword_field = keyword_field or key_field or "keyword"
        super().__init__(glob_str, directory_list_field, directory_str_field, filename_field,
                         offset, max_count, [self.keyword_field])

    def _read(self, path: str, ids: IdxAllocator, ctx: RunContext) -> Iterator[Entry]:
        headings: list[str] = []
        for lineno, raw in enumerate(_read_text(ids.op, path).splitlines(), 1):
            line = raw.strip()
            h = _heading(line) if line else None
            if h is not None:
                headings = _enter(headings, *h)
            elif line:
                where = f"{path}:{lineno}"
                # The file is part of the identity: one line in two files gives two entries.
                idx = ids.derived([self.identity(path), headings, line], where)
                data = self._place({self.keyword_field: line}, headings, path)
                yield Entry(idx, data, origin=where)


class ReadMarkdownEntries(_MarkdownSource):
    """One entry per heading section with non-blank body text (title = its heading)."""

    def __init__(self, glob_str: str | os.PathLike[str], text_field: str = "text",
                 directory_list_field: str | None = None, directory_str_field: str | None = None,
                 *, title_field: str | None = "title", offset: int = 0,
                 max_count: int | None = None, filename_field: str | None = None) -> None:
        super().__init__(glob_str, directory_list_field, directory_str_field, filename_field,
                         offset, max_count, [text_field, title_field])
        self.text_field, self.title_field = text_field, title_field

    def _read(self, path: str, ids: IdxAllocator, ctx: RunContext) -> Iterator[Entry]:
        for start, headings, body in _sections(_read_text(ids.op, path).splitlines()):
            text = "\n".join(body).strip()
            if not text:
                continue
            if not headings:
                # Like the original, a prologue before the first heading has no title: say so.
                ctx.warn(f"{path}: text before the first heading is skipped (it has no title)")
                continue
            where = f"{path}:{start}"
            data = {self.text_field: text}
            if self.title_field is not None:
                data[self.title_field] = headings[-1]
            self._place(data, headings[:-1], path)
            yield Entry(ids.derived([self.identity(path), headings], where), data, origin=where)


# -- tables ------------------------------------------------------------------------------------
class _RowSource(_FileSource):
    """JSONL/Parquet: one entry per row; idx from ``idx_field`` or from the content."""

    def __init__(self, glob_str: str | os.PathLike[str], idx_field: str | None,
                 fields: Sequence[str] | None, offset: int, max_count: int | None) -> None:
        super().__init__(glob_str, offset, max_count, list(fields or []))
        self.idx_field = idx_field
        self.fields = None if fields is None else list(fields)

    def _rows(self, name: str, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        raise NotImplementedError

    def _read(self, path: str, ids: IdxAllocator, ctx: RunContext) -> Iterator[Entry]:
        for where, row in self._rows(ids.op, path):
            yield self._entry(row, where, ids)

    def _entry(self, row: dict[str, Any], where: str, ids: IdxAllocator) -> Entry:
        if self.idx_field is None:
            data = self._select(row, where, ids.op, None)
            return Entry(ids.derived(data, where), data, origin=where)
        idx = _row_idx(row, self.idx_field, where, ids.op)
        rev = 0
        if self.idx_field == "idx":
            # "idx"/"rev" are what WriteJsonl/WriteParquet write: read them back as identity.
            row = {k: v for k, v in row.items() if k != "idx"}
            if type(row.get("rev")) is int:
                rev = row.pop("rev")
        data = self._select(row, where, ids.op, idx)
        return Entry(ids.given(idx, where), data, rev, origin=where)

    def _select(self, row: dict[str, Any], where: str, op: str,
                idx: str | None) -> dict[str, Any]:
        if self.fields is None:
            return row
        for f in self.fields:
            if f not in row:
                raise EntryError(op, f, idx, f"{where} has no field {f!r} (it has: "
                                 f"{', '.join(map(str, row)) or 'nothing'})",
                                 "remove it from fields= or fix the file")
        return {f: row[f] for f in self.fields}


def _row_idx(row: dict[str, Any], field: str, where: str, op: str) -> str:
    if field not in row:
        raise EntryError(op, field, None, f"{where} has no idx field {field!r}",
                         "every row needs it when idx_field is set; leave idx_field out to "
                         "derive idx from the content")
    value = row[field]
    # Integer ids are common in datasets; anything else (None, floats, lists) is a mistake.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise EntryError(op, field, None, f"{where} has idx {value!r}; an idx must be a "
                         "non-empty str or an int", "fix the row or choose another idx_field")
    return value


class ReadJsonl(_RowSource):
    """One entry per JSON object line of the matched .jsonl files (blank lines are skipped)."""

    def __init__(self, glob_str: str | os.PathLike[str], *, idx_field: str | None = None,
                 fields: Sequence[str] | None = None, offset: int = 0,
                 max_count: int | None = None) -> None:
        super().__init__(glob_str, idx_field, fields, offset, max_count)

    def _rows(self, name: str, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for lineno, raw in enumerate(_read_text(name, path).splitlines(), 1):
            if raw.strip():
                where = f"{path}:{lineno}"
                yield where, _json_object(name, raw, where)


def _json_object(name: str, raw: str, where: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EntryError(name, None, None, f"{where} is not valid JSON ({exc})",
                         "fix or remove that line") from exc
    if not isinstance(obj, dict):
        raise EntryError(name, None, None, f"{where} holds a JSON {type(obj).__name__}, not an "
                         "object", "each line must be one {...} object")
    return obj


class ReadParquet(_RowSource):
    """One entry per row of the matched Parquet files (nested values are kept)."""

    def __init__(self, glob_str: str | os.PathLike[str], *, idx_field: str | None = None,
                 fields: Sequence[str] | None = None, offset: int = 0,
                 max_count: int | None = None) -> None:
        super().__init__(glob_str, idx_field, fields, offset, max_count)

    def _rows(self, name: str, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        from ..core.frames import read_rows

        try:
            rows = read_rows(path)
        except ConfigError as exc:
            raise ConfigError(f"op {name!r}: {exc}") from exc
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
