"""Example 05: loops and branches under pure Python (no LLM, no key, no network).

Part 1: n! with Repeat, then an If that marks the big ones.
Part 2: the sum of squares with SpawnFromList / CollectAllToList in the README's linear form.
"""

from __future__ import annotations

import operator

import batchfactory_dagster as bf
from batchfactory_dagster.op import *


def factorial_pipeline() -> bf.Segment:
    return (
        FromList([{"n": 5}, {"n": 1}])
        | SetField("prod", 1)
        | Repeat(Apply(operator.mul, ["prod", "rounds"], ["prod"]), max_rounds_field="n")
        | If(lambda data: data["prod"] > 100, SetField("foo", "bar"))
    )


def sum_of_squares_pipeline() -> bf.Segment:
    return (
        FromList([{"numbers": [1, 2, 3, 4, 5]}, {"numbers": [1]}])
        | SpawnFromList("numbers", "x")
        | Apply(lambda x: x * x, "x", "square")
        | CollectAllToList("square", "squares")
        | Apply(sum, "squares", "total")
    )


def main() -> tuple[bf.RunResult, bf.RunResult]:
    factorials = factorial_pipeline().compile().execute()
    for e in factorials:
        print(f"{e.data['n']}! = {e.data['prod']} (rev {e.rev}, foo={e.data.get('foo')})")
    sums = sum_of_squares_pipeline().compile().execute()
    for e in sums:
        print(f"sum of squares of {e.data['numbers']} = {e.data['total']}")
    return factorials, sums


if __name__ == "__main__":
    main()
