"""Chat helpers: the README's role-playing loop against the fake server, and each helper."""

from __future__ import annotations

import pytest

import batchfactory_dagster as bf
from batchfactory_dagster.core.errors import DefinitionError
from batchfactory_dagster.llm import make_request
from batchfactory_dagster.op import *  # the README's import style
from batchfactory_dagster.op.llm import LLM_TEMP_FIELDS

MODEL = "gpt-4o-mini@openai"
TEACHER_PROMPT = "你是{teacher_name}，一位耐心的语文老师，正在给{student_name}讲解课文：{keyword}"
STUDENT_PROMPT = "你是{student_name}，一位好学的学生，{teacher_name}老师正在讲解课文：{keyword}"


@pytest.fixture
def default_broker(tmp_path):
    broker = bf.brokers.ConcurrentLLMCallBroker(str(tmp_path / "cache" / "llm.jsonl"))
    set_default_broker(broker)
    yield broker
    set_default_broker(None)
    broker.close()


def readme_loop() -> bf.Segment:
    """The seed README's loop snippet, as written."""
    Teacher = Character("teacher_name", TEACHER_PROMPT)
    Student = Character("student_name", STUDENT_PROMPT)

    g = ( ReadMarkdownLines("story.txt", "keyword")  # noqa: E201
          | SetField({"teacher_name":"Alice", "student_name":"Bob"})  # noqa: E231
          | Teacher("老师，请先讲解课文", 0)
          | Repeat( Student("同学提问或回答", 1)  # noqa: E201
                    | Teacher("回应或继续讲解", 2), 3)
          | Teacher("请总结", 3)
          | ChatHistoryToText() | Print() )  # noqa: E202
    return g


def test_readme_role_playing_loop(fake_openai, default_broker, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "story.txt").write_text("# 课文\n\n小马过河\n守株待兔\n")
    result = readme_loop().compile().execute()
    assert len(result) == 2
    assert fake_openai.count() == 2 * 8
    for entry in result:
        history = entry.data["chat_history"]
        assert len(history) == 1 + 2 * 3 + 1
        names = [m["role"] for m in history]
        assert names == ["Alice", "Bob", "Alice", "Bob", "Alice", "Bob", "Alice", "Alice"]
        assert all(m["content"].startswith("[synthetic]") for m in history)
        assert entry.rev == 3 and entry.data["rounds"] == 3
        assert not set(LLM_TEMP_FIELDS) & set(entry.data), "CleanupLLMData ran after each turn"
        assert entry.data["text"].count("**Alice**: ") == 5
        assert entry.data["text"].count("**Bob**: ") == 3
        assert entry.data["api_cost"] > 0
    assert "**Alice**" in capsys.readouterr().out

    # What the provider saw is a valid chat: the speaker's own turns are assistant turns,
    # the other's are user turns as "Name: text", and no two turns in a row share a role.
    by_turn = [r["body"]["messages"] for r in fake_openai.requests]
    for messages in by_turn:
        roles = [m["role"] for m in messages]
        assert set(roles) <= {"user", "assistant"} and roles[0] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:])), roles
    first = result[0].data["chat_history"]
    teacher_2nd = next(m for m in by_turn if len(m) == 3 and "回应或继续讲解" in m[-1]["content"]
                       and first[0]["content"] == m[1]["content"])
    assert teacher_2nd[1] == {"role": "assistant", "content": first[0]["content"]}
    assert teacher_2nd[2]["content"].startswith(f"Bob: {first[1]['content']}")
    assert teacher_2nd[0]["content"].startswith("你是Alice")

    again = readme_loop().compile().execute()
    assert fake_openai.count() == 16, "the second run is served from the ledger"
    assert again.calls.new_calls == 0 and again.calls.cache_hits == 16
    assert [e.data["chat_history"] for e in again] == [e.data["chat_history"] for e in result]


def test_character_without_broker_says_how_to_fix():
    with pytest.raises(DefinitionError, match="set_default_broker"):
        Character("name_field", "You are {name_field}.")("Speak.", 0)


def _request(messages):
    return {"llm_request": make_request(MODEL, messages, {"max_completion_tokens": 100})}


