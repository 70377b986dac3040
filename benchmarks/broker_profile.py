"""Where does the broker's client-side CPU go? cProfile on the broker's own loop thread.

Runs ``ConcurrentLLMCallBroker.run`` against ``FakeServerProcess`` (fixed latency) with the
profiler enabled inside the broker's event-loop thread (the thread that does all the work),
and prints the top functions by cumulative and by own time, grouped per layer.

Reproduce:  .venv/bin/python benchmarks/broker_profile.py [--latency 0.05] [--concurrency 64] [--n 4000]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from batchfactory_dagster.brokers.llm_broker import ConcurrentLLMCallBroker  # noqa: E402
from batchfactory_dagster.llm import make_request  # noqa: E402
from batchfactory_dagster.testing import FakeServerProcess  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYERS = (
    ("openai SDK", "/openai/"),
    ("httpx2", "/httpx2/"),
    ("aiohttp", "/aiohttp/"),
    ("asyncio", "/asyncio/"),
    ("batchfactory", "/batchfactory_dagster/"),
)


def layer_of(filename: str) -> str:
    if "/openai/_vendor/httpx_aiohttp/" in filename:
        return "httpx_aiohttp shim"
    for name, needle in LAYERS:
        if needle in filename:
            return name
    if filename.startswith("~") or filename == "~":
        return "builtins/C"
    return "other python"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--transport", choices=("shipped", "sdkpost", "direct"), default="shipped",
                   help="the broker's own transport, or a prototype from _proto_transport.py")
    args = p.parse_args()
    transport = None
    if args.transport != "shipped":
        from _proto_transport import DirectAioHttpTransport, SdkPostTransport

        transport = SdkPostTransport() if args.transport == "sdkpost" else DirectAioHttpTransport()
    tag = uuid.uuid4().hex[:8]
    requests = [make_request("gpt-4o-mini@openai",
                             [{"role": "user", "content": f"Summarise item {i} of {tag}."}],
                             {"max_completion_tokens": 64}) for i in range(args.n)]
    with FakeServerProcess(latency=args.latency) as server, tempfile.TemporaryDirectory() as d:
        os.environ["OPENAI_BASE_URL"] = server.base_url
        os.environ["OPENAI_API_KEY"] = "sk-fake-benchmark"
        broker = ConcurrentLLMCallBroker(os.path.join(d, "l.jsonl"), concurrency=args.concurrency,
                                         transport=transport)
        prof = cProfile.Profile()

        async def on() -> None:
            prof.enable()

        async def off() -> None:
            prof.disable()

        # Warm up first (lazy imports, connections), outside the profile.
        warm = [make_request("gpt-4o-mini@openai", [{"role": "user", "content": f"warm {i} {tag}"}],
                             {"max_completion_tokens": 64}) for i in range(2 * args.concurrency)]
        broker.run(warm)
        broker._loop.run(on())
        t0 = time.perf_counter()
        results = broker.run(requests)
        dt = time.perf_counter() - t0
        broker._loop.run(off())
        broker.close()
        assert all(r.status == "done" for r in results)
    print(f"broker ({args.transport} transport): {args.n} requests in {dt:.2f} s = {args.n / dt:.0f} req/s "
          f"under cProfile (latency {args.latency * 1000:.0f} ms, C={args.concurrency})")
    stats = pstats.Stats(prof)
    per_layer: dict[str, float] = {}
    total = 0.0
    for (filename, _line, _fn), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        per_layer[layer_of(filename)] = per_layer.get(layer_of(filename), 0.0) + tt
        total += tt
    print(f"\nown time per layer (total profiled {total:.2f} s, "
          f"{total / args.n * 1e6:.0f} us per request):")
    for name, t in sorted(per_layer.items(), key=lambda kv: -kv[1]):
        print(f"  {name:20s} {t:6.2f} s  {100 * t / total:5.1f}%  {t / args.n * 1e6:6.0f} us/req")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
        print(f"\n==== top {args.top} by {key} ====")
        print("\n".join(out.getvalue().splitlines()[6:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
