"""Entries <-> DataFrame and Parquet: faithful round trips, JSON fallback, clear errors."""

from __future__ import annotations

import math

import pytest

from batchfactory_dagster.core.entry import Entry
from batchfactory_dagster.core.errors import ConfigError, DuplicateIdxError, EntryError
from batchfactory_dagster.core.frames import (
    META_KEY,
    atomic_path,
    entries_to_frame,
    frame_to_entries,
    read_parquet,
    read_rows,
    write_parquet,
)


def tricky_entries() -> list[Entry]:
    return [
        Entry("a", {"text": "x", "n": 1, "f": 1.5, "tags": ["p", "q"], "nested": {"k": [1, 2]},
                    "mixed": 1, "ragged": {"a": 1}, "empty": {}, "none": None, "maybe": 1,
                    "lists": [{"role": "user"}], "deep": [[1], []]}, rev=3),
        Entry("b", {"text": "y", "n": 2, "f": 2.0, "tags": [], "nested": {"k": []},
                    "mixed": "one", "ragged": {"b": [True]}, "empty": {}, "none": None,
                    "lists": [{"role": "user", "name": "Bob"}], "deep": [[2, 3]]}),
        Entry("c", {"text": "z", "n": None, "f": float("nan"), "tags": ["r"], "nested": {"k": [3]},
                    "mixed": [1.0, 2], "ragged": {}, "empty": {}, "none": None, "maybe": None,
                    "lists": [], "deep": []}),
    ]


def assert_same_entries(got: list[Entry], want: list[Entry]) -> None:
    assert [(e.idx, e.rev, list(e.data)) for e in got] == [(e.idx, e.rev, list(e.data))
                                                          for e in want]
    for g, w in zip(got, want):
        for k, v in w.data.items():
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(g.data[k])
            else:
                assert g.data[k] == v and type(g.data[k]) is type(v), (g.idx, k)


def test_parquet_round_trip_is_faithful(tmp_path):
    entries = tricky_entries()
    write_parquet(entries, tmp_path / "sub" / "e.parquet")
    back = read_parquet(tmp_path / "sub" / "e.parquet")
    assert_same_entries(back, entries)
    assert back[0].data["mixed"] == 1 and back[2].data["mixed"] == [1.0, 2]
    assert type(back[2].data["mixed"][1]) is int  # not widened to float
    assert "maybe" not in back[1].data and back[2].data["maybe"] is None  # absent != None
    assert back[0].origin.endswith("e.parquet row 0")


def test_json_fallback_columns_are_recorded_in_metadata(tmp_path):
    import json

    import pyarrow.parquet as pq

    path = tmp_path / "e.parquet"
    write_parquet(tricky_entries(), path)
    meta = json.loads(pq.read_schema(path).metadata[META_KEY])
    assert {"mixed", "ragged", "empty"} <= set(meta["json_columns"])
    assert "text" not in meta["json_columns"] and "tags" not in meta["json_columns"]
    assert "nested" not in meta["json_columns"]  # same keys everywhere: a native struct
    assert meta["absent_column"] is True


def test_uniform_entries_have_no_helper_column(tmp_path):
    path = tmp_path / "u.parquet"
    write_parquet([Entry("a", {"x": 1}), Entry("b", {"x": 2})], path)
    assert list(read_rows(path)[0]) == ["idx", "rev", "x"]


def test_empty_batch_round_trip(tmp_path):
    write_parquet([], tmp_path / "e.parquet")
    assert read_parquet(tmp_path / "e.parquet") == []


def test_write_parquet_errors(tmp_path):
    with pytest.raises(EntryError) as info:
        write_parquet([Entry("a", {"obj": object()})], tmp_path / "x.parquet")
    assert (info.value.field, info.value.entry) == ("obj", "a")
    with pytest.raises(EntryError, match="clashes with the 'rev' column"):
        write_parquet([Entry("a", {"rev": 1})], tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_read_errors(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("nope")
    with pytest.raises(ConfigError, match=r"bad\.parquet"):
        read_parquet(bad)
    import pandas as pd

    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(ConfigError, match="no 'idx' column"):
        read_parquet(tmp_path / "plain.parquet")


def test_entries_to_frame_and_back():
    entries = [Entry("a", {"q": "x", "tags": ["t"], "n": 1}, rev=2), Entry("b", {"q": "y"})]
    df = entries_to_frame(entries)
    assert list(df.columns) == ["idx", "rev", "q", "tags", "n"]
    assert df.loc[0, "tags"] == ["t"]
    back = frame_to_entries(df)
    assert back[0] == entries[0]
    assert back[1].data == {"q": "y", "tags": None, "n": None}  # missing -> None
    assert type(back[0].data["n"]) is int and back[0].origin == "frame row 0"
    assert list(entries_to_frame([]).columns) == ["idx", "rev"]


def test_frame_to_entries_from_user_frames():
    import numpy as np
    import pandas as pd

    df = pd.DataFrame({"id": [10, 11], "v": [np.array([1, 2]), np.array([3])], "w": [1.5, None]})
    out = frame_to_entries(df, idx_column="id")
    assert [e.idx for e in out] == ["10", "11"]
    assert out[0].data == {"v": [1, 2], "w": 1.5} and out[1].data["w"] is None
    with pytest.raises(ConfigError, match="no column 'idx'.*id, v, w"):
        frame_to_entries(df)
    with pytest.raises(DuplicateIdxError, match="frame row 0.*frame row 1"):
        frame_to_entries(pd.DataFrame({"idx": ["k", "k"]}))
    with pytest.raises(ConfigError, match="row 0 has idx None"):
        frame_to_entries(pd.DataFrame({"idx": [None]}))


def test_entries_to_frame_reserved_field():
    with pytest.raises(EntryError, match="clashes with the 'idx' column"):
        entries_to_frame([Entry("a", {"idx": "b"})])


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) != "0o600"