def test_transform_character_dialogue_maps_roles_and_merges_turns():
    original = [
        {"role": "system", "content": "Stay in character."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "You are Alice."},
        {"role": "Bob", "content": "Hi Alice."},
        {"role": "Carol", "content": "Hello!"},
        {"role": "Alice", "content": "Hello both."},
        {"role": "Alice", "content": "How are you?"},
        {"role": "assistant", "content": "(narrator)"},
        {"role": "Bob", "content": "Fine."},
        {"role": "user", "content": "Continue."},
    ]
    data = _request(original)
    g = FromList([data]) | TransformCharacterDialogueForLLM(character_name="Alice")
    (entry,) = g.compile().execute()
    request = entry.data["llm_request"]
    assert request["messages"] == [
        {"role": "system", "content": "Stay in character."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "You are Alice.\nBob: Hi Alice.\nCarol: Hello!\n"},
        {"role": "assistant", "content": "Hello both.\nHow are you?\n(narrator)"},
        {"role": "user", "content": "Bob: Fine.\nContinue."},
    ]
    assert request["key"] != data["llm_request"]["key"]
    assert request["key"] == make_request(MODEL, request["messages"], request["params"])["key"]

    # Seen by Bob (from a field), the same dialogue flips.
    g = (FromList([{**_request(original[2:6]), "me": "Bob"}])
         | TransformCharacterDialogueForLLM(character_field="me", prompt_template="[{name}] {content}"))
    (entry,) = g.compile().execute()
    assert entry.data["llm_request"]["messages"] == [
        {"role": "user", "content": "You are Alice."},
        {"role": "assistant", "content": "Hi Alice."},
        {"role": "user", "content": "[Carol] Hello!\n[Alice] Hello both."},
    ]


def test_update_chat_history_and_chat_history_to_text():
    response = {"role": "assistant", "content": "Good morning."}
    g = (FromList([{"llm_response": response, "speaker": "Dana",
                    "chat_history": [{"role": "system", "content": "Setup."}]}])
         | UpdateChatHistory(character_field="speaker")
         | UpdateChatHistory()  # no name: the response's role
         | UpdateChatHistory(character_name="Eve", output_field="other")
         | ChatHistoryToText()
         | ChatHistoryToText(output_field="plain", template="{role}> {content}\n",
                             exclude_roles=["system"]))
    (entry,) = g.compile().execute()
    assert entry.data["chat_history"] == [
        {"role": "system", "content": "Setup."},
        {"role": "Dana", "content": "Good morning."},
        {"role": "assistant", "content": "Good morning."},
    ]
    assert entry.data["other"] == [{"role": "Eve", "content": "Good morning."}]
    assert entry.data["text"] == ("**system**: Setup.\n\n**Dana**: Good morning.\n\n"
                                  "**assistant**: Good morning.\n\n")
    assert entry.data["plain"] == "Dana> Good morning.\nassistant> Good morning.\n"


def test_split_cot_separates_reasoning_from_the_answer():
    rows = [
        {"llm_response": {"content": "<think>\nCount the legs.\n</think>\n\nFour."}},
        {"llm_response": {"content": "Just the answer."}},
        {"llm_response": None},
    ]
    g = FromList(rows) | SplitCot() | ExtractResponseText()
    with_cot, plain, failed = g.compile().execute()
    assert with_cot.data["cot"] == "Count the legs." and with_cot.data["text"] == "Four."
    assert plain.data["cot"] == "" and plain.data["text"] == "Just the answer."
    assert "cot" not in failed.data and failed.data["text"] is None


def test_split_cot_on_a_live_answer(fake_openai, default_broker):
    g = (FromList([{"q": "How many legs has a cat?"}])
         | GenerateLLMRequest("{q}", model=MODEL, stop=["</never>"])
         | ConcurrentLLMCall(default_broker)
         | SplitCot(label="#", start_label="[synthetic]")
         | ExtractResponseText())
    (entry,) = g.compile().execute()
    # The synthetic answer is "[synthetic] #tag text": split at the first "#".
    assert entry.data["cot"] == "" and not entry.data["text"].startswith("[synthetic]")
    assert fake_openai.count() == 1
