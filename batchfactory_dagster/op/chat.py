"""Multi-agent chat helpers: named characters take turns in one ``chat_history``."""

from __future__ import annotations

from typing import Any

from ..brokers.base import Broker, BrokerFailureBehavior
from ..core.context import RunContext
from ..core.entry import Entry
from ..core.errors import DefinitionError
from ..core.graph import Segment
from ..core.op import ApplyOp
from ..llm.models import make_request
from .common import get_field
from .llm import CleanupLLMData, ConcurrentLLMCall, ExtractResponseMeta, GenerateLLMRequest

__all__ = [
    "ChatHistoryToText", "Character", "SplitCot", "TransformCharacterDialogueForLLM",
    "UpdateChatHistory", "set_default_broker",
]

_STANDARD_ROLES = ("system", "user", "assistant")
_default: dict[str, Any] = {}


def set_default_broker(broker: Broker | None, model: str | None = None) -> None:
    """The broker (and model) a Character uses when none is given."""
    _default["broker"] = broker
    if model is not None:
        _default["model"] = model


def _name(op: Any, ctx: RunContext, entry: Entry) -> str | None:
    if op.character_name is not None:
        return op.character_name
    if op.character_field is not None:
        return str(get_field(op, ctx, entry, op.character_field))
    return None


class UpdateChatHistory(ApplyOp):
    """Append the answer to ``chat_history`` under the character's name (or its role)."""

    def __init__(self, input_field: str = "llm_response", output_field: str = "chat_history",
                 character_name: str | None = None, character_field: str | None = None) -> None:
        self.input_field, self.output_field = input_field, output_field
        self.character_name, self.character_field = character_name, character_field

    def update(self, entry: Entry, ctx: RunContext) -> None:
        response = get_field(self, ctx, entry, self.input_field)
        if response is None:
            return  # an emitted failure adds no turn
        role = _name(self, ctx, entry) or response.get("role", "assistant")
        history = list(entry.data.get(self.output_field) or [])
        history.append({"role": role, "content": response.get("content", "")})
        entry.data[self.output_field] = history


class TransformCharacterDialogueForLLM(ApplyOp):
    """Rewrite a request's named turns for chat completions: the speaking character's turns
    become ``assistant``, everybody else's ``user`` as "Name: text"; consecutive turns of one
    role merge. The request key is recomputed."""

    def __init__(self, character_name: str | None = None, character_field: str | None = None,
                 prompt_template: str = "{name}: {content}\n",
                 input_field: str = "llm_request") -> None:
        self.character_name, self.character_field = character_name, character_field
        self.prompt_template, self.input_field = prompt_template, input_field

    def update(self, entry: Entry, ctx: RunContext) -> None:
        request = get_field(self, ctx, entry, self.input_field)
        me = _name(self, ctx, entry)
        messages: list[dict[str, str]] = []
        for m in request["messages"]:
            role, content = m["role"], m["content"]
            if role not in _STANDARD_ROLES:
                speaker = role
                role = "assistant" if speaker == me else "user"
                if role == "user":
                    content = self.prompt_template.format(name=speaker, content=content)
            if messages and messages[-1]["role"] == role and role != "system":
                messages[-1]["content"] = messages[-1]["content"].rstrip("\n") + "\n" + content
            else:
                messages.append({"role": role, "content": content})
        entry.data[self.input_field] = make_request(request["model"], messages,
                                                    request.get("params"), request.get("sample", 0))


class ChatHistoryToText(ApplyOp):
    """Render ``chat_history`` as text (a transcript)."""

    def __init__(self, input_field: str = "chat_history", output_field: str = "text",
                 template: str = "**{role}**: {content}\n\n",
                 exclude_roles: list[str] | None = None) -> None:
        self.input_field, self.output_field = input_field, output_field
        self.template, self.exclude = template, set(exclude_roles or ())

    def update(self, entry: Entry, ctx: RunContext) -> None:
        history = get_field(self, ctx, entry, self.input_field)
        entry.data[self.output_field] = "".join(
            self.template.format(role=m["role"], content=m["content"])
            for m in history if m["role"] not in self.exclude)


class SplitCot(ApplyOp):
    """Split reasoning from the answer at ``label``: the part before goes to ``cot_field``."""

    def __init__(self, input_field: str = "llm_response", cot_field: str = "cot",
                 label: str = "</think>", start_label: str = "<think>") -> None:
        self.input_field, self.cot_field = input_field, cot_field
        self.label, self.start_label = label, start_label

    def update(self, entry: Entry, ctx: RunContext) -> None:
        response = get_field(self, ctx, entry, self.input_field)
        if response is None:
            return
        text = response.get("content") or ""
        if self.label not in text:
            entry.data[self.cot_field] = ""
            return
        cot, _, answer = text.partition(self.label)
        entry.data[self.cot_field] = cot.replace(self.start_label, "", 1).strip()
        entry.data[self.input_field] = {**response, "content": answer.strip()}


class Character:
    """A named agent: ``Teacher = Character("teacher_name", PROMPT)``; ``Teacher("command", 0)``
    returns the segment for one turn (prompt, call, append to chat_history, cost, cleanup).

    The persona prompt may use entry fields (``{teacher_name}``). ``identifier`` names the
    turn's journal file when ``cache_dir`` is given.
    """

    def __init__(self, character_field: str, persona_prompt: str, *, model: str | None = None,
                 broker: Broker | None = None, cache_dir: str | None = None,
                 failure_behavior: BrokerFailureBehavior | str = BrokerFailureBehavior.RETRY,
                 **params: Any) -> None:
        self.character_field, self.persona_prompt = character_field, persona_prompt
        self.model, self.broker, self.cache_dir = model, broker, cache_dir
        self.failure_behavior, self.params = failure_behavior, params

    def __call__(self, command: str, identifier: int | str = 0) -> Segment:
        broker = self.broker or _default.get("broker")
        model = self.model or _default.get("model") or "gpt-4o-mini@openai"
        if broker is None:
            raise DefinitionError(
                f"Character({self.character_field!r}) has no broker: pass broker= or call "
                "bf.op.set_default_broker(bf.brokers.ConcurrentLLMCallBroker(path)) first")
        journal = None if self.cache_dir is None else f"{self.cache_dir}/llm_call_{identifier}.jsonl"
        return (GenerateLLMRequest(self.persona_prompt, model, chat_history_field=True,
                                   after_prompt=command, role="user", **self.params)
                | TransformCharacterDialogueForLLM(character_field=self.character_field)
                | ConcurrentLLMCall(journal, broker, failure_behavior=self.failure_behavior)
                | UpdateChatHistory(character_field=self.character_field)
                | ExtractResponseMeta()
                | CleanupLLMData())
