"""Spawn/collect identity under generated pipelines: idx stays unique at every op and every child
returns to its own parent, at its own position, through nested spawns, Repeat, While and If
(with filters and shuffles inside). A reference interpreter in plain Python says what every
entry must look like; the local executor must agree exactly (idx, order, rev, data), and so
must the Dagster runner on a few generated pipelines.

Every item carries a tag ``t`` naming its path (``p3.1.0``) that no op changes, so a child
collected into the wrong parent or at the wrong position shows up as a wrong tag.
"""

from __future__ import annotations

import copy
import warnings
from itertools import count
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from batchfactory_dagster.op import (
    Apply,
    CollectAllToList,
    Filter,
    FromList,
    If,
    Repeat,
    Shuffle,
    SpawnFromList,
    While,
)

# ----------------------------------------------------------------------------- the trees
# A chain is a list of nodes; a node is one of
#   ("add", k) ("mul", k) ("filter", m) ("shuffle", seed)
#   ("spawn", chain, allow_missing) ("repeat", chain, n) ("while", limit, chain, k)
#   ("if", m, then_chain, else_chain | None)

LEAVES = st.one_of(
    st.tuples(st.just("add"), st.integers(-3, 5)),
    st.tuples(st.just("mul"), st.integers(-2, 3)),
    st.tuples(st.just("filter"), st.integers(2, 5)),
    st.tuples(st.just("shuffle"), st.integers(0, 99)),
)


def _composites(chains):
    return st.one_of(
        st.tuples(st.just("spawn"), chains, st.booleans()),
        st.tuples(st.just("repeat"), chains, st.integers(0, 3)),
        st.tuples(st.just("while"), st.integers(-5, 30), chains, st.integers(0, 3)),
        st.tuples(st.just("if"), st.integers(2, 4), chains, st.none() | chains),
    )


def chains(max_leaves: int) -> st.SearchStrategy[list]:
    """Top-level chains: no Shuffle at the top (it reorders the output on purpose); inside
    spawns, loops and branches it may reorder freely, the order must come back."""
    node = st.recursive(LEAVES, lambda inner: _composites(st.lists(inner, min_size=1,
                                                                    max_size=3)),
                        max_leaves=max_leaves)
    return st.lists(node.filter(lambda n: n[0] != "shuffle"), min_size=1, max_size=4)


def items(depth: int, prefix: str, draw) -> list[dict]:
    n = draw(st.integers(0, 3))
    return [{"v": draw(st.integers(-10, 10)), "t": f"{prefix}.{j}",
             "xs": items(depth - 1, f"{prefix}.{j}", draw) if depth > 1 else []}
            for j in range(n)]


@st.composite
def rows(draw, depth: int = 3) -> list[dict]:
    n = draw(st.integers(1, 5))
    return [{"v": draw(st.integers(-10, 10)), "t": f"p{i}", "xs": items(depth, f"p{i}", draw)}
            for i in range(n)]


# ----------------------------------------------------------------------------- pipeline
def _cond(m: int):
    return lambda d: d["v"] % m == 0


def _below(limit: int):
    return lambda d: d["v"] < limit


def annotate(chain: list, names: count) -> list:
    """Give every Repeat its own rounds field (nested Repeats must not share one)."""
    out = []
    for node in chain:
        kind = node[0]
        if kind == "repeat":
            node = ("repeat", f"r{next(names)}", annotate(node[1], names), node[2])
        elif kind == "spawn":
            node = ("spawn", annotate(node[1], names), node[2])
        elif kind == "while":
            node = ("while", node[1], annotate(node[2], names), node[3])
        elif kind == "if":
            node = ("if", node[1], annotate(node[2], names),
                    None if node[3] is None else annotate(node[3], names))
        out.append(node)
    return out


def build(chain: list):
    """The pipeline segment for an annotated chain (fresh ops every time)."""
    seg = None
    for node in chain:
        part = build_node(node)
        seg = part if seg is None else seg | part
    return seg


def _unpack(d: dict) -> None:
    d.update(d.pop("item"))


def _pack(d: dict) -> None:
    d["item"] = {"v": d["v"], "t": d["t"], "xs": d["xs"]}


def build_node(node: tuple):
    kind = node[0]
    if kind == "add":
        k = node[1]
        return Apply(lambda v: v + k, "v", "v")
    if kind == "mul":
        k = node[1]
        return Apply(lambda v: v * k, "v", "v")
    if kind == "filter":
        m = node[1]
        return Filter(lambda d: d["v"] % m != 0)
    if kind == "shuffle":
        return Shuffle(node[1])
    if kind == "spawn":
        _, body, allow_missing = node
        return (SpawnFromList("xs", "item") | Apply(_unpack) | build(body)
                | Apply(_pack) | CollectAllToList("item", "xs", allow_missing=allow_missing))
    if kind == "repeat":
        _, field, body, n = node
        return Repeat(build(body), n, rounds_field=field)
    if kind == "while":
        _, limit, body, k = node
        return While(_below(limit), build(body), max_iterations=k)
    if kind == "if":
        _, m, then, else_ = node
        return If(_cond(m), build(then), None if else_ is None else build(else_))
    raise AssertionError(kind)


