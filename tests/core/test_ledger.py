"""The ledger: one contract over both implementations, then what only the file can get wrong."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import pickle
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchfactory_dagster.core import ledger as ledger_mod
from batchfactory_dagster.core.errors import LedgerError
from batchfactory_dagster.core.ledger import JsonlLedger, Ledger, MemoryLedger, open_ledger

# fork: workers start in milliseconds, and each opens its own ledger as a Dagster step would;
# one test also uses spawn, which is what Dagster's multiprocess executor amounts to.
FORK = multiprocessing.get_context("fork")


def rec(key: str, value: object = 0, **extra: object) -> dict:
    return {"key": key, "value": value, **extra}


def file_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


@pytest.fixture(params=["memory", "jsonl"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    led = MemoryLedger() if request.param == "memory" else JsonlLedger(tmp_path / "l.jsonl")
    yield led
    led.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "ledger.jsonl"


# --------------------------------------------------------------------------- contract


def test_append_then_get(ledger: Ledger) -> None:
    ledger.append(rec("a", {"text": "héllo\nworld"}))
    assert ledger.get("a") == rec("a", {"text": "héllo\nworld"})
    assert ledger.get("b") is None
    assert "a" in ledger and "b" not in ledger and 3 not in ledger
    assert ledger.torn_lines == 0


def test_last_record_wins(ledger: Ledger) -> None:
    ledger.append(rec("a", 1))
    ledger.append(rec("b", 1))
    ledger.append(rec("a", 2))
    assert ledger.get("a") == rec("a", 2)
    assert len(ledger) == 2


def test_keys_and_items_in_first_appearance_order(ledger: Ledger) -> None:
    for key, value in [("b", 1), ("a", 1), ("b", 2), ("c", 1)]:
        ledger.append(rec(key, value))
    assert list(ledger.keys()) == ["b", "a", "c"]
    assert list(ledger.items()) == [("b", rec("b", 2)), ("a", rec("a", 1)), ("c", rec("c", 1))]


def test_append_many_last_wins_within_the_batch(ledger: Ledger) -> None:
    ledger.append_many(rec(k, i) for i, k in enumerate("abab"))
    ledger.append_many([])
    assert len(ledger) == 2
    assert ledger.get("a") == rec("a", 2) and ledger.get("b") == rec("b", 3)


def test_compact_keeps_last_record_per_key(ledger: Ledger) -> None:
    for i in range(30):
        ledger.append(rec(f"k{i % 7}", i))
    ledger.compact()
    assert len(ledger) == 7
    last = {f"k{i % 7}": i for i in range(30)}
    assert {k: r["value"] for k, r in ledger.items()} == last
    ledger.append(rec("k0", "after"))
    assert ledger.get("k0") == rec("k0", "after")
    if ledger.path is not None:
        assert len(file_lines(Path(ledger.path))) == 8


@pytest.mark.parametrize(
    "bad",
    [
        {"value": 1},
        {"key": ""},
        {"key": 3},
        {"key": None},
        ["key", "a"],
        {"key": "a", "v": object()},
    ],
)
def test_invalid_record_raises_and_writes_nothing(ledger: Ledger, bad: object) -> None:
    with pytest.raises(LedgerError, match="key|JSON"):
        ledger.append(bad)  # type: ignore[arg-type]
    with pytest.raises(LedgerError):
        ledger.append_many([rec("good"), bad])  # type: ignore[list-item]
    assert len(ledger) == 0 and ledger.get("good") is None


def test_get_returns_a_copy(ledger: Ledger) -> None:
    ledger.append(rec("a", [1]))
    ledger.get("a")["value"].append(2)  # type: ignore[index]
    assert ledger.get("a") == rec("a", [1])


def test_refresh_without_other_writers_finds_nothing(ledger: Ledger) -> None:
    ledger.append(rec("a"))
    assert ledger.refresh() == 0


def test_closed_ledger_refuses_work(ledger: Ledger) -> None:
    with ledger as same:
        same.append(rec("a"))
    with pytest.raises(LedgerError, match="closed"):
        ledger.get("a")
    with pytest.raises(LedgerError, match="closed"):
        ledger.append(rec("b"))


def test_open_ledger_picks_the_implementation(tmp_path: Path) -> None:
    assert isinstance(open_ledger(None), MemoryLedger) and open_ledger(None).path is None
    with open_ledger(tmp_path / "x.jsonl") as led:
        assert isinstance(led, JsonlLedger) and led.path == str(tmp_path / "x.jsonl")


# --------------------------------------------------------------------------- the file


def test_reopen_reads_what_was_written_and_creates_parents(path: Path) -> None:
    with JsonlLedger(path, fsync=True) as led:
        led.append_many(rec(f"k{i}", i) for i in range(100))
        led.append(rec("k5", "new"))
    with JsonlLedger(path) as led:
        assert len(led) == 100 and led.torn_lines == 0
        assert led.get("k5") == rec("k5", "new") and led.get("k99") == rec("k99", 99)


def test_append_many_is_one_write_under_one_lock(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    led = JsonlLedger(path)
    writes, locks = [], []
    real_write, real_flock = os.write, fcntl.flock
    monkeypatch.setattr(ledger_mod.os, "write", lambda fd, b: writes.append(1) or real_write(fd, b))
    monkeypatch.setattr(
        ledger_mod.fcntl, "flock", lambda fd, op: locks.append(op) or real_flock(fd, op)
    )
    led.append_many(rec(f"k{i}") for i in range(500))
    assert writes == [1] and locks.count(fcntl.LOCK_EX) == 1


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_load_across_block_boundaries(
    path: Path, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [rec(f"k{i}", "x" * (i * 13 % 150)) for i in range(60)]
    with JsonlLedger(path) as led:
        led.append_many(records)
    monkeypatch.setattr(ledger_mod, "_BLOCK", block)
    with JsonlLedger(path) as led:
        assert dict(led.items()) == {r["key"]: r for r in records} and led.torn_lines == 0


def test_torn_final_line_is_skipped_counted_and_sealed(path: Path) -> None:
    with JsonlLedger(path) as led:
        led.append_many([rec("a"), rec("b")])
    with path.open("ab") as f:
        f.write(b'{"key":"c","value":')  # a writer died here
    with JsonlLedger(path) as led:
        assert len(led) == 2 and led.get("c") is None and led.torn_lines == 1
        led.append(rec("c", "ok"))
        assert led.get("c") == rec("c", "ok") and led.torn_lines == 1
    with JsonlLedger(path) as led:
        assert led.get("c") == rec("c", "ok") and len(led) == 3 and led.torn_lines == 1


def test_torn_line_that_looks_complete_is_never_served(path: Path) -> None:
    # A write cut just before its newline leaves a complete object: still a failed append.
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"key":"a","value":1}\n{"key":"a","value":2}')
    with JsonlLedger(path) as led:
        assert led.get("a") == rec("a", 1)
        led.append(rec("b"))
    with JsonlLedger(path) as led:
        assert led.get("a") == rec("a", 1) and led.get("b") == rec("b") and led.torn_lines == 1


def test_garbage_lines_in_the_middle_are_skipped_and_counted(path: Path) -> None:
    path.parent.mkdir(parents=True)
    good = [orjson.dumps(rec(k)) for k in "ab"]
    garbage = [b"\x00\xffnot json", b"[1, 2]", b'{"nokey": 1}', b'{"key": ""}', b'{"key": 5}', b"{"]
    path.write_bytes(b"\n".join([good[0], *garbage, b"", good[1]]) + b"\n")
    with JsonlLedger(path) as led:
        assert led.torn_lines == len(garbage)  # the blank line is not damage
        assert list(led.items()) == [("a", rec("a")), ("b", rec("b"))]


def test_truncation_at_any_byte_keeps_every_complete_record(path: Path) -> None:
    records = [rec("a", 1), rec("b", "é" * 5), rec("a", 2), rec("c", {"n": [1, 2]}), rec("b", 3)]
    lines = [orjson.dumps(r) + b"\n" for r in records]
    data = b"".join(lines)
    ends = [sum(map(len, lines[: i + 1])) for i in range(len(lines))]
    path.parent.mkdir(parents=True)
    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        complete = [r for r, end in zip(records, ends) if end <= cut]
        with JsonlLedger(path) as led:
            assert dict(led.items()) == {r["key"]: r for r in complete}, cut
            assert led.torn_lines == (cut not in [0, *ends])


def _deny_writes_to(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a file, or a directory's entries, read-only, also as root (who ignores mode bits)."""
    path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() != 0:
        return
    real_open = os.open

    def denied(p: str, flags: int) -> bool:
        if path.is_dir():  # creating an entry needs write permission on the directory
            return (
                os.path.dirname(p) == str(path)
                and bool(flags & os.O_CREAT)
                and not os.path.exists(p)
            )
        return p == str(path) and bool(flags & (os.O_WRONLY | os.O_RDWR))

    def fake_open(p: object, flags: int, *args: object, **kwargs: object) -> int:
        if denied(os.fspath(p), flags):  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))  # type: ignore[arg-type]
        return real_open(p, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger_mod.os, "open", fake_open)


