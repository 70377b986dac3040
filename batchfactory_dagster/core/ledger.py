"""The ledger: an append-only, content-addressed store of paid-for results.

Every broker remembers what it has already paid for (an LLM response keyed by the hash of
its request) in a ledger. Records are JSON objects with a non-empty string field "key"; the
last good record per key wins.

`JsonlLedger` keeps one JSON object per line. Design choices, and why:

* Appends are one `os.write` on an O_APPEND fd made while holding `flock(LOCK_EX)`, so
  several processes (Dagster's multiprocess executor) can append at once without losing or
  interleaving records. The file is never rewritten in place; only `compact()` replaces it,
  atomically, with `os.replace`.
* Memory holds an index key -> (offset, length) of the last good line, not the records:
  a million LLM responses would not fit comfortably, their keys do. `get()` reads one line
  back with `os.pread`.
* A line that does not parse as a JSON object with a non-empty string "key" (a writer died
  mid-line, garbage) is skipped and counted in `torn_lines`; it never breaks the load.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Self

import orjson

from batchfactory_dagster.core.errors import LedgerError

__all__ = ["JsonlLedger", "Ledger", "MemoryLedger", "open_ledger"]

# Bytes read per pread while indexing. 256 KiB to 16 MiB load equally fast (syscalls are
# noise next to parsing); 1 MiB keeps the transient split() of one block small.
_BLOCK = 1 << 20
# An index entry packs offset and length into one int: one small object per key instead of
# a tuple and two ints (about 80 bytes less per key).
_LEN_BITS = 32
_LEN_MASK = (1 << _LEN_BITS) - 1
# Written before a record when the file does not end with a newline. The newline stops the
# record being glued onto the torn bytes; the non-whitespace mark makes sure those bytes
# never parse, even when a failed write stopped exactly before its newline and left a
# complete-looking object, so a failed append is never served later.
_TORN_MARK = b"#torn\n"


# --------------------------------------------------------------------------- contract


class Ledger(ABC):
    """Append-only store of JSON records keyed by their "key" field; the last good record wins."""

    @abstractmethod
    def get(self, key: str) -> dict | None:
        """The last good record appended under `key`, or None."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of distinct keys."""

    @abstractmethod
    def keys(self) -> Iterator[str]:
        """Every key, in order of first appearance."""

    @abstractmethod
    def append_many(self, records: Iterable[dict]) -> None:
        """Append every record in one write; all are validated before anything is written."""

    @abstractmethod
    def refresh(self) -> int:
        """Pick up records other processes appended; return how many good records were read."""

    @abstractmethod
    def compact(self) -> None:
        """Keep only the last good record per key (atomically, for file-backed ledgers)."""

    @abstractmethod
    def close(self) -> None:
        """Release files; further reads and appends raise LedgerError."""

    @property
    @abstractmethod
    def torn_lines(self) -> int:
        """Lines skipped because they were torn or did not parse."""

    @property
    @abstractmethod
    def path(self) -> str | None:
        """The file behind the ledger, or None for an in-memory one."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def items(self) -> Iterator[tuple[str, dict]]:
        for key in self.keys():
            record = self.get(key)
            if record is not None:
                yield key, record

    def append(self, record: dict) -> None:
        """Append one record; record["key"] must be a non-empty str."""
        self.append_many((record,))

    def check_writable(self) -> None:
        """Raise LedgerError now if appends cannot work (closed, read-only), so that a broker
        finds out before it pays for answers it then could not record. A full disk shows only
        when writing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_ledger(path: str | os.PathLike | None) -> Ledger:
    """A JsonlLedger at `path`, or a MemoryLedger when `path` is None."""
    return MemoryLedger() if path is None else JsonlLedger(path)


def _encode(record: object) -> tuple[str, bytes]:
    """Validate one record and serialise it to one JSON line (without the newline)."""
    if not isinstance(record, dict):
        raise LedgerError(
            f"ledger records must be dicts with a non-empty str 'key'; got {type(record).__name__}"
        )
    key = record.get("key")
    if not isinstance(key, str) or not key:
        raise LedgerError(
            f"ledger record needs a non-empty str 'key', got key={key!r}; "
            "set record['key'] to the hash of the request before appending"
        )
    try:
        return key, orjson.dumps(record)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise LedgerError(
            f"ledger record {key!r} is not JSON-serialisable ({exc}); "
            "store only dict/list/str/int/float/bool/None values"
        ) from exc


# --------------------------------------------------------------------------- in memory


