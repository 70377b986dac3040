from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from batchfactory_dagster.llm.synthetic import synthetic_completion
from batchfactory_dagster.testing import FakeOpenAIServer, FakeServerProcess, serve_fake_openai
from batchfactory_dagster.testing.fake_openai import parse_fault

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Write a four-line poem about herons."}]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with serve_fake_openai(slow_seconds=0.5, batch_polls_to_complete=1) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean(server: FakeOpenAIServer) -> None:
    server.reset()


@pytest.fixture
def client(server: FakeOpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as c:
        yield c


def _chat(client: openai.OpenAI, model: str = "gpt-4o-mini", **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=MESSAGES, **kw)


def _http(method: str, url: str, payload: Any = None, headers: dict | None = None) -> tuple:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _NO_PROXY.open(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# --------------------------------------------------------------------------- completions


def test_completion_is_deterministic_with_usage(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    first, again = _chat(client, seed=1), _chat(client, seed=1)
    other = _chat(client, seed=2)
    text = first.choices[0].message.content
    assert text == again.choices[0].message.content
    assert text != other.choices[0].message.content
    assert text.startswith("[synthetic]") and len(text.splitlines()) == 4
    assert first.usage is not None and first.usage.total_tokens > first.usage.prompt_tokens > 0
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "seed": 1}
    assert first.model_dump(exclude_unset=True)["choices"] == synthetic_completion(body)["choices"]
    assert server.count() == 3


def test_async_client_requests_overlap(server: FakeOpenAIServer) -> None:
    server.configure(latency=0.1)

    async def run() -> list:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="sk-test", max_retries=0
        ) as client:
            calls = (
                client.chat.completions.create(model="m", messages=MESSAGES, seed=i)
                for i in range(20)
            )
            return await asyncio.gather(*calls)

    start = time.perf_counter()
    results = asyncio.run(run())
    assert time.perf_counter() - start < 1.5  # 20 x 0.1 s sequentially would be 2 s
    assert len({r.choices[0].message.content for r in results}) == 20
    assert server.count(status=200) == 20


def test_models_list(client: openai.OpenAI) -> None:
    assert "gpt-4o-mini" in {m.id for m in client.models.list()}


def test_missing_or_wrong_auth_is_401(server: FakeOpenAIServer) -> None:
    status, body = _http("POST", server.base_url + "/chat/completions", {"model": "m"})
    assert status == 401
    assert set(body["error"]) >= {"message", "type", "code"}
    client = openai.OpenAI(
        base_url=server.base_url,
        api_key="sk-test",
        max_retries=0,
        default_headers={"Authorization": "Basic abc"},
    )
    with pytest.raises(openai.AuthenticationError):
        _chat(client)
    assert server.count(status=401) == 2


def test_unknown_route_is_openai_shaped_404(server: FakeOpenAIServer) -> None:
    headers = {"Authorization": "Bearer sk-test"}
    status, body = _http("GET", server.base_url + "/nope", headers=headers)
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- faults


def test_scripted_429_carries_retry_after(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_script("flaky", [429, ("429", 0.2), {"status": 429, "retry_after": 2.5}, 200])
    seen = []
    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as info:
            _chat(client, "flaky")
        headers = info.value.response.headers
        seen.append((headers["retry-after"], headers["retry-after-ms"]))
        assert info.value.body["code"] == "rate_limit_exceeded"
    assert seen == [("1", "1000"), ("1", "200"), ("3", "2500")]
    assert _chat(client, "flaky").choices[0].finish_reason == "stop"
    assert _chat(client, "flaky").choices  # script used up: normal answers
    assert server.count(model="flaky", status=429) == 3


def test_scripted_server_errors(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_script("broken", [500, 502, 503])
    codes = []
    for _ in range(3):
        with pytest.raises(openai.InternalServerError) as info:
            _chat(client, "broken")
        codes.append(info.value.status_code)
        assert info.value.body["type"] == "server_error"
    assert codes == [500, 502, 503]


def test_reset_drops_the_connection(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_script("resetty", ["reset"])
    with pytest.raises(openai.APIConnectionError):
        _chat(client, "resetty")
    [entry] = server.requests
    assert entry["answered"] is False and entry["status"] is None
    assert _chat(client, "resetty").choices


def test_slow_times_out_the_client(server: FakeOpenAIServer) -> None:
    server.set_script("sloth", ["slow", ("slow", 0.05)])
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=0.1)
    with pytest.raises(openai.APITimeoutError):
        _chat(client, "sloth")
    start = time.perf_counter()
    assert _chat(client, "sloth").choices  # a short slow item still answers
    assert time.perf_counter() - start >= 0.05


def test_bad_json_fails_to_decode(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_script("garbled", ["bad_json"])
    with pytest.raises((json.JSONDecodeError, openai.APIResponseValidationError)):
        _chat(client, "garbled")
    assert server.count(model="garbled", status=200) == 1


def test_length_and_empty_choices(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_script("odd", ["length", "empty_choices"])
    cut = _chat(client, "odd")
    assert cut.choices[0].finish_reason == "length"
    full = synthetic_completion({"model": "odd", "messages": MESSAGES})
    assert len(cut.choices[0].message.content) < len(full["choices"][0]["message"]["content"])
    assert _chat(client, "odd").choices == []


def test_forever_and_runtime_scripts(client: openai.OpenAI) -> None:
    with serve_fake_openai(script={"down": {"forever": 500}, "once": [503]}) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="sk", max_retries=0)
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                _chat(c, "down")
        with pytest.raises(openai.InternalServerError):
            _chat(c, "once")
        assert _chat(c, "once").choices
        srv.set_script("down", None)
        assert _chat(c, "down").choices
        srv.set_script("later", {"items": [200], "forever": 429})
        assert _chat(c, "later").choices
        with pytest.raises(openai.RateLimitError):
            _chat(c, "later")
        srv.reset()  # restores the constructor's scripts
        with pytest.raises(openai.InternalServerError):
            _chat(c, "down")


def test_invalid_script_items_are_rejected() -> None:
    for bad in ["explode", True, ("reset", 1), 3.5]:
        with pytest.raises(ValueError):
            parse_fault(bad)
    assert parse_fault({"fault": "slow", "seconds": 2}).seconds == 2.0


def test_rpm_limit(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.configure(rpm_limit=3)
    for _ in range(3):
        _chat(client)
    with pytest.raises(openai.RateLimitError) as info:
        _chat(client)
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
    assert server.count(status=200) == 3 and server.count(status=429) == 1


# --------------------------------------------------------------------------- request log


def test_request_log_records_everything(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    _chat(client, seed=5)
    client.models.list()
    chat, models = server.requests
    assert chat["path"] == CHAT and chat["method"] == "POST" and chat["model"] == "gpt-4o-mini"
    assert chat["body"]["seed"] == 5 and chat["status"] == 200 and chat["answered"] is True
    assert chat["time"] <= chat["answered_at"]
    assert models["path"] == "/v1/models" and models["method"] == "GET"
    assert server.count() == 1 and server.count(path=None) == 2
    assert server.summary()["by_path"] == {CHAT: 1, "/v1/models": 1}
    server.reset()
    assert server.requests == [] and server.count(path=None) == 0


def test_admin_endpoints(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    admin = server.url + "/_admin"
    assert _http("POST", admin + "/script", {"model": "adm", "items": [500]})[0] == 200
    with pytest.raises(openai.InternalServerError):
        _chat(client, "adm")
    _chat(client, "adm")
    status, rows = _http("GET", admin + "/requests")
    assert status == 200 and [r["status"] for r in rows] == [500, 200]
    _, summary = _http("GET", admin + "/requests?summary=1")
    assert summary["total"] == 2 and summary["by_status"] == {"500": 1, "200": 1}
    assert _http("GET", admin + "/count?status=500")[1] == {"count": 1}
    assert _http("POST", admin + "/script", {"model": "adm", "forever": 503})[0] == 200
    with pytest.raises(openai.InternalServerError):
        _chat(client, "adm")
    assert _http("POST", admin + "/config", {"bogus": 1})[0] == 400
    assert _http("POST", admin + "/reset", {})[0] == 200
    assert server.count(path=None) == 0


# --------------------------------------------------------------------------- batch API


def _upload(client: openai.OpenAI, n: int, model: str = "gpt-4o-mini") -> str:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": f"Fact {i}?"}]},
        }
        for i in range(n)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    return client.files.create(file=("input.jsonl", data), purpose="batch").id


def _run_batch(client: openai.OpenAI, file_id: str) -> tuple[Any, list[str]]:
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    statuses = [batch.status]
    for _ in range(20):
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        batch = client.batches.retrieve(batch.id)
        statuses.append(batch.status)
    return batch, statuses


def _jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_batch_end_to_end(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.configure(batch_polls_to_complete=3)
    file_id = _upload(client, 4)
    assert client.files.retrieve(file_id).purpose == "batch"
    batch, statuses = _run_batch(client, file_id)
    assert statuses == [
        "validating",
        "validating",
        "in_progress",
        "in_progress",
        "finalizing",
        "completed",
    ]
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
    assert batch.error_file_id is None
    out = _jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(4)]
    first = out[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Fact 0?"}]}
    assert first["response"]["body"] == synthetic_completion(body)
    assert server.count(path="/v1/batches") == 1 and server.count(path="/v1/files") == 1
    assert [b.id for b in client.batches.list()] == [batch.id]


def test_batch_expired_with_partial_output(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.configure(batch_expire_after=0.5)
    batch, statuses = _run_batch(client, _upload(client, 6))
    assert statuses[-1] == "expired" and "finalizing" not in statuses
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 3, "failed": 3}
    assert [o["custom_id"] for o in _jsonl(client, batch.output_file_id)] == [
        "req-0",
        "req-1",
        "req-2",
    ]
    errors = _jsonl(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["req-3", "req-4", "req-5"]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)


def test_batch_failed_lines(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.configure(batch_fail_custom_ids={"req-1"}, batch_expire_after=4)
    batch, _ = _run_batch(client, _upload(client, 5))
    assert batch.status == "expired"
    codes = {e["custom_id"]: e["error"]["code"] for e in _jsonl(client, batch.error_file_id)}
    assert codes == {"req-1": "server_error", "req-4": "batch_expired"}
    assert len(_jsonl(client, batch.output_file_id)) == 3

    server.configure(
        batch_fail_custom_ids=lambda cid: cid.endswith("0"),
        batch_fail_status=500,
        batch_expire_after=None,
    )
    batch, _ = _run_batch(client, _upload(client, 3))
    assert batch.status == "completed" and batch.request_counts.failed == 1
    [error] = _jsonl(client, batch.error_file_id)
    assert error["custom_id"] == "req-0" and error["error"] is None
    assert error["response"]["status_code"] == 500 and "error" in error["response"]["body"]


def test_batch_cancel_and_invalid_input(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.configure(batch_polls_to_complete=4)
    batch = client.batches.create(
        input_file_id=_upload(client, 2), endpoint=CHAT, completion_window="24h"
    )
    assert client.batches.cancel(batch.id).status == "cancelling"
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled"
    assert {e["error"]["code"] for e in _jsonl(client, cancelled.error_file_id)} == {
        "batch_cancelled"
    }
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)

    bad = client.files.create(
        file=("bad.jsonl", b'{"custom_id": "a", "body": {}}\nnot json\n'), purpose="batch"
    )
    failed, _ = _run_batch(client, bad.id)
    assert failed.status == "failed" and failed.errors is not None
    assert [(e.code, e.line) for e in failed.errors.data] == [("invalid_json_line", 2)]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")


# --------------------------------------------------------------------------- other process


def test_server_in_another_process() -> None:
    with FakeServerProcess(latency=0.001, script={"flaky": [500]}) as proc:
        assert proc.base_url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=proc.base_url, api_key="sk-test", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            _chat(client, "flaky")
        assert _chat(client, "flaky").choices
        assert proc.count() == 2 and proc.count(status=500) == 1
        assert [r["status"] for r in proc.requests()] == [500, 200]
        assert proc.summary()["total"] == 2
        proc.set_script("down", {"forever": 503})
        with pytest.raises(openai.InternalServerError):
            _chat(client, "down")
        proc.configure(rpm_limit=1)
        proc.reset()  # restores rpm_limit=None and the initial script
        with pytest.raises(openai.InternalServerError):
            _chat(client, "flaky")
        pid = proc.pid
    assert pid is not None and proc.pid is None
    with pytest.raises(openai.APIConnectionError):
        _chat(openai.OpenAI(base_url=proc.base_url, api_key="k", max_retries=0, timeout=2))
