"""Field checks at compile time: a prompt that names a field no earlier op can make fails
before anything is spent.

Each op's rule maps the fields that MAY be present on its inputs (an upper bound, or None for
unknown) to those on its outputs, and names the fields it needs. A needed field outside a known
upper bound is certainly missing: that is a DefinitionError. Anything unknown (``Apply(fn)``,
custom ops without a rule) stops the check downstream, so it never raises falsely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DefinitionError

if TYPE_CHECKING:
    from .op import Op
    from .plan import Plan

__all__ = ["FieldRule", "check_fields", "register_rule"]

Fields = frozenset[str] | None


@dataclass(frozen=True)
class FieldRule:
    # fields each in-port needs; the port a requirement belongs to
    needs: Callable[[Op], list[tuple[int, list[str]]]]
    # upper bound of fields on each out-port, from those on each in-port
    after: Callable[[Op, list[Fields]], list[Fields]]


_RULES: dict[type, FieldRule] = {}


def register_rule(cls: type, rule: FieldRule) -> None:
    _RULES[cls] = rule


def _rule(op: Op) -> FieldRule | None:
    for cls in type(op).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def check_fields(plan: Plan, given: Fields = None) -> Fields:
    """Check every op of ``plan`` (and its sub-plans); return the output's field bound."""
    known: dict[tuple[int, int], Fields] = {}
    for i, node in enumerate(plan.nodes):
        ins = [given if src is None else known.get(src) for src in node.inputs]
        rule = _rule(node.op)
        if rule is None:
            outs: list[Fields] = [None] * node.op.n_out
        else:
            for port, needed in rule.needs(node.op):
                _require(node.name, needed, ins[port] if port < len(ins) else None)
            outs = rule.after(node.op, ins)
        for port, fields in enumerate(outs):
            known[(i, port)] = fields
    return known.get(plan.output)


def _require(op_name: str, needed: list[str], have: Fields) -> None:
    if have is None:
        return
    missing = [f for f in needed if f not in have]
    if missing:
        raise DefinitionError(
            f"needs field {missing[0]!r}, which no earlier op makes (entries here can have: "
            f"{', '.join(sorted(have)) or 'no fields'}); fix the name or set it upstream",
            op=op_name)
