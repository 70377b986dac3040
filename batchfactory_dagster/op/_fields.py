"""Field rules of the built-in ops (see core/fields.py)."""

from __future__ import annotations

from ..core.fields import FieldRule, Fields, check_fields, register_rule
from ..core.op import Op
from . import chat, common, control, llm, outputs, sources, spawn


def _plus(fields: Fields, *added: str | None) -> Fields:
    return None if fields is None else fields | {f for f in added if f}


def _same(op: Op, ins: list[Fields]) -> list[Fields]:
    return [ins[0]] * op.n_out


def _none(op: Op) -> list[tuple[int, list[str]]]:
    return []


def _adds(*names: str) -> FieldRule:
    return FieldRule(_none, lambda op, ins: [_plus(ins[0], *(getattr(op, n) for n in names))])


def _from_list(op: sources.FromList, ins: list[Fields]) -> list[Fields]:
    keys: set[str] = set()
    for item in op.input_list:
        if isinstance(item, dict):
            data = item["data"] if set(item) <= {"idx", "data", "rev"} and "data" in item else item
            if not isinstance(data, dict):
                return [None]
            keys |= set(data) - ({"idx"} if data is item else set())
        elif op.output_field is not None:
            keys.add(op.output_field)
        else:
            return [None]  # Entries carry any data
    return [frozenset(keys)]


def _markdown(op: sources._MarkdownSource, main: list[str | None]) -> list[Fields]:
    extra = [op.directory_list_field, op.directory_str_field, op.filename_field]
    return [frozenset(f for f in [*main, *extra] if f)]


def _apply_after(op: common.Apply, ins: list[Fields]) -> list[Fields]:
    if op.in_fields is None:
        return [None]  # fn(data) may add anything
    return [_plus(ins[0], *(op.out_fields or []))]


def _loop_after(op: control.Loop, ins: list[Fields]) -> list[Fields]:
    assert op.body_plan is not None
    fields = _plus(ins[0], getattr(op, "rounds_field", None))
    for _ in range(4):  # what the body adds can feed the next round
        out = check_fields(op.body_plan, fields)
        if out is None or fields is None:
            return [None]
        if out <= fields:
            return [fields]
        fields = fields | out
    return [fields]


def _if_after(op: control.If, ins: list[Fields]) -> list[Fields]:
    assert op.then_plan is not None
    yes = check_fields(op.then_plan, ins[0])
    no = ins[0] if op.else_plan is None else check_fields(op.else_plan, ins[0])
    return [None if yes is None or no is None else yes | no]


def _spawn_after(op: spawn.SpawnFromList, ins: list[Fields]) -> list[Fields]:
    children = frozenset({op.item_field, op.parent_field, op.index_field, *op.inherit_fields})
    return [ins[0], children]


def _collect_after(op: spawn.CollectAllToList, ins: list[Fields]) -> list[Fields]:
    return [_plus(ins[0], op.list_field)]


def _remove(op: common.RemoveField, ins: list[Fields]) -> list[Fields]:
    return [None if ins[0] is None else ins[0] - set(op.fields)]


def _rename(op: common.RenameField, ins: list[Fields]) -> list[Fields]:
    if ins[0] is None:
        return [None]
    return [frozenset(op.mapping.get(f, f) for f in ins[0])]


def _generate_needs(op: llm.GenerateLLMRequest) -> list[tuple[int, list[str]]]:
    return [(0, [*op.fields, *([op.sample_field] if op.sample_field else [])])]


_PASS = FieldRule(_none, _same)
for cls in (common.Filter, common.FilterFailedEntries, common.FilterMissingField,
            common.Shuffle, common.TakeFirstN, outputs.Print, outputs.PrintEntry,
            outputs.ToList, llm.PrintTotalCost):
    register_rule(cls, _PASS)
register_rule(common.Sort, FieldRule(lambda op: [(0, op.fields)], _same))
register_rule(outputs.WriteJsonl, FieldRule(lambda op: [(0, op.output_fields or [])], _same))
register_rule(outputs.WriteParquet, FieldRule(lambda op: [(0, op.output_fields or [])], _same))
register_rule(sources.FromList, FieldRule(_none, _from_list))
register_rule(sources.ReadMarkdownLines,
              FieldRule(_none, lambda op, ins: _markdown(op, [op.keyword_field])))
register_rule(sources.ReadMarkdownEntries,
              FieldRule(_none, lambda op, ins: _markdown(op, [op.text_field, op.title_field])))
register_rule(common.SetField, FieldRule(_none, lambda op, ins: [_plus(ins[0], *op.values)]))
register_rule(common.RemoveField, FieldRule(_none, _remove))
register_rule(common.RenameField, FieldRule(_none, _rename))
register_rule(common.Apply, FieldRule(lambda op: [(0, op.in_fields or [])], _apply_after))
register_rule(control.Loop, FieldRule(_none, _loop_after))
register_rule(control.If, FieldRule(_none, _if_after))
register_rule(spawn.SpawnFromList, FieldRule(lambda op: [(0, [op.list_field])], _spawn_after))
register_rule(spawn.CollectAllToList,
              FieldRule(lambda op: [(1, [op.item_field])], _collect_after))
register_rule(llm.GenerateLLMRequest, FieldRule(_generate_needs, lambda op, ins: [
    _plus(ins[0], op.output_field)]))
register_rule(llm.ConcurrentLLMCall, FieldRule(lambda op: [(0, [op.input_field])], lambda op, ins: [
    _plus(ins[0], op.output_field, op.status_field, op.job_idx_field, op.error_field)]))
register_rule(llm.ExtractResponseText, FieldRule(lambda op: [(0, [op.input_field])],
                                                 lambda op, ins: [_plus(ins[0], op.output_field)]))
register_rule(llm.ExtractResponseMeta, FieldRule(
    lambda op: [(0, [op.request_field])],
    lambda op, ins: [_plus(ins[0], op.model_field, op.cost_field)]))
register_rule(llm.CleanupLLMData, FieldRule(_none, lambda op, ins: [
    None if ins[0] is None else ins[0] - set(op.fields)]))
register_rule(chat.ChatHistoryToText, FieldRule(lambda op: [(0, [op.input_field])],
                                                lambda op, ins: [_plus(ins[0], op.output_field)]))
register_rule(chat.UpdateChatHistory, _adds("output_field"))