def test_read_only_file_reads_but_refuses_appends(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with JsonlLedger(path) as led:
        led.append(rec("a"))
    _deny_writes_to(path, monkeypatch)
    try:
        with JsonlLedger(path) as led:
            assert led.get("a") == rec("a")
            with pytest.raises(LedgerError, match=r"read-only.*Fix: give") as info:
                led.append(rec("b"))
            assert str(path) in str(info.value)
            assert led.get("a") == rec("a") and led.get("b") is None
            with pytest.raises(LedgerError, match="read-only: cannot compact"):
                led.compact()
            assert led.get("a") == rec("a")
    finally:
        path.chmod(0o644)


def test_read_only_directory(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with JsonlLedger(path) as led:
        led.append(rec("a"))
    _deny_writes_to(path.parent, monkeypatch)
    try:
        with pytest.raises(LedgerError, match="read-only: cannot create") as info:
            JsonlLedger(path.parent / "new.jsonl")
        assert str(path.parent / "new.jsonl") in str(info.value)
        with JsonlLedger(path) as led:
            led.append(rec("b"))  # the lock is on the file itself: no new file is needed
            with pytest.raises(LedgerError, match="read-only: cannot compact"):
                led.compact()  # its temp file is
            assert led.get("b") == rec("b") and not list(path.parent.glob(".*compact"))
    finally:
        path.parent.chmod(0o755)


def test_pickled_ledger_reopens_its_path(path: Path) -> None:
    with JsonlLedger(path) as led:
        led.append(rec("a"))
        with pickle.loads(pickle.dumps(led)) as copy:
            assert copy.path == led.path and copy.get("a") == rec("a")


def test_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="is a directory") as info:
        JsonlLedger(tmp_path)
    assert str(tmp_path) in str(info.value) and "ledger.jsonl" in str(info.value)


def test_parent_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LedgerError, match="not a directory"):
        JsonlLedger(tmp_path / "file" / "ledger.jsonl")