class MemoryLedger(Ledger):
    """In-memory twin of JsonlLedger for tests: same validation, copies and last-wins rules."""

    def __init__(self) -> None:
        # Serialised lines, not dicts: get() then returns a fresh copy and values round-trip
        # through JSON exactly as they would through the file.
        self._lines: dict[str, bytes] = {}
        self._mu = threading.Lock()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("in-memory ledger is closed; open a new one with open_ledger(None)")

    def get(self, key: str) -> dict | None:
        self._check_open()
        line = self._lines.get(key)
        return None if line is None else orjson.loads(line)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._lines

    def __len__(self) -> int:
        return len(self._lines)

    def keys(self) -> Iterator[str]:
        return iter(list(self._lines))

    def append_many(self, records: Iterable[dict]) -> None:
        encoded = [_encode(record) for record in records]
        with self._mu:
            self._check_open()
            self._lines.update(encoded)

    def refresh(self) -> int:
        self._check_open()
        return 0  # no other process can write to it

    def compact(self) -> None:
        self._check_open()  # already one record per key

    def close(self) -> None:
        self._closed = True

    @property
    def torn_lines(self) -> int:
        return 0

    @property
    def path(self) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"MemoryLedger({len(self)} keys)"


# --------------------------------------------------------------------------- on disk


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _index_lines(buf: bytes, base: int, index: dict[str, int]) -> tuple[int, int, int]:
    """Index every newline-terminated line of `buf`, which starts at file offset `base`.

    Returns (bytes consumed, good records, bad lines). Bytes after the last newline are left
    alone: they are torn or still being written, and the next read looks at them again.
    """
    lines = buf.split(b"\n")
    lines.pop()
    # One try around loads()["key"] is the fast path (measured ~10% faster than checking
    # types first): a list, scalar or key-less object lands in the except clause.
    loads, failures = orjson.loads, (orjson.JSONDecodeError, TypeError, KeyError)
    off, good, bad = base, 0, 0
    for line in lines:
        n = len(line)
        try:
            key = loads(line)["key"]
        except failures:
            key = None
        if key.__class__ is str and key:
            index[key] = off << _LEN_BITS | n
            good += 1
        elif line.strip():  # a blank line is neither a record nor damage
            bad += 1
        off += n + 1
    return off - base, good, bad


def _error(path: str, exc: OSError, action: str) -> LedgerError:
    """A LedgerError naming the path, what went wrong and how to fix it."""
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM) and action == "read":
        what = "is not readable"
        fix = "give this process read permission on the file, or point the broker at another cache path"
    elif code in (errno.EACCES, errno.EPERM):
        what = "is read-only"
        fix = "give this process write permission on the file and its directory, or point the broker at another cache path"
    elif code == errno.EROFS:
        what = "is on a read-only file system"
        fix = "point the broker at a cache path on a writable disk"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        what = "is on a full disk"
        fix = "free disk space or point the broker at a cache path on another disk; a partly written record is skipped as a torn line"
    elif code == errno.EISDIR:
        what = "is a directory"
        fix = f"point the broker at a file inside it, e.g. {os.path.join(path, 'ledger.jsonl')}"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        what = "has a parent path that is a file, not a directory"
        fix = "point the broker at a path whose parents are directories"
    else:
        what = f"failed ({exc.strerror or exc})"
        fix = "check the path, its permissions and its disk"
    reason = exc.strerror or str(exc)
    return LedgerError(f"ledger {path} {what}: cannot {action} ({reason}). Fix: {fix}.")


