"""compile() catches fields that no earlier op can make, and never raises falsely."""

from __future__ import annotations

import pytest

from batchfactory_dagster.core.errors import DefinitionError
from batchfactory_dagster.op import (
    Apply,
    CollectAllToList,
    ExtractResponseText,
    Filter,
    FromList,
    GenerateLLMRequest,
    If,
    RemoveField,
    Repeat,
    SetField,
    SpawnFromList,
    WriteJsonl,
)


def test_template_typo_fails_at_compile_naming_op_and_field():
    g = FromList([{"plot": "x"}]) | GenerateLLMRequest("Review: {plto}", model="m@local")
    with pytest.raises(DefinitionError) as err:
        g.compile()
    assert "GenerateLLMRequest" in str(err.value) and "'plto'" in str(err.value)
    assert "plot" in str(err.value)  # what entries do have


def test_write_jsonl_unknown_output_field_fails_at_compile(tmp_path):
    g = FromList([{"a": 1}]) | WriteJsonl(tmp_path / "o.jsonl", output_fields=["a", "b"])
    with pytest.raises(DefinitionError, match="'b'"):
        g.compile()


def test_removed_field_is_missing_later():
    g = FromList([{"a": 1}]) | RemoveField("a") | Apply(str, "a", "b")
    with pytest.raises(DefinitionError, match="'a'"):
        g.compile()


def test_unknown_effects_never_raise():
    # Apply(fn) may add anything; a field present in some rows only is allowed (a Filter may
    # keep exactly those)
    (FromList([{"a": 1}]) | Apply(lambda d: d.update(z=1)) | Apply(str, "z", "y")).compile()
    (FromList([{"a": 1}, {"b": 2}]) | Filter(lambda d: "b" in d)
     | GenerateLLMRequest("{b}", model="m@local")).compile()


def test_fields_flow_through_loops_branches_and_spawns():
    g = (FromList([{"xs": [1, 2]}])
         | SpawnFromList("xs", "x") | Apply(lambda x: x + 1, "x", "y")
         | CollectAllToList("y", "ys")
         | Repeat(SetField("k", 1), 2)
         | If(lambda d: True, SetField("t", 1))
         | GenerateLLMRequest("{ys} {k} {t} {rounds}", model="m@local"))
    g.compile()
    bad = (FromList([{"xs": [1]}]) | SpawnFromList("xs", "x")
           | GenerateLLMRequest("{xs}", model="m@local") | ExtractResponseText()
           | CollectAllToList("text", "texts"))
    with pytest.raises(DefinitionError, match="'xs'"):  # children carry the item, not the list
        bad.compile()
