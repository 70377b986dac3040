from __future__ import annotations

import copy
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion

from batchfactory_dagster.llm.synthetic import (
    SYNTHETIC_PREFIX,
    estimate_prompt_tokens,
    estimate_tokens,
    synthetic_completion,
    synthetic_tag,
)


def _body(prompt: str, **extra: object) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], **extra}


def _content(response: dict, index: int = 0) -> str:
    return response["choices"][index]["message"]["content"]


def test_same_body_same_answer_regardless_of_key_order() -> None:
    body = _body("Describe a lighthouse at dawn.", temperature=0.3, seed=7)
    reordered = dict(reversed(list(copy.deepcopy(body).items())))
    assert synthetic_completion(body) == synthetic_completion(reordered)


def test_any_change_in_the_body_changes_the_text() -> None:
    base = _body("Describe a lighthouse at dawn.")
    variants = [base, {**base, "seed": 1}, {**base, "seed": 2}, {**base, "temperature": 0.9}]
    contents = {_content(synthetic_completion(b)) for b in variants}
    assert len(contents) == len(variants)


def test_text_is_labelled_and_tagged() -> None:
    body = _body("Describe a lighthouse at dawn.")
    text = _content(synthetic_completion(body))
    assert text.startswith(SYNTHETIC_PREFIX)
    assert f"#{synthetic_tag(body)}" in text
    assert re.fullmatch(r"[0-9a-f]{8}", synthetic_tag(body))


def test_text_reuses_prompt_words() -> None:
    text = _content(synthetic_completion(_body("Tell me about volcanoes, glaciers and fjords.")))
    assert {"volcanoes", "glaciers", "fjords"} & set(re.findall(r"[a-z]+", text.lower()))


def test_line_count_follows_the_prompt() -> None:
    for prompt, lines in [
        ("Write a four-line poem about rain.", 4),
        ("Write a 6 line poem about trains.", 6),
        ("Compose a haiku about frogs.", 3),
        ("A limerick about a cat, please.", 5),
    ]:
        assert len(_content(synthetic_completion(_body(prompt))).splitlines()) == lines, prompt


def test_prose_has_one_to_three_sentences() -> None:
    for seed in range(30):
        text = _content(synthetic_completion(_body("Explain tides.", seed=seed)))
        assert 1 <= len(re.findall(r"\.(?:\s|$)", text)) <= 3
        assert "\n" not in text


def test_requested_sentence_count() -> None:
    text = _content(synthetic_completion(_body("Explain tides in five sentences.")))
    assert len(re.findall(r"\.(?:\s|$)", text)) == 5


def test_response_shape_validates_as_openai_chat_completion() -> None:
    response = synthetic_completion(_body("Hello there", n=2))
    parsed = ChatCompletion.model_validate(response)
    assert parsed.object == "chat.completion"
    assert parsed.model == "gpt-4o-mini"
    assert [c.index for c in parsed.choices] == [0, 1]
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].finish_reason == "stop"
    json.dumps(response)  # plain JSON types only


def test_n_choices_differ_and_usage_adds_up() -> None:
    body = _body("Name a colour.", n=3)
    response = synthetic_completion(body)
    contents = [_content(response, i) for i in range(3)]
    assert len(set(contents)) == 3
    assert all(f"#{synthetic_tag(body, i)}" in c for i, c in enumerate(contents))
    usage = response["usage"]
    assert usage["prompt_tokens"] == estimate_prompt_tokens(body["messages"])
    assert usage["completion_tokens"] == sum(estimate_tokens(c) for c in contents)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_truncates_with_length_finish() -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        response = synthetic_completion(
            _body("Write a twelve-line poem about the sea.", **{key: 8})
        )
        choice = response["choices"][0]
        assert choice["finish_reason"] == "length"
        assert response["usage"]["completion_tokens"] <= 8
        assert choice["message"]["content"].startswith(SYNTHETIC_PREFIX)
    roomy = synthetic_completion(_body("Say hi.", max_tokens=10_000))
    assert roomy["choices"][0]["finish_reason"] == "stop"


def test_stop_sequence_cuts_the_text() -> None:
    full = _content(synthetic_completion(_body("Write a four-line poem about owls.")))
    stopped = _content(synthetic_completion(_body("Write a four-line poem about owls.", stop="\n")))
    assert "\n" in full and "\n" not in stopped


def test_token_estimates() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    messages = [
        {"role": "system", "content": "abcd"},
        {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]},
        {"role": "assistant", "content": None},
    ]
    assert estimate_prompt_tokens(messages) == (1 + 4) + (2 + 4) + (0 + 4)


def test_odd_bodies_do_not_crash() -> None:
    for body in [{}, {"messages": []}, {"messages": [{"role": "system", "content": "Be terse."}]}]:
        response = synthetic_completion(body)
        assert _content(response).startswith(SYNTHETIC_PREFIX)


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.text(max_size=200),
    seed=st.integers(min_value=0, max_value=2**31),
    n=st.integers(min_value=1, max_value=3),
    limit=st.one_of(st.none(), st.integers(min_value=1, max_value=60)),
)
def test_properties(prompt: str, seed: int, n: int, limit: int | None) -> None:
    body = _body(prompt, seed=seed, n=n, max_tokens=limit)
    response = synthetic_completion(body)
    assert response == synthetic_completion(copy.deepcopy(body))
    assert len(response["choices"]) == n
    for choice in response["choices"]:
        text = choice["message"]["content"]
        if limit is None:
            assert text.startswith(SYNTHETIC_PREFIX)
        else:
            assert estimate_tokens(text) <= limit
            assert SYNTHETIC_PREFIX.startswith(text) or text.startswith(SYNTHETIC_PREFIX)
    usage = response["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