def _fsync_dir(directory: str) -> None:
    """Make a rename durable; some file systems cannot fsync a directory, which is fine."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class JsonlLedger(Ledger):
    """A ledger in a JSON-lines file, safe to append to from several processes at once."""

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False) -> None:
        self._path = os.path.abspath(os.fspath(path))
        self._fsync = fsync
        self._mu = threading.RLock()  # one ledger object may be shared by threads
        self._rfd: int | None = None  # read side: pread for get() and indexing
        self._wfd: int | None = None  # write side: opened on first append, per process
        self._wpid = 0
        self._index: dict[str, int] = {}
        self._ident = (0, 0)  # (st_dev, st_ino) of the file _rfd reads
        self._read_pos = 0  # everything before this offset is indexed
        self._size = 0  # file size seen by the last read; > _read_pos means a torn tail
        self._torn = 0
        self._unreported = 0  # others' records picked up by append/compact, told by refresh()
        self._make_parent()
        self._load()

    # -- opening -------------------------------------------------------------------

    def _make_parent(self) -> None:
        try:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
        except OSError as exc:
            raise _error(self._path, exc, "create its directory") from exc

    def _open(self, flags: int, action: str) -> int:
        try:
            return os.open(self._path, flags, 0o644)
        except OSError as exc:
            raise _error(self._path, exc, action) from exc

    def _check_open(self) -> int:
        if self._rfd is None:
            raise LedgerError(f"ledger {self._path} is closed; open it again with open_ledger()")
        return self._rfd

    # -- reading -------------------------------------------------------------------

    def _load(self) -> int:
        """Open the file now at the path and index it from scratch."""
        # O_CREAT: a new cache path starts as an empty ledger; an existing read-only file
        # still opens, so a read-only ledger can be read.
        action = "read" if os.path.exists(self._path) else "create"
        fd = self._open(os.O_RDONLY | os.O_CREAT, action)
        return self._adopt(fd, {}, 0, None)

    def _adopt(self, fd: int, index: dict[str, int], read_pos: int, scan_to: int | None) -> int:
        """Switch reads to `fd` with `index` covering [0, read_pos); index the rest."""
        st = os.fstat(fd)
        old, self._rfd = self._rfd, fd
        if old is not None:
            os.close(old)
        self._index, self._ident, self._torn = index, _ident(st), 0
        self._read_pos = self._size = read_pos
        return self._scan(st.st_size if scan_to is None else scan_to)

    def _scan(self, end: int) -> int:
        """Index the complete lines in [_read_pos, end); return the good records found."""
        pos, good, block = self._read_pos, 0, _BLOCK
        while pos < end:
            want = min(block, end - pos)
            try:
                buf = os.pread(self._rfd, want, pos)
            except OSError as exc:
                raise _error(self._path, exc, "read") from exc
            used, found, bad = _index_lines(buf, pos, self._index)
            pos, good, self._torn = pos + used, good + found, self._torn + bad
            if used == 0:
                if len(buf) < want or want == end - pos:
                    break  # only an unterminated tail is left
                block *= 2  # one line is longer than a block: read more at once
        self._read_pos, self._size = pos, max(end, pos)
        return good

    def _catch_up(self, st: os.stat_result) -> int:
        """Bring the index up to date with the file described by `st`."""
        if _ident(st) != self._ident or st.st_size < self._read_pos:
            return self._load()  # replaced by a compaction (or truncated): start over
        return self._scan(st.st_size)

    def get(self, key: str) -> dict | None:
        with self._mu:
            fd = self._check_open()
            packed = self._index.get(key)
            if packed is None:
                return None
            off, n = packed >> _LEN_BITS, packed & _LEN_MASK
            try:
                raw = os.pread(fd, n, off)
            except OSError as exc:
                raise _error(self._path, exc, "read") from exc
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # Lines are validated when indexed; only an in-place edit gets here.
            raise LedgerError(
                f"ledger {self._path}: the record for {key!r} at byte {off} no longer parses; "
                "the file was edited in place. Never edit a ledger by hand; reopen it to re-index"
            ) from exc

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> Iterator[str]:
        with self._mu:
            return iter(list(self._index))  # a snapshot: refresh() may grow the index

    def refresh(self) -> int:
        """Index what other processes appended since the last read; return its good records.

        Reads only the new bytes. If the file was replaced (another process compacted it) or
        shrank, it is indexed from scratch and every record in it counts as read.
        """
        with self._mu:
            self._check_open()
            try:
                st = os.stat(self._path)
            except FileNotFoundError:
                return 0  # deleted under us: keep serving what we have
            found = self._unreported + self._catch_up(st)
            self._unreported = 0
            return found

    # -- writing -------------------------------------------------------------------

    def _writer(self, action: str) -> int:
        """The append fd of this process, opened on first use."""
        if self._wfd is not None and self._wpid != os.getpid():
            # A forked child shares the parent's open file description and thus its flock:
            # it needs its own, or parent and child would not exclude each other.
            os.close(self._wfd)
            self._wfd = None
        if self._wfd is None:
            self._wfd = self._open(os.O_WRONLY | os.O_APPEND | os.O_CREAT, action)
            self._wpid = os.getpid()
        return self._wfd

    def check_writable(self) -> None:
        with self._mu:
            self._check_open()
            self._writer("append")  # opens the append fd: EACCES/EROFS surface here

    def _drop_writer(self) -> None:
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None

    def _is_live(self, fd: int) -> bool:
        """Whether `fd` is still the file at the path (compaction replaces it)."""
        try:
            return _ident(os.stat(self._path)) == _ident(os.fstat(fd))
        except FileNotFoundError:
            return False  # deleted: the next open creates a new one
        except OSError as exc:
            raise _error(self._path, exc, "stat") from exc

    @contextmanager
    def _locked(self, action: str) -> Iterator[int]:
        """Hold flock(LOCK_EX) on the live file; yield its append fd.

        The lock is on the ledger file itself, not on a sibling .lock file: no stray files,
        and appending needs no write permission on the directory. The price is that
        compaction replaces the inode, so a writer that waited on the old one finds it
        dead once it gets the lock, and retries on the new file.
        """
        while True:
            fd = self._writer(action)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise _error(self._path, exc, action) from exc
            if self._is_live(fd):
                break
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._drop_writer()
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def append_many(self, records: Iterable[dict]) -> None:
        encoded = [_encode(record) for record in records]
        if not encoded:
            return
        data = b"\n".join(line for _, line in encoded) + b"\n"
        with self._mu:
            self._check_open()
            with self._locked("append") as fd:
                # Nobody else writes while we hold the lock: catching up makes our offsets exact.
                self._unreported += self._catch_up(os.fstat(fd))
                mark = _TORN_MARK if self._size > self._read_pos else b""
                self._write(fd, mark + data)
            self._index_own(encoded, len(mark))

    def _write(self, fd: int, data: bytes) -> None:
        view, done = memoryview(data), 0
        try:
            # One os.write; the loop only continues after a short write, which happens
            # when the disk fills up, so that the error itself surfaces.
            while done < len(data):
                done += os.write(fd, view[done:])
            if self._fsync:
                os.fsync(fd)
        except OSError as exc:
            # Lines that reached the file whole are whole records and count; the line that
            # was cut has no newline, so it is a torn tail: skipped on load and sealed with
            # _TORN_MARK by the next append.
            raise _error(self._path, exc, "append") from exc

    def _index_own(self, encoded: list[tuple[str, bytes]], mark: int) -> None:
        """Index what we just wrote without reading it back."""
        if mark:
            self._torn += 1  # the torn tail is now a sealed bad line
        off = self._size + mark
        for key, line in encoded:
            self._index[key] = off << _LEN_BITS | len(line)
            off += len(line) + 1
        self._read_pos = self._size = off

    # -- compaction ----------------------------------------------------------------

    def compact(self) -> None:
        with self._mu:
            self._check_open()
            with self._locked("compact") as fd:
                self._unreported += self._catch_up(os.fstat(fd))
                self._rewrite(os.fstat(fd).st_mode)
            self._drop_writer()  # it points at the replaced file

    def _rewrite(self, mode: int) -> None:
        """Write the live records to a temp file, then atomically put it in place."""
        directory = os.path.dirname(self._path)
        try:
            tmp_fd, tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(self._path)}.", suffix=".compact", dir=directory
            )
        except OSError as exc:
            raise _error(self._path, exc, "compact (no temp file beside it)") from exc
        try:
            os.fchmod(tmp_fd, stat.S_IMODE(mode))
            index, size = self._copy_live(tmp_fd)
            os.fsync(tmp_fd)
            os.replace(tmp, self._path)
            _fsync_dir(directory)
        except BaseException as exc:
            os.close(tmp_fd)
            _unlink_quietly(tmp)
            if isinstance(exc, OSError):
                raise _error(self._path, exc, "compact") from exc
            raise
        # Read from the fd we wrote: if yet another compaction replaced the path since,
        # our offsets still match this file, and refresh() will notice the new one.
        self._adopt(tmp_fd, index, size, size)

    def _copy_live(self, out: int) -> tuple[dict[str, int], int]:
        """Copy the last good line of every key into `out`; return its index and size."""
        index: dict[str, int] = {}
        off = 0
        with open(out, "wb", buffering=1 << 20, closefd=False) as f:
            for key, packed in self._index.items():
                n = packed & _LEN_MASK
                f.write(os.pread(self._rfd, n, packed >> _LEN_BITS) + b"\n")
                index[key] = off << _LEN_BITS | n
                off += n + 1
        return index, off

    # -- the rest ------------------------------------------------------------------

    @property
    def torn_lines(self) -> int:
        return self._torn + (self._size > self._read_pos)

    @property
    def path(self) -> str | None:
        return self._path

    def close(self) -> None:
        with self._mu:
            self._drop_writer()
            if self._rfd is not None:
                os.close(self._rfd)
                self._rfd = None

    def __del__(self) -> None:
        # A ledger that was never closed should not leak its two fds.
        if getattr(self, "_mu", None) is not None:
            self.close()

    def __reduce__(self) -> tuple[object, tuple[str, bool]]:
        # File descriptors mean nothing in another process: a pickled ledger reopens its path.
        return _reopen, (self._path, self._fsync)

    def __repr__(self) -> str:
        return f"JsonlLedger({self._path!r}, {len(self)} keys)"


def _reopen(path: str, fsync: bool) -> JsonlLedger:
    return JsonlLedger(path, fsync=fsync)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
