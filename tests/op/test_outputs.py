"""Output ops: whole-batch printing, ToList, atomic JSONL/Parquet writing and their errors."""

from __future__ import annotations

import json
import os

import pytest

from batchfactory_dagster.core.context import RunContext
from batchfactory_dagster.core.entry import Entry
from batchfactory_dagster.core.errors import ConfigError, EntryError
from batchfactory_dagster.core.frames import read_parquet
from batchfactory_dagster.op.outputs import Print, PrintEntry, ToList, WriteJsonl, WriteParquet


def ctx(name: str = "Out") -> RunContext:
    c = RunContext()
    c.op_name = name
    return c


def batch() -> list[Entry]:
    return [Entry("a", {"text": "first", "n": 1}), Entry("b", {"text": "second", "n": 2}, rev=1),
            Entry("c", {"text": "third", "n": 3})]


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- printing ----------------------------------------------------------------------------------
def test_print_field_whole_batch_and_passes_through(capsys):
    entries = batch()
    out = Print().process([entries], ctx())
    assert out == [entries] and out[0] is entries
    text = capsys.readouterr().out
    assert "--- a (rev 0) ---\nfirst" in text and "--- b (rev 1) ---\nsecond" in text
    assert "third" in text


def test_print_first_n_whole_data_and_missing_field(capsys):
    Print(first_n=1).process([batch()], ctx())
    text = capsys.readouterr().out
    assert "first" in text and "second" not in text and "2 more entries not shown" in text
    Print(None).process([[Entry("x", {"k": [1, "é"]})]], ctx())
    assert '"k"' in capsys.readouterr().out
    c = ctx("P")
    with pytest.warns(UserWarning, match="no field 'text'"):
        Print().process([[Entry("x", {"other": 1})]], c)
    assert "<no field 'text'>" in capsys.readouterr().out and c.warnings


def test_print_empty_batch_and_bad_first_n(capsys):
    Print().process([[]], ctx("P"))
    assert "P: no entries" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="first_n"):
        Print(first_n=-1)


def test_print_entry(capsys):
    PrintEntry(first_n=2).process([batch()], ctx())
    text = capsys.readouterr().out
    assert '"idx": "a"' in text and '"rev": 1' in text and '"idx": "c"' not in text


# -- ToList ------------------------------------------------------------------------------------
def test_to_list_keeps_a_copy_of_the_last_batch():
    op = ToList()
    assert op.get_output() == []
    entries = batch()
    op.process([entries], ctx())
    entries[0].data["text"] = "changed downstream"
    kept = op.get_output()
    assert [e.idx for e in kept] == ["a", "b", "c"] and kept[0].data["text"] == "first"
    df = op.to_pandas()
    assert list(df.columns) == ["idx", "rev", "text", "n"] and df["rev"].tolist() == [0, 1, 0]
    op.process([batch()[:1]], ctx())
    assert len(op.get_output()) == 1


# -- WriteJsonl --------------------------------------------------------------------------------
def test_write_jsonl_current_batch_with_fields(tmp_path):
    path = tmp_path / "deep" / "out.jsonl"
    entries = batch()
    assert WriteJsonl(path, ["text"]).process([entries], ctx())[0] is entries
    assert read_jsonl(path) == [{"idx": "a", "rev": 0, "text": "first"},
                                {"idx": "b", "rev": 1, "text": "second"},
                                {"idx": "c", "rev": 0, "text": "third"}]
    WriteJsonl(path).process([batch()[:1]], ctx())  # only_current: earlier rows go
    assert read_jsonl(path) == [{"idx": "a", "rev": 0, "text": "first", "n": 1}]
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temp file left


def test_write_jsonl_keeps_earlier_rows_when_asked(tmp_path):
    path = tmp_path / "out.jsonl"
    WriteJsonl(path, "text").process([batch()], ctx())
    newer = [Entry("b", {"text": "again"}, rev=2), Entry("d", {"text": "new"})]
    WriteJsonl(path, ["text"], only_current=False).process([newer], ctx())
    rows = read_jsonl(path)
    assert [(r["idx"], r["rev"], r["text"]) for r in rows] == [
        ("a", 0, "first"), ("c", 0, "third"), ("b", 2, "again"), ("d", 0, "new")]