def pipeline(chain: list, data: list[dict]):
    return FromList(copy.deepcopy(data)) | build(chain)


# ----------------------------------------------------------------------------- reference
class Ref:
    """One entry as the reference interpreter sees it."""

    def __init__(self, idx: str, rev: int, data: dict[str, Any]) -> None:
        self.idx, self.rev, self.data = idx, rev, data


def ref_chain(chain: list, e: Ref) -> Ref | None:
    for node in chain:
        e = ref_node(node, e)
        if e is None:
            return None
    return e


def ref_node(node: tuple, e: Ref) -> Ref | None:
    kind, d = node[0], e.data
    if kind == "add":
        d["v"] += node[1]
    elif kind == "mul":
        d["v"] *= node[1]
    elif kind == "filter":
        return None if d["v"] % node[1] == 0 else e
    elif kind == "spawn":
        _, body, allow_missing = node
        kids = []
        for j, item in enumerate(d["xs"]):
            child = Ref(f"{e.idx}-{j}", e.rev, {"parent_idx": e.idx, "list_idx": j,
                                                **copy.deepcopy(item)})
            kid = ref_chain(body, child)
            if kid is not None:
                kids.append({"v": kid.data["v"], "t": kid.data["t"], "xs": kid.data["xs"]})
        if len(kids) < len(d["xs"]) and not allow_missing:
            return None  # held back: a child did not come back
        d["xs"] = kids
    elif kind == "repeat":
        _, field, body, n = node
        d[field] = 0
        for _ in range(n):
            e.data[field] += 1
            e = ref_chain(body, e)
            if e is None:
                return None
            e.rev += 1
    elif kind == "while":
        _, limit, body, k = node
        for _ in range(k):
            if not e.data["v"] < limit:
                break
            e = ref_chain(body, e)
            if e is None:
                return None
            e.rev += 1
    elif kind == "if":
        _, m, then, else_ = node
        if d["v"] % m == 0:
            return ref_chain(then, e)
        if else_ is not None:
            return ref_chain(else_, e)
    return e


def expected(chain: list, data: list[dict], idxs: list[str]) -> list[tuple]:
    out = []
    for idx, row in zip(idxs, data):
        e = ref_chain(chain, Ref(idx, 0, copy.deepcopy(row)))
        if e is not None:
            out.append((e.idx, e.rev, e.data))
    return out


def run_local(chain: list, data: list[dict]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # While out of iterations warns, as it should
        return pipeline(chain, data).compile().execute()


def tags(xs: list[dict]) -> list:
    return [(x["t"], tags(x["xs"])) for x in xs]


# ----------------------------------------------------------------------------- the properties
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=chains(max_leaves=8), data=rows())
def test_children_return_to_their_parents_locally(chain, data):
    chain = annotate(chain, count())
    idxs = [e.idx for e in FromList(copy.deepcopy(data)).compile().execute()]
    result = run_local(chain, data)
    got = [(e.idx, e.rev, e.data) for e in result]
    want = expected(chain, data, idxs)
    assert len({e.idx for e in result}) == len(result)  # unique idx out
    assert [g[0] for g in got] == [w[0] for w in want]  # the same entries, in input order
    for g, w in zip(got, want):
        assert tags(g[2]["xs"]) == tags(w[2]["xs"])  # every child in its place
        assert g == w


def test_the_reference_interpreter_is_not_vacuous():
    """One hand-written case with nested spawns, loops and a branch, checked by hand."""
    chain = annotate([("spawn", [("add", 1), ("spawn", [("mul", 2)], False)], False),
                      ("repeat", [("add", 10)], 2), ("if", 3, [("add", 100)], None)], count())
    data = [{"v": 1, "t": "p0", "xs": [{"v": 5, "t": "p0.0", "xs": [{"v": 7, "t": "p0.0.0",
                                                                      "xs": []}]}]}]
    (entry,) = run_local(chain, data)
    assert entry.rev == 2 and entry.data["v"] == 121 and entry.data["r0"] == 2
    assert entry.data["xs"] == [{"v": 6, "t": "p0.0", "xs": [{"v": 14, "t": "p0.0.0",
                                                               "xs": []}]}]
    idxs = [e.idx for e in FromList(copy.deepcopy(data)).compile().execute()]
    assert expected(chain, data, idxs) == [(entry.idx, entry.rev, entry.data)]


@pytest.mark.dagster
@settings(max_examples=4, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(chain=chains(max_leaves=4).filter(
    lambda c: any(n[0] == "spawn" for n in c)), data=rows(depth=2))
def test_dagster_runner_gives_the_same_entries(chain, data):
    from batchfactory_dagster.dagster import build_job

    chain = annotate(chain, count())
    local = run_local(chain, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = build_job(pipeline(chain, data), "identity", chunk_size=2).execute_in_process()
    assert result.success
    dag = result.output_value().entries
    assert [(e.idx, e.rev, e.data) for e in dag] == [(e.idx, e.rev, e.data) for e in local]
