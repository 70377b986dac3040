"""Source ops: idx rules, Markdown parsing, JSONL/Parquet reading and their error messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchfactory_dagster.core.context import RunContext
from batchfactory_dagster.core.entry import Entry
from batchfactory_dagster.core.errors import ConfigError, DuplicateIdxError, EntryError
from batchfactory_dagster.core.frames import write_parquet
from batchfactory_dagster.core.hashing import short_hash
from batchfactory_dagster.op.sources import (
    FromList,
    ReadJsonl,
    ReadMarkdownEntries,
    ReadMarkdownLines,
    ReadParquet,
    entries_from_items,
)


def ctx(name: str = "Src") -> RunContext:
    c = RunContext()
    c.op_name = name
    return c


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


# -- entries_from_items / FromList -------------------------------------------------------------
def test_dict_without_idx_gets_content_hash_and_repeats_stay_distinct():
    out = entries_from_items([{"a": 1}, {"a": 1}, {"a": 2}, {"a": 1}], origin="L")
    h = short_hash({"a": 1})
    assert [e.idx for e in out] == [h, f"{h}_1", short_hash({"a": 2}), f"{h}_2"]
    assert [e.data for e in out] == [{"a": 1}, {"a": 1}, {"a": 2}, {"a": 1}]
    assert out[1].origin == "L item 1"


def test_dict_with_idx_and_data_forms():
    out = entries_from_items([{"idx": "x", "data": {"q": 1}, "rev": 2},
                              {"idx": "y", "q": 2},
                              {"idx": "z", "data": "plain", "label": 1}], origin="L")
    assert (out[0].idx, out[0].data, out[0].rev) == ("x", {"q": 1}, 2)
    assert (out[1].idx, out[1].data) == ("y", {"q": 2})
    assert out[2].data == {"data": "plain", "label": 1}  # not the Entry form: a plain row


def test_entry_passes_as_is_and_gets_an_origin():
    e = Entry("e1", {"v": 1})
    (out,) = entries_from_items([e], origin="L")
    assert out is e and e.origin == "L item 0"


def test_scalars_need_output_field():
    out = entries_from_items(["a", "b", "a"], origin="L", output_field="text")
    assert [e.data for e in out] == [{"text": "a"}, {"text": "b"}, {"text": "a"}]
    assert out[2].idx == out[0].idx + "_1"
    with pytest.raises(EntryError, match=r"L item 0 is a str .*output_field"):
        entries_from_items(["a"], origin="L")


def test_repeated_user_idx_names_both_items():
    with pytest.raises(DuplicateIdxError) as info:
        entries_from_items([{"idx": "k", "v": 1}, {"v": 2}, Entry("k")], origin="input", op="Op")
    err = info.value
    assert (err.op, err.field, err.entry) == ("Op", "idx", "k")
    assert "input item 0" in str(err) and "input item 2" in str(err)


def test_bad_idx_type_and_unhashable_content():
    with pytest.raises(EntryError, match=r"field 'idx'.*item 0 has idx 3"):
        entries_from_items([{"idx": 3}], origin="L")
    with pytest.raises(EntryError, match="not JSON-serialisable"):
        entries_from_items([{"s": {1, 2}}], origin="L")


def test_from_list_gives_fresh_copies_each_run():
    src = [{"a": [1]}, Entry("e", {"b": 1})]
    op = FromList(src)
    first = op.generate(ctx("FromList"))
    first[0].data["a"].append(2)
    first[1].data["b"] = 99
    second = op.process([], ctx("FromList"))[0]
    assert second[0].data == {"a": [1]} and second[1].data == {"b": 1}
    assert src[0] == {"a": [1]}
    assert second[0].origin == "FromList item 0"


def test_from_list_fails_at_definition_time():
    with pytest.raises(EntryError, match="output_field"):
        FromList([1, 2])
    with pytest.raises(DuplicateIdxError):
        FromList([{"idx": "a"}, {"idx": "a"}])
    assert [e.data for e in FromList([1], output_field="n").generate(ctx())] == [{"n": 1}]


# -- ReadMarkdownLines --------------------------------------------------------------------------
MD = """intro line

