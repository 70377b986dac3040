"""Composition and compile(): what `|` and wire() build, and what compile() refuses."""

from __future__ import annotations

import pytest

from batchfactory_dagster.core.errors import DefinitionError, DuplicateIdxError
from batchfactory_dagster.op import (
    Apply,
    CollectAllToList,
    FromList,
    JoinByParent,
    SetField,
    SpawnFromList,
    TakeFirstN,
    wire,
)


def test_pipe_builds_plan_in_order_and_names_are_unique():
    g = FromList([{"a": 1}]) | SetField("b", 2) | SetField("c", 3)
    plan = g.compile()
    assert [n.name for n in plan.nodes] == ["FromList", "SetField", "SetField_2"]
    assert plan.execute()[0].data == {"a": 1, "b": 2, "c": 3}


def test_pipe_does_not_mutate_left_segment():
    base = FromList([{"a": 1}]) | SetField("b", 2)
    g1 = base | SetField("c", 3)
    assert len(base.nodes) == 2 and len(g1.nodes) == 3


def test_op_used_twice_is_refused():
    s = SetField("b", 2)
    with pytest.raises(DefinitionError, match="already part of the pipeline"):
        FromList([{"a": 1}]) | s | s


def test_source_after_pipe_is_refused():
    with pytest.raises(DefinitionError, match="is a source"):
        SetField("a", 1) | FromList([{"a": 1}])


def test_non_op_in_pipe_names_the_problem():
    with pytest.raises(DefinitionError, match="expected an op"):
        FromList([{"a": 1}]) | (lambda d: d)


def test_invalid_user_name_fails_at_compile():
    g = FromList([{"a": 1}]) | SetField("b", 2).named("bad name!")
    with pytest.raises(DefinitionError, match=r"\^\[A-Za-z0-9_\]\+\$"):
        g.compile()


def test_duplicate_user_names_fail_at_compile():
    g = FromList([{"a": 1}]) | SetField("b", 2).named("x") | SetField("c", 2).named("x")
    with pytest.raises(DefinitionError, match="share this name"):
        g.compile()


def test_unwired_in_port_fails_at_compile():
    join = JoinByParent("x")
    g = FromList([{"a": 1}]) | join
    with pytest.raises(DefinitionError, match="in-port 1 is not wired"):
        g.compile()


def test_port_wired_twice_is_refused():
    src, a, b = FromList([{"a": 1}]), SetField("b", 1), SetField("c", 1)
    g = src | a
    with pytest.raises(DefinitionError, match="already wired"):
        g.wire(src, b)


def test_spawn_without_collect_fails_at_compile():
    g = FromList([{"xs": [1]}]) | SpawnFromList("xs", "x") | SetField("y", 1)
    with pytest.raises(DefinitionError, match="no CollectAllToList"):
        g.compile()


def test_explicit_wiring_of_spawn_and_collect():
    src = FromList([{"xs": [1, 2, 3]}])
    spawn, collect = SpawnFromList("xs", "x"), CollectAllToList("y", "ys")
    body = Apply(lambda x: x + 10, "x", "y")
    g = src | spawn
    g.wire(spawn, body, 1, 0)
    g.wire(body, collect, 0, 1)
    g.wire(spawn, collect, 0, 0)
    assert g.tail is collect
    out = g.compile().execute()
    assert [e.data["ys"] for e in out] == [[11, 12, 13]]


def test_wire_function_starts_a_graph():
    a, b = FromList([{"v": 1}]), SetField("w", 2)
    out = wire(a, b).compile().execute()
    assert out[0].data == {"v": 1, "w": 2}


def test_duplicate_idx_names_both_origins():
    with pytest.raises(DuplicateIdxError) as err:
        FromList([{"idx": "same", "v": 1}, {"idx": "same", "v": 2}]).compile().execute()
    assert "item 0" in str(err.value) and "item 1" in str(err.value)


def test_identical_rows_stay_distinct():
    out = FromList([{"v": 1}, {"v": 1}, {"v": 1}]).compile().execute()
    assert len(out) == 3 and len({e.idx for e in out}) == 3


def test_plan_with_input_port_takes_inputs():
    plan = (SetField("b", 2) | TakeFirstN(1)).compile()
    out = plan.execute(inputs=[{"a": 1}, {"a": 2}])
    assert [e.data for e in out] == [{"a": 1, "b": 2}]


def test_pump_advances_one_op_at_a_time():
    plan = (FromList([{"a": 1}]) | SetField("b", 2)).compile()
    assert plan.pump() == "FromList"
    assert plan.pump() == "SetField"
    assert plan.pump() is None
    assert plan.pumped[0].data == {"a": 1, "b": 2}


def test_entry_idx_is_read_only():
    out = FromList([{"a": 1}]).compile().execute()
    with pytest.raises(AttributeError):
        out[0].idx = "other"  # type: ignore[misc]