@pytest.mark.parametrize("kept", ["none", "half", "all_but_newline"])
def test_full_disk_raises_and_serves_nothing_half_written(
    path: Path, monkeypatch: pytest.MonkeyPatch, kept: str
) -> None:
    led = JsonlLedger(path)
    led.append(rec("a"))
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        keep = {"none": 0, "half": len(data) // 2, "all_but_newline": len(data) - 1}[kept]
        real_write(fd, bytes(data[:keep]))
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(ledger_mod.os, "write", full_disk)
        with pytest.raises(LedgerError, match="full disk") as info:
            led.append(rec("b", "x" * 100))
    assert str(path) in str(info.value)
    assert led.get("b") is None and led.refresh() == 0
    led.append(rec("c"))
    for view in (led, JsonlLedger(path)):
        assert view.get("b") is None and view.get("c") == rec("c") and len(view) == 2
        assert view.torn_lines == (kept != "none")


def _append_worker(path: str, name: str, count: int, start: multiprocessing.Barrier) -> None:
    """Append `count` records one by one, then check this process's own index."""
    start.wait()  # all workers begin together, whatever their start-up time
    with JsonlLedger(path) as led:
        for i in range(count):
            big = "x" * 70_000 if i % 200 == 0 else ""  # some writes far above PIPE_BUF
            led.append(rec(f"{name}-{i}", i, big=big))
        for i in range(count):
            if led.get(f"{name}-{i}")["value"] != i:  # type: ignore[index]
                os._exit(3)
    os._exit(0)


def _run_workers(
    path: Path, names: list[str], count: int, method: str = "fork"
) -> list[multiprocessing.Process]:
    ctx = multiprocessing.get_context(method)
    start = ctx.Barrier(len(names))
    procs = [ctx.Process(target=_append_worker, args=(str(path), n, count, start)) for n in names]
    for proc in procs:
        proc.start()
        proc.barrier = start  # type: ignore[attr-defined]  # keep its semaphore alive until joined
    return procs


def _join_ok(procs: list[multiprocessing.Process]) -> None:
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * len(procs)


@pytest.mark.parametrize(("n_procs", "method"), [(2, "fork"), (4, "fork"), (2, "spawn")])
def test_concurrent_processes_lose_nothing(path: Path, n_procs: int, method: str) -> None:
    names = [f"w{j}" for j in range(n_procs)]
    _join_ok(_run_workers(path, names, 2000, method))
    with JsonlLedger(path) as led:
        assert len(led) == 2000 * n_procs and led.torn_lines == 0
        assert all(led.get(f"{n}-{i}")["value"] == i for n in names for i in range(2000))  # type: ignore[index]
    assert len(file_lines(path)) == 2000 * n_procs


def test_compacting_while_others_append_loses_nothing(path: Path) -> None:
    with JsonlLedger(path) as led:
        procs = _run_workers(path, ["w0", "w1"], 1500)
        compactions = 0
        while any(proc.is_alive() for proc in procs):
            led.compact()
            compactions += 1
            # Leave the writers room: back-to-back compactions (each an fsync'd rewrite) can
            # starve them for minutes on a slow disk, which tests nothing more.
            time.sleep(0.02)
        _join_ok(procs)
        assert compactions >= 1
        led.refresh()
        assert len(led) == 3000 and led.torn_lines == 0
    with JsonlLedger(path) as led:
        assert len(led) == 3000 and led.torn_lines == 0


def test_forked_child_using_the_parents_ledger_still_locks(path: Path) -> None:
    # After fork the inherited fd shares its flock with the parent; the ledger must reopen.
    with JsonlLedger(path) as led:
        led.append(rec("parent"))
        start = FORK.Event()

        def child(name: str) -> None:
            start.wait()
            for i in range(500):
                led.append(rec(f"{name}-{i}", i))
            ok = all(led.get(f"{name}-{i}") == rec(f"{name}-{i}", i) for i in range(500))
            os._exit(0 if ok else 3)

        procs = [FORK.Process(target=child, args=(name,)) for name in ("c0", "c1")]
        for proc in procs:
            proc.start()
        start.set()
        for i in range(500):
            led.append(rec(f"p-{i}", i))
        _join_ok(procs)
        assert led.refresh() == 1000 and len(led) == 1501 and led.torn_lines == 0


def test_refresh_sees_another_process_and_waits_for_unfinished_lines(path: Path) -> None:
    with JsonlLedger(path) as led:
        led.append(rec("mine"))
        _join_ok(_run_workers(path, ["other"], 100))
        assert led.refresh() == 100 and led.get("other-99")["value"] == 99  # type: ignore[index]
        line = orjson.dumps(rec("slow")) + b"\n"
        with path.open("ab") as f:
            f.write(line[:10])  # a large write still in progress
        assert led.refresh() == 0 and led.get("slow") is None
        with path.open("ab") as f:
            f.write(line[10:])
        assert led.refresh() == 1 and led.get("slow") == rec("slow") and led.torn_lines == 0


def test_compaction_by_another_ledger_is_picked_up_by_refresh(path: Path) -> None:
    a, b = JsonlLedger(path), JsonlLedger(path)
    for i in range(40):
        a.append(rec(f"k{i % 10}", i))
    assert b.refresh() == 40
    a.compact()
    assert b.get("k3") == rec("k3", 33)  # still reads the replaced file it holds open
    assert b.refresh() == 10  # reloaded from the compacted file
    assert len(b) == 10 and b.get("k3") == rec("k3", 33) and b.torn_lines == 0
    b.append(rec("k3", "from b"))  # lands in the new file, not the replaced one
    assert a.refresh() == 1 and a.get("k3") == rec("k3", "from b")
    assert len(file_lines(path)) == 11
    a.close()
    b.close()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.lists(st.sampled_from("abcde"), min_size=1, max_size=4)),
        st.tuples(st.just("compact"), st.just([])),
    ),
    max_size=25,
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_any_interleaving_of_appends_and_compactions_keeps_the_last_record(
    ops: list[tuple[str, list[str]]],
) -> None:
    expected: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "l.jsonl")
        with JsonlLedger(path) as led, JsonlLedger(path) as other:
            for step, (op, keys) in enumerate(ops):
                if op == "compact":
                    led.compact()
                    continue
                batch = [rec(k, [step, j]) for j, k in enumerate(keys)]
                if len(batch) == 1:
                    led.append(batch[0])
                else:
                    led.append_many(batch)
                expected.update((r["key"], r) for r in batch)
            assert dict(led.items()) == expected
            other.refresh()
            assert dict(other.items()) == expected
        with JsonlLedger(path) as reopened:
            assert dict(reopened.items()) == expected and reopened.torn_lines == 0