# Myths
Zeus

## Heroes
Heracles
Zeus
#hashtag stays text
### Deep
Perseus
# Other
Zeus
#### Skipped levels
Medusa
"""


def test_markdown_lines_headings_and_fields(tmp_path):
    p = write(tmp_path / "a.md", MD)
    op = ReadMarkdownLines(p, "kw", "dirs", "dir", filename_field="file")
    out = op.generate(ctx())
    assert [e.data["kw"] for e in out] == ["intro line", "Zeus", "Heracles", "Zeus",
                                          "#hashtag stays text", "Perseus", "Zeus", "Medusa"]
    assert out[0].data["dirs"] == [] and out[0].data["dir"] == ""
    assert out[3].data["dirs"] == ["Myths", "Heroes"]
    assert out[5].data["dir"] == "Myths/Heroes/Deep"
    assert out[7].data["dirs"] == ["Other", "", "", "Skipped levels"]
    assert out[6].data["dir"] == "Other" and out[6].data["file"] == p
    assert out[2].origin == f"{p}:7"
    assert len({e.idx for e in out}) == len(out)


def test_markdown_lines_idx_includes_file_and_counts_repeats(tmp_path):
    a = write(tmp_path / "a.md", "# H\nsame\nsame\n")
    b = write(tmp_path / "b.md", "# H\nsame\n")
    out = ReadMarkdownLines(str(tmp_path / "*.md"), "kw").generate(ctx())
    # the file counts by its path below the glob's folder, the same in every checkout
    base = short_hash(["a.md", ["H"], "same"])
    assert [e.idx for e in out] == [base, f"{base}_1", short_hash(["b.md", ["H"], "same"])]
    assert a.endswith("a.md") and b.endswith("b.md")


def test_markdown_idx_does_not_depend_on_how_the_folder_is_spelt(tmp_path, monkeypatch):
    write(tmp_path / "d" / "a.md", "# H\nx\ny\n")
    monkeypatch.chdir(tmp_path)
    relative = [e.idx for e in ReadMarkdownLines("./d/*.md", "kw").generate(ctx())]
    absolute = [e.idx for e in ReadMarkdownLines(str(tmp_path / "d" / "*.md"), "kw").generate(ctx())]
    literal = [e.idx for e in ReadMarkdownLines("d/a.md", "kw").generate(ctx())]
    assert relative == absolute == literal and len(relative) == 2


def test_markdown_lines_readme_call_styles(tmp_path):
    p = write(tmp_path / "story.txt", "# T\nline\n")
    by_alias = ReadMarkdownLines(p, key_field="keyword", directory_str_field="directory")
    assert by_alias.generate(ctx())[0].data == {"keyword": "line", "directory": "T"}
    assert ReadMarkdownLines(p, "chapter").generate(ctx())[0].data == {"chapter": "line"}
    assert ReadMarkdownLines(p).generate(ctx())[0].data == {"keyword": "line"}
    with pytest.raises(ConfigError, match="alias"):
        ReadMarkdownLines(p, "a", key_field="b")
    with pytest.raises(ConfigError, match="must differ"):
        ReadMarkdownLines(p, "x", directory_str_field="x")


def test_markdown_lines_offset_max_count_keep_idx(tmp_path):
    p = write(tmp_path / "a.md", "a\nb\nc\nd\n")
    everything = ReadMarkdownLines(p).generate(ctx())
    part = ReadMarkdownLines(p, offset=1, max_count=2).generate(ctx())
    assert part == everything[1:3]
    with pytest.raises(ConfigError, match="offset"):
        ReadMarkdownLines(p, offset=-1)
    with pytest.raises(ConfigError, match="max_count"):
        ReadMarkdownLines(p, max_count=1.5)


def test_sorted_glob_and_literal_names(tmp_path):
    write(tmp_path / "b.md", "from b\n")
    write(tmp_path / "a.md", "from a\n")
    write(tmp_path / "sub" / "c.md", "from c\n")
    out = ReadMarkdownLines(str(tmp_path / "**" / "*.md")).generate(ctx())
    assert [e.data["keyword"] for e in out] == ["from a", "from b", "from c"]
    odd = write(tmp_path / "[draft].md", "odd\n")  # glob metacharacters in a real name
    assert ReadMarkdownLines(odd).generate(ctx())[0].data == {"keyword": "odd"}


def test_glob_matching_nothing_is_a_config_error(tmp_path):
    pattern = str(tmp_path / "nope" / "*.md")
    with pytest.raises(ConfigError) as info:
        ReadMarkdownLines(pattern).generate(ctx("Reader"))
    text = str(info.value)
    assert "'Reader'" in text and pattern in text and os.getcwd() in text
    assert "Check the path" in text


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "latin1.md"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.md.*not UTF-8"):
        ReadMarkdownLines(str(bad)).generate(ctx())
    if os.name == "posix" and os.geteuid() != 0:  # root reads anything
        locked = Path(write(tmp_path / "locked.md", "x\n"))
        locked.chmod(0)
        try:
            with pytest.raises(ConfigError, match=r"locked\.md"):
                ReadMarkdownLines(str(locked)).generate(ctx())
        finally:
            locked.chmod(0o644)


def test_os_errors_name_the_file(tmp_path, monkeypatch):
    from batchfactory_dagster.op import sources

    p = write(tmp_path / "secret.md", "x\n")

    def denied(*_args, **_kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sources, "open", denied, raising=False)  # works even as root
    with pytest.raises(ConfigError, match=r"'R'.*secret\.md.*Permission denied"):
        ReadMarkdownLines(p).generate(ctx("R"))


def test_bom_and_crlf(tmp_path):
    p = tmp_path / "w.md"
    p.write_bytes("\ufeff# Title\r\nline\r\n".encode())
    (e,) = ReadMarkdownLines(str(p), directory_str_field="d").generate(ctx())
    assert e.data == {"keyword": "line", "d": "Title"}


# -- ReadMarkdownEntries -----------------------------------------------------------------------
def test_markdown_entries_sections(tmp_path):
    p = write(tmp_path / "novel.md", "prologue\n# Book\n## Ch 1\nPara one.\n\nPara two.\n"
                                      "## Ch 2\n\n   \n## Ch 3\n  indented\n# Appendix\nend\n")
    c = ctx()
    with pytest.warns(UserWarning, match="before the first heading"):
        out = ReadMarkdownEntries(p, directory_list_field="dirs", directory_str_field="dir",
                                  filename_field="f").generate(c)
    assert [e.data["title"] for e in out] == ["Ch 1", "Ch 3", "Appendix"]
    assert out[0].data == {"text": "Para one.\n\nPara two.", "title": "Ch 1", "dirs": ["Book"],
                           "dir": "Book", "f": p}
    assert out[1].data["text"] == "indented"
    assert out[2].data["dirs"] == []
    assert out[0].origin == f"{p}:3"
    assert out[0].idx == short_hash([os.path.basename(p), ["Book", "Ch 1"]])
    assert len(c.warnings) == 1


def test_markdown_entries_repeated_headings_and_options(tmp_path):
    p = write(tmp_path / "a.md", "# A\none\n# A\ntwo\n")
    out = ReadMarkdownEntries(p, "body", title_field=None, max_count=1, offset=1).generate(ctx())
    assert [e.data for e in out] == [{"body": "two"}]
    assert out[0].idx == short_hash([os.path.basename(p), ["A"]]) + "_1"


# -- ReadJsonl ---------------------------------------------------------------------------------
def test_jsonl_content_idx_fields_and_blank_lines(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"q": "a", "n": 1}\n\n{"q": "a", "n": 1}\n{"q": "b", "n": 2}\n')
    out = ReadJsonl(p, fields=["q"]).generate(ctx())
    h = short_hash({"q": "a"})
    assert [e.idx for e in out] == [h, f"{h}_1", short_hash({"q": "b"})]
    assert [e.data for e in out] == [{"q": "a"}, {"q": "a"}, {"q": "b"}]
    assert out[1].origin == f"{p}:3"


def test_jsonl_idx_field(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"id": 7, "q": "a"}\n{"id": "x", "q": "b"}\n')
    out = ReadJsonl(p, idx_field="id").generate(ctx())
    assert [e.idx for e in out] == ["7", "x"]
    assert out[0].data == {"id": 7, "q": "a"}


def test_jsonl_idx_collision_names_both_lines(tmp_path):
    a = write(tmp_path / "a.jsonl", '{"id": "k"}\n')
    b = write(tmp_path / "b.jsonl", '\n{"id": "k"}\n')
    with pytest.raises(DuplicateIdxError) as info:
        ReadJsonl(str(tmp_path / "*.jsonl"), idx_field="id").generate(ctx("J"))
    text = str(info.value)
    assert "'J'" in text and f"{a}:1" in text and f"{b}:2" in text


def test_jsonl_bad_rows_name_file_and_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"a": 1}\n{"a": \n')
    with pytest.raises(EntryError, match=rf"'J'.*{p}:2 is not valid JSON"):
        ReadJsonl(p).generate(ctx("J"))
    p = write(tmp_path / "e.jsonl", '[1, 2]\n')
    with pytest.raises(EntryError, match=rf"{p}:1 holds a JSON list"):
        ReadJsonl(p).generate(ctx("J"))
    p = write(tmp_path / "f.jsonl", '{"a": 1}\n')
    with pytest.raises(EntryError, match=r"field 'b'.*f\.jsonl:1 has no field 'b'") as info:
        ReadJsonl(p, fields=["b"]).generate(ctx("J"))
    assert info.value.field == "b"
    with pytest.raises(EntryError, match="has no idx field 'id'"):
        ReadJsonl(p, idx_field="id").generate(ctx("J"))
    p = write(tmp_path / "g.jsonl", '{"id": null}\n')
    with pytest.raises(EntryError, match="non-empty str or an int"):
        ReadJsonl(p, idx_field="id").generate(ctx("J"))


def test_jsonl_reads_back_what_writejsonl_writes(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"idx": "a", "rev": 3, "text": "t"}\n')
    (e,) = ReadJsonl(p, idx_field="idx").generate(ctx())
    assert (e.idx, e.rev, e.data) == ("a", 3, {"text": "t"})


# -- ReadParquet -------------------------------------------------------------------------------
def test_parquet_rows_nested_values_and_idx_field(tmp_path):
    import pandas as pd

    p = tmp_path / "t.parquet"
    pd.DataFrame({"id": [1, 2], "tags": [["a"], ["b", "c"]]}).to_parquet(p)
    out = ReadParquet(str(p), idx_field="id").generate(ctx())
    assert [e.idx for e in out] == ["1", "2"]
    assert out[1].data == {"id": 2, "tags": ["b", "c"]}
    assert out[1].origin == f"{p} row 1"
    by_content = ReadParquet(str(p), fields=["tags"], max_count=1).generate(ctx())
    assert by_content[0].idx == short_hash({"tags": ["a"]})


def test_parquet_round_trip_with_written_entries(tmp_path):
    entries = [Entry("a", {"x": {"k": [1, {"z": None}]}}, rev=2), Entry("b", {"y": 1})]
    write_parquet(entries, tmp_path / "e.parquet")
    out = ReadParquet(str(tmp_path / "e.parquet"), idx_field="idx").generate(ctx())
    assert out == entries


def test_parquet_unreadable_file_names_op_and_file(tmp_path):
    p = write(tmp_path / "bad.parquet", "not parquet")
    with pytest.raises(ConfigError, match=r"'P'.*bad\.parquet"):
        ReadParquet(p).generate(ctx("P"))
