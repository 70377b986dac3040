"""Examples 01-05 run offline from a scratch directory, do what their docstrings promise, are
deterministic, and make no new calls on their second run. 01-04 also run against the fake
OpenAI server through the real client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_example

EXAMPLES = ["01_basic_pipeline", "02_role_playing_loop", "03_split_and_summarize",
            "04_long_text_segmentation"]
CALLS = {"01_basic_pipeline": 3, "02_role_playing_loop": 24, "03_split_and_summarize": 16,
         "04_long_text_segmentation": 16}
OUTPUTS = {"01_basic_pipeline": "quickstart_v1.0.0/out/poems.jsonl",
           "02_role_playing_loop": "role_play_v1.0.0/out/dialogues.jsonl",
           "03_split_and_summarize": "split_summarize_v1.0.0/out/reviews.jsonl",
           "04_long_text_segmentation": "spawn_demo_v1.0.0/out/synopses.jsonl"}
FABLES = ["The Fox and the Grapes", "The Lion and the Mouse", "The Shepherd's Boy",
          "The Hare and the Tortoise"]


@pytest.fixture
def offline(monkeypatch):
    """No key: the examples must switch themselves offline (restored after the test)."""
    monkeypatch.setenv("BATCHFACTORY_OFFLINE", "")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def run_example(name: str, workdir: Path, monkeypatch):
    workdir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(workdir)
    if name == "03_split_and_summarize":
        with pytest.warns(DeprecationWarning, match="deprecated"):
            return load_example(name).main()
    return load_example(name).main()


def rows(workdir: Path, name: str) -> list[dict]:
    path = workdir / "data" / OUTPUTS[name]
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_promises(name: str, result, out: list[dict]) -> None:
    """What each docstring says the example produces."""
    assert len(result) == len(out) and [r["idx"] for r in out] == [e.idx for e in result]
    texts: list[str] = []
    if name == "01_basic_pipeline":
        assert len(out) == 3
        for row in out:
            assert set(row) == {"idx", "rev", "keyword", "text", "directory"}
            assert row["directory"] == "Greek Myths" and len(row["text"].splitlines()) == 4
            texts.append(row["text"])
    elif name == "02_role_playing_loop":
        assert len(out) == 3
        for row in out:
            names = [m["role"] for m in row["chat_history"]]
            assert names == ["Alice", "Bob", "Alice", "Bob", "Alice", "Bob", "Alice", "Alice"]
            assert row["text"].count("**Bob**: ") == 3 and row["api_cost"] is not None
            texts += [m["content"] for m in row["chat_history"]]
    elif name == "03_split_and_summarize":
        assert [r["title"] for r in out] == FABLES
        for row in out:
            texts += [row[f] for f in ("plot", "characters", "moral", "review")]
    else:
        assert [r["title"] for r in out] == FABLES
        assert [len(r["paragraphs"]) for r in out] == [2, 2, 2, 6]
        assert out[0]["paragraphs"][1] == "It is easy to despise what you cannot get."
        for row in out:
            assert len(row["para_summaries"]) == len(row["paragraphs"])
            texts += row["para_summaries"] + [row["synopsis"]]
    assert texts and all(t.startswith("[synthetic]") for t in texts)
    assert len(set(texts)) == len(texts), "every answer is its own"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_offline_deterministically(name, offline, tmp_path, monkeypatch, capsys):
    first = run_example(name, tmp_path / "a", monkeypatch)
    assert "answers are synthetic" in capsys.readouterr().err  # one line, on stderr
    assert os.environ["BATCHFACTORY_OFFLINE"] == "1"
    assert not first.held and not first.warnings
    assert first.calls.new_calls == CALLS[name] and first.calls.cost_usd == 0.0
    out = rows(tmp_path / "a", name)
    check_promises(name, first, out)

    second = run_example(name, tmp_path / "a", monkeypatch)
    assert second.calls.new_calls == 0 and second.calls.cache_hits == CALLS[name]
    assert rows(tmp_path / "a", name) == out

    elsewhere = run_example(name, tmp_path / "b", monkeypatch)  # a fresh cache
    assert elsewhere.calls.new_calls == CALLS[name]
    assert rows(tmp_path / "b", name) == out


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_against_the_fake_server(name, fake_openai, tmp_path, monkeypatch):
    first = run_example(name, tmp_path, monkeypatch)
    assert "BATCHFACTORY_OFFLINE" not in os.environ
    assert fake_openai.count() == CALLS[name] == first.calls.new_calls
    assert first.calls.cost_usd > 0 and not first.held
    out = rows(tmp_path, name)
    check_promises(name, first, out)
    second = run_example(name, tmp_path, monkeypatch)
    assert fake_openai.count() == CALLS[name], "the second run sends 0 requests"
    assert second.calls.new_calls == 0 and rows(tmp_path, name) == out


def test_example_05_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    factorials, sums = load_example("05_math_ops").main()
    assert {e.data["n"]: e.data["prod"] for e in factorials} == {5: 120, 1: 1}
    assert [e.data["total"] for e in sums] == [55, 1]


def test_examples_run_as_scripts(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "BATCHFACTORY_"))}
    procs = {}
    for name in EXAMPLES + ["05_math_ops"]:
        workdir = tmp_path / name
        workdir.mkdir()
        procs[name] = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / f"{name}.py")], cwd=workdir, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        if name in OUTPUTS:
            assert "answers are synthetic" in err and "new calls" in out
            assert (tmp_path / name / "data" / OUTPUTS[name]).exists()
        if name == "03_split_and_summarize":
            assert "DeprecationWarning" in err  # visible when run as a script
