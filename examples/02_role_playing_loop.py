"""Example 02: a role-playing loop, two LLM characters taking turns with Repeat.

Each line of ``examples/data/story.txt`` (three sentences of "The North Wind and the Sun")
is one lesson. Alice (teacher) and Bob (student) share one ``chat_history`` per lesson:
the teacher explains, then 3 rounds of student question + teacher answer, then the teacher
sums up, so every lesson has 1 + 2*3 + 1 = 8 turns, spoken by Alice, Bob, Alice, Bob,
Alice, Bob, Alice and (the summary) Alice again. Each turn is one LLM call (24 for the 3
lessons); every character sees the others' turns as "Name: text" user messages and its own as
assistant turns.

Prints the transcript of the first lesson and writes
``./data/role_play_v1.0.0/out/dialogues.jsonl`` with ``keyword`` (the lesson), ``text``
(the transcript), ``chat_history`` and ``api_cost`` per lesson. Returns the RunResult.
Run it twice: the second run makes 0 new calls.

    python examples/02_role_playing_loop.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # for _common, also when loaded by file path

from _common import DATA, MODEL, run  # noqa: E402

import batchfactory_dagster as bf  # noqa: E402
from batchfactory_dagster.op import *  # noqa: E402

TEACHER_PROMPT = (
    "You are {teacher_name}, a patient literature teacher. Today's lesson is this sentence "
    'from a fable: "{keyword}". Teach it to your student {student_name} in two or three '
    "sentences per turn, and answer their questions kindly."
)
STUDENT_PROMPT = (
    "You are {student_name}, a curious student. Your teacher {teacher_name} is explaining "
    'this sentence from a fable: "{keyword}". Reply in one or two sentences: ask a question '
    "or say what you understood."
)


def pipeline(project: bf.CacheFolder, broker: bf.brokers.ConcurrentLLMCallBroker) -> bf.Segment:
    cache = str(project.path("cache/turns"))
    Teacher = Character("teacher_name", TEACHER_PROMPT, model=MODEL, broker=broker,
                        cache_dir=cache)
    Student = Character("student_name", STUDENT_PROMPT, model=MODEL, broker=broker,
                        cache_dir=cache)
    return (
        ReadMarkdownLines(DATA / "story.txt", "keyword")
        | SetField({"teacher_name": "Alice", "student_name": "Bob"})
        | Teacher("Teacher, please begin by explaining the lesson.", 0)
        | Repeat(Student("Ask a question or answer the teacher.", 1)
                 | Teacher("Respond, or continue the explanation.", 2), 3)
        | Teacher("Please sum up the lesson.", 3)
        | ChatHistoryToText()
        | Print(first_n=1)
        | WriteJsonl(project["out/dialogues.jsonl"],
                     output_fields=["keyword", "text", "chat_history", "api_cost"])
    )


def main() -> bf.RunResult:
    result = run("role_play", pipeline)
    print(result.summary())
    return result


if __name__ == "__main__":
    main()
