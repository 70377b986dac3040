"""Loops, branches and spawn/collect: batch-synchronous semantics."""

from __future__ import annotations

import warnings

import pytest

from batchfactory_dagster.core.errors import EntryError, IterationLimitError
from batchfactory_dagster.op import (
    Apply,
    CollectAllToList,
    Filter,
    FromList,
    If,
    Repeat,
    SetField,
    Shuffle,
    SpawnFromList,
    TakeFirstN,
    While,
)
from tests.helpers import load_example


def test_example_05_factorial_and_sum_of_squares():
    factorials, sums = load_example("05_math_ops").main()
    by_n = {e.data["n"]: e for e in factorials}
    assert by_n[5].data["prod"] == 120 and by_n[5].rev == 5 and by_n[5].data["rounds"] == 5
    assert by_n[1].data["prod"] == 1 and by_n[1].rev == 1
    assert by_n[5].data["foo"] == "bar" and "foo" not in by_n[1].data
    assert [e.data["total"] for e in sums] == [55, 1]


def test_repeat_body_sees_rounds_one_to_n():
    seen = []
    g = FromList([{"v": 0}]) | Repeat(Apply(lambda d: seen.append(d["rounds"])), 3)
    out = g.compile().execute()
    assert seen == [1, 2, 3] and out[0].rev == 3 and out[0].data["rounds"] == 3


def test_repeat_zero_never_enters_body():
    g = FromList([{"v": 0}]) | Repeat(SetField("touched", True), 0)
    out = g.compile().execute()
    assert "touched" not in out[0].data and out[0].rev == 0


def test_take_first_n_after_repeat_gives_exactly_n():
    g = FromList([{"i": i} for i in range(6)]) | Repeat(SetField("x", 1), 2) | TakeFirstN(3)
    out = g.compile().execute()
    assert len(out) == 3 and [e.data["i"] for e in out] == [0, 1, 2]


def test_shuffle_is_reproducible_across_runs():
    def run():
        g = FromList([{"i": i} for i in range(20)]) | Shuffle(42)
        return [e.data["i"] for e in g.compile().execute()]

    first, second = run(), run()
    assert first == second and first != list(range(20))


def test_compiled_plan_runs_twice_with_same_result():
    plan = (FromList([{"i": i} for i in range(5)]) | Repeat(SetField("x", 1), 2)).compile()
    assert [e.data for e in plan.execute()] == [e.data for e in plan.execute()]


def test_while_runs_until_condition_false():
    g = FromList([{"n": 1}]) | While(lambda d: d["n"] < 50, Apply(lambda d: d.update(n=d["n"] * 2)))
    out = g.compile().execute()
    assert out[0].data["n"] == 64 and out[0].rev == 6


def test_while_out_of_iterations_says_so():
    g = FromList([{"n": 1}]) | While(lambda d: True, SetField("x", 1), max_iterations=4)
    with pytest.warns(UserWarning, match="max_iterations=4"):
        result = g.compile().execute()
    assert result[0].rev == 4 and any("max_iterations=4" in w for w in result.warnings)


def test_while_out_of_iterations_can_raise():
    g = FromList([{"n": 1}]) | While(lambda d: True, SetField("x", 1), 2, on_limit="raise")
    with pytest.raises(IterationLimitError, match="max_iterations=2"):
        g.compile().execute()


def test_if_keeps_input_order_and_else_branch():
    g = FromList([{"v": i} for i in range(6)]) | If(
        lambda d: d["v"] % 2 == 0, SetField("kind", "even"), SetField("kind", "odd"))
    out = g.compile().execute()
    assert [e.data["v"] for e in out] == list(range(6))
    assert [e.data["kind"] for e in out] == ["even", "odd"] * 3


def test_condition_error_names_op_and_entry():
    g = FromList([{"v": 1}]) | If(lambda d: d["missing"] > 1, SetField("x", 1))
    with pytest.raises(EntryError) as err:
        g.compile().execute()
    assert err.value.op == "If" and err.value.entry and "KeyError" in str(err.value)


def test_linear_spawn_gives_children_results_in_item_order():
    g = (FromList([{"words": ["c", "a", "b"]}, {"words": ["z"]}])
         | SpawnFromList("words", "w")
         | Shuffle(7)  # the body may reorder children; the collect restores item order
         | Apply(str.upper, "w", "W")
         | CollectAllToList("W", "upper"))
    out = g.compile().execute()
    assert [e.data["upper"] for e in out] == [["C", "A", "B"], ["Z"]]


def test_empty_list_spawn_collects_empty():
    g = (FromList([{"xs": []}]) | SpawnFromList("xs", "x") | SetField("y", 1)
         | CollectAllToList("y", "ys"))
    assert g.compile().execute()[0].data["ys"] == []


def test_nested_spawns():
    g = (FromList([{"rows": [[1, 2], [3]]}])
         | SpawnFromList("rows", "row")
         | SpawnFromList("row", "x")
         | Apply(lambda x: x * 10, "x", "y")
         | CollectAllToList("y", "ys")
         | Apply(sum, "ys", "row_total")
         | CollectAllToList("row_total", "totals"))
    out = g.compile().execute()
    assert out[0].data["totals"] == [30, 30]


def test_collect_holds_back_parent_with_missing_children():
    g = (FromList([{"xs": [1, 2, 3]}, {"xs": [4]}])
         | SpawnFromList("xs", "x")
         | Filter(lambda d: d["x"] != 2)
         | CollectAllToList("x", "kept"))
    result = g.compile().execute()
    assert [e.data["kept"] for e in result] == [[4]]
    assert len(result.held) == 1 and "1 of 3 children" in result.held[0].reason


def test_spawn_inside_loop_and_loop_inside_spawn():
    inner = (SpawnFromList("xs", "x") | Repeat(Apply(lambda d: d.update(x=d["x"] + 1)), 2)
             | CollectAllToList("x", "xs"))
    g = FromList([{"xs": [0, 10]}]) | Repeat(inner, 2)
    out = g.compile().execute()
    assert out[0].data["xs"] == [4, 14] and out[0].rev == 2


def test_no_warnings_on_clean_runs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (FromList([{"v": 1}]) | Repeat(SetField("x", 1), 2)).compile().execute()
