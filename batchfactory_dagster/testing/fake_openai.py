"""A loopback fake of the OpenAI HTTP API for tests and benchmarks.

Serves ``/v1/chat/completions`` with :func:`synthetic_completion`, plus files and the
Batch API, with scripted faults per model, an optional server-side RPM limit and a
request log readable in-process or over ``/_admin/*`` (for clients in other processes).

Run standalone: ``python -m batchfactory_dagster.testing.fake_openai --port 8000``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

# The implementation lives in private sibling modules; these names are re-exported so
# ``from batchfactory_dagster.testing.fake_openai import X`` keeps working.
from batchfactory_dagster.testing._batches import (
    TERMINAL_BATCH_STATES as TERMINAL_BATCH_STATES,
)
from batchfactory_dagster.testing._batches import BatchEmulator as BatchEmulator
from batchfactory_dagster.testing._faults import CHAT_PATH as CHAT_PATH
from batchfactory_dagster.testing._faults import FAULT_KINDS as FAULT_KINDS
from batchfactory_dagster.testing._faults import Fault as Fault
from batchfactory_dagster.testing._faults import ServerOptions as ServerOptions
from batchfactory_dagster.testing._faults import error_response as error_response
from batchfactory_dagster.testing._faults import parse_fault as parse_fault
from batchfactory_dagster.testing._faults import parse_script as parse_script
from batchfactory_dagster.testing._process import FakeServerProcess as FakeServerProcess
from batchfactory_dagster.testing._server import FakeOpenAIServer as FakeOpenAIServer

__all__ = [
    "FakeOpenAIServer",
    "FakeServerProcess",
    "main",
    "serve_fake_openai",
]


@contextlib.contextmanager
def serve_fake_openai(**kwargs: Any) -> Iterator[FakeOpenAIServer]:
    """An in-thread :class:`FakeOpenAIServer`, started for the ``with`` block."""
    with FakeOpenAIServer(**kwargs) as server:
        yield server


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m batchfactory_dagster.testing.fake_openai",
        description="Serve a fake OpenAI-compatible API on loopback until Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=None, help="seconds per completion")
    parser.add_argument("--rpm-limit", type=int, default=None, help="server-side requests/minute")
    parser.add_argument("--slow-seconds", type=float, default=None)
    parser.add_argument("--batch-polls-to-complete", type=int, default=None)
    parser.add_argument("--script", default=None, help='JSON, e.g. {"flaky": [429, 500]}')
    parser.add_argument("--config", default=None, help="JSON object of FakeOpenAIServer options")
    parser.add_argument("--uvloop", action="store_true", help="use uvloop when installed")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _server_from_args(args: argparse.Namespace) -> FakeOpenAIServer:
    config: dict[str, Any] = json.loads(args.config) if args.config else {}
    flags = {
        "latency": args.latency,
        "rpm_limit": args.rpm_limit,
        "slow_seconds": args.slow_seconds,
        "batch_polls_to_complete": args.batch_polls_to_complete,
        "script": json.loads(args.script) if args.script else None,
    }
    config.update({k: v for k, v in flags.items() if v is not None})
    config.setdefault("latency", 0.0)
    return FakeOpenAIServer(host=args.host, port=args.port, use_uvloop=args.uvloop, **config)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGINT/SIGTERM (or stdin EOF when asked)."""
    args = _parse_args(argv)
    server = _server_from_args(args).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    if args.exit_on_stdin_eof:
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), done.set()), daemon=True).start()
    print(server.base_url, flush=True)
    # A timed wait keeps the main thread responsive to signals.
    while not done.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