def test_write_jsonl_unicode_is_kept_readable(tmp_path):
    path = tmp_path / "u.jsonl"
    WriteJsonl(path).process([[Entry("a", {"text": "老师"})]], ctx())
    assert "老师" in path.read_text(encoding="utf-8")


def test_missing_field_names_op_field_entry(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(EntryError) as info:
        WriteJsonl(path, ["text", "score"]).process([batch()], ctx("W"))
    err = info.value
    assert (err.op, err.field, err.entry) == ("W", "score", "a")
    assert "has no field 'score'" in str(err) and "output_fields" in str(err)
    assert path.read_text() == "old\n"  # a failed write leaves the file alone


def test_non_json_value_names_the_field(tmp_path):
    with pytest.raises(EntryError) as info:
        WriteJsonl(tmp_path / "o.jsonl").process([[Entry("a", {"ok": 1, "bad": {1, 2}})]],
                                                 ctx("W"))
    assert (info.value.field, info.value.entry) == ("bad", "a")
    assert "not JSON-serialisable" in str(info.value)


def test_clashing_idx_field_and_corrupt_earlier_file(tmp_path):
    path = tmp_path / "o.jsonl"
    with pytest.raises(EntryError, match="clashes"):
        WriteJsonl(path).process([[Entry("a", {"idx": "other"})]], ctx("W"))
    WriteJsonl(path).process([[Entry("a", {"idx": "a", "t": 1})]], ctx("W"))  # same value: fine
    assert read_jsonl(path) == [{"idx": "a", "rev": 0, "t": 1}]
    path.write_text('{"idx": "x"}\n{broken\n')
    with pytest.raises(EntryError, match=r"o\.jsonl:2 is not valid JSON"):
        WriteJsonl(path, only_current=False).process([batch()], ctx("W"))
    path.write_bytes(b'{"idx": "x"}\n{"idx": "caf\xe9"}\n')
    with pytest.raises(EntryError, match=r"o\.jsonl:2 is not valid JSON"):
        WriteJsonl(path, only_current=False).process([batch()], ctx("W"))
    path.write_text('[1]\n')
    with pytest.raises(EntryError, match=r"o\.jsonl:1 is not an object with an 'idx'"):
        WriteJsonl(path, only_current=False).process([batch()], ctx("W"))


def test_unwritable_target_is_a_config_error(tmp_path):
    target = tmp_path / "adir"
    target.mkdir()
    with pytest.raises(ConfigError, match=r"'W'.*cannot write"):
        WriteJsonl(target).process([batch()], ctx("W"))
    assert os.listdir(target) == []


# -- WriteParquet ------------------------------------------------------------------------------
def test_write_parquet_round_trip(tmp_path):
    path = tmp_path / "p" / "out.parquet"
    entries = [Entry("a", {"text": "t", "meta": {"tags": ["x"]}, "n": 1}, rev=2),
               Entry("b", {"text": "u", "meta": {}, "n": 2})]
    WriteParquet(path, ["text", "meta"]).process([entries], ctx())
    assert read_parquet(path) == [Entry("a", {"text": "t", "meta": {"tags": ["x"]}}, rev=2),
                                  Entry("b", {"text": "u", "meta": {}})]
    WriteParquet(path).process([entries], ctx())
    assert read_parquet(path) == entries


def test_write_parquet_errors(tmp_path):
    with pytest.raises(EntryError) as info:
        WriteParquet(tmp_path / "o.parquet", ["nope"]).process([batch()], ctx("WP"))
    assert (info.value.op, info.value.field, info.value.entry) == ("WP", "nope", "a")
    with pytest.raises(EntryError, match="not JSON-serialisable"):
        WriteParquet(tmp_path / "o.parquet").process([[Entry("a", {"o": object()})]], ctx())
    assert not (tmp_path / "o.parquet").exists()
