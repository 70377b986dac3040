"""The fake server in a child process, driven over its ``/_admin`` endpoints."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchfactory_dagster.testing._faults import CHAT_PATH, Address, Fault

_URL_RE = re.compile(r"http://[^\s/]+:(\d+)/v1")
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class FakeServerProcess(Address):
    """The fake server in a child process (no GIL shared with the client under test).

    Counts and scripts go through the ``/_admin`` endpoints. The child also exits when
    this process dies, because it watches its stdin for EOF.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        rpm_limit: int | None = None,
        script: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 20.0,
        **options: Any,
    ) -> None:
        self.host = host
        self._port_arg = port
        self._startup_timeout = startup_timeout
        config = dict(options, latency=latency, rpm_limit=rpm_limit, script=dict(script or {}))
        try:
            self._config = json.dumps(config, default=_jsonable)
        except TypeError as exc:
            raise TypeError(f"FakeServerProcess options must be JSON-serialisable: {exc}") from None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> FakeServerProcess:
        if self._proc is not None:
            return self
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")])
        )
        cmd = [
            sys.executable, "-m", "batchfactory_dagster.testing.fake_openai",
            "--host", self.host, "--port", str(self._port_arg),
            "--config", self._config, "--exit-on-stdin-eof", "--uvloop",
        ]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            self._port = self._read_port()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=self._startup_timeout):
                raise RuntimeError("fake server process did not report its port in time")
        line = self._proc.stdout.readline().decode()
        match = _URL_RE.search(line)
        if match is None:
            raise RuntimeError(f"fake server process failed to start (said {line!r})")
        return int(match.group(1))

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # Closing stdin is the polite stop signal; escalate only if it is ignored.
        for close in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if close is not None:
                    close.close()
        for escalate in (None, proc.terminate, proc.kill):
            if escalate is not None:
                escalate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
                return

    def __enter__(self) -> FakeServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # admin over HTTP ---------------------------------------------------------
    def _admin(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload, default=_jsonable).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with self._opener.open(req, timeout=30) as resp:
            return json.loads(resp.read())

    def requests(self, **filters: Any) -> list[dict]:
        """The child's request log (optionally filtered by path, status, model)."""
        return self._admin("GET", "/_admin/requests" + _query(filters))

    def count(
        self, path: str | None = CHAT_PATH, status: int | None = None, model: str | None = None
    ) -> int:
        query = _query({"path": path, "status": status, "model": model})
        return int(self._admin("GET", "/_admin/count" + query)["count"])

    def summary(self) -> dict:
        return self._admin("GET", "/_admin/requests?summary=1")

    def reset(self) -> None:
        self._admin("POST", "/_admin/reset", {})

    def set_script(self, model: str, items: Any) -> None:
        payload: dict[str, Any] = {"model": model}
        if isinstance(items, Mapping):
            payload.update(items)
        else:
            payload["items"] = items
        self._admin("POST", "/_admin/script", payload)

    def configure(self, **options: Any) -> None:
        self._admin("POST", "/_admin/config", options)


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, Fault):
        return {"fault": value.kind, "status": value.status, "retry_after": value.retry_after}
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable (use a set, not a predicate)")


def _query(params: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in params.items() if v is not None}
    return "?" + urllib.parse.urlencode(kept) if kept else ""
