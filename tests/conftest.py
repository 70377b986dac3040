"""Shared fixtures: a clean environment, a loopback fake OpenAI server, small helpers."""

from __future__ import annotations

import os

import pytest

from batchfactory_dagster.testing import FakeOpenAIServer


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's keys or endpoints."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "BATCHFACTORY_", "DAGSTER_")):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def _fake_server():
    server = FakeOpenAIServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_openai(_fake_server, monkeypatch: pytest.MonkeyPatch):
    """The fake server, reset, with OPENAI_BASE_URL/OPENAI_API_KEY pointing at it."""
    _fake_server.reset()
    monkeypatch.setenv("OPENAI_BASE_URL", _fake_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    yield _fake_server
    _fake_server.reset()
