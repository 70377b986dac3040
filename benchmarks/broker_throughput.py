"""End-to-end throughput of ConcurrentLLMCallBroker against plain AsyncOpenAI loops.

Against the loopback fake OpenAI server (``FakeServerProcess``: its own process, fixed latency),
for every (latency, concurrency) configuration this measures, side by side and interleaved
(a, b, c, a, b, c, ...), requests/s end to end for N distinct prompts:

  (a) plain ``openai.AsyncOpenAI`` (default httpx transport, max_retries=0) +
      ``asyncio.Semaphore(C)`` + ``gather`` over ``chat.completions.create``;
  (b) the same loop on the aiohttp transport (``http_client=openai.DefaultAioHttpClient()``);
  (c) ``ConcurrentLLMCallBroker(fresh ledger, concurrency=C).run(requests)``, ledger writes
      included.

Each timing covers client/broker construction, all N calls and closing the client/broker
(requests and prompts are built before the clock starts). One untimed warm-up round per method
precedes each configuration. The fake server's request log is reset before every measurement
and its count checked afterwards. Medians over the repetitions, the ratios c/b and c/a, and
the client process's CPU time per request (``time.process_time``: every thread of this
process, not the server's; robust to other load on the machine) are printed as markdown
tables. The theoretical bound is concurrency / latency.

With ``--prototypes`` two more methods join the interleaving: the unmodified broker with the
prototype transports of ``benchmarks/_proto_transport.py`` (p1: the SDK's ``client.post``
without the request-body transform; p2: aiohttp directly, no SDK).

Then (d): a fully cached re-run of 100,000 requests. The ledger is filled by running the
broker once on ``gpt-4o-mini@local`` (the offline provider: same broker path, same
_run_job/record_done/ledger append per answer, only the HTTP call is replaced by the
in-process synthetic answer), then ``broker.run(requests)`` is timed with a fresh broker on
that ledger, (d1) with the ledger load included and (d2) with the ledger already loaded;
(d3) is (d1) with the cyclic GC paused, a prototype of a fix.

Reproduce:  .venv/bin/python benchmarks/broker_throughput.py [--quick] [--prototypes] [--json out.json]
Options --only LATENCY_MS:C, --reps, --n, --skip-live, --skip-cached narrow a run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing the package

import openai  # noqa: E402

from batchfactory_dagster.brokers.llm_broker import ConcurrentLLMCallBroker  # noqa: E402
from batchfactory_dagster.llm import make_request  # noqa: E402
from batchfactory_dagster.testing import FakeServerProcess  # noqa: E402

MODEL = "gpt-4o-mini"
PARAMS = {"max_completion_tokens": 64}
LATENCIES = (0.05, 0.2)
CONCURRENCIES = (64, 256)
# N per (latency, concurrency): a few seconds for (b)/(c) at the throughput seen on a
# 2-core box; (a) is several times slower, so it runs longer on the same N.
FULL_N = {(0.05, 64): 4000, (0.05, 256): 5000, (0.2, 64): 1500, (0.2, 256): 4000}
QUICK_N = {(0.05, 64): 400, (0.05, 256): 500, (0.2, 64): 200, (0.2, 256): 500}
METHODS = ("a", "b", "c")
PROTO_METHODS = ("p1", "p2")
LABELS = {"a": "loop httpx (a)", "b": "loop aiohttp (b)", "c": "broker (c)",
          "p1": "broker+SdkPost (p1)", "p2": "broker+DirectAioHttp (p2)"}


# --------------------------------------------------------------------------- prompts


def prompts(n: int) -> list[str]:
    """N prompts no earlier measurement has sent (distinct within and across measurements)."""
    tag = uuid.uuid4().hex[:12]
    return [f"Summarise item {i} of batch {tag} in one sentence." for i in range(n)]


# --------------------------------------------------------------------------- (a), (b)


async def _loop(texts: list[str], concurrency: int, aiohttp: bool) -> int:
    http = openai.DefaultAioHttpClient() if aiohttp else None
    client = openai.AsyncOpenAI(max_retries=0, http_client=http)
    sem = asyncio.Semaphore(concurrency)

    async def one(text: str) -> str | None:
        async with sem:
            completion = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": text}], **PARAMS)
            return completion.choices[0].message.content

    try:
        answers = await asyncio.gather(*(one(t) for t in texts))
    finally:
        await client.close()
    return sum(1 for a in answers if a)


def run_loop(texts: list[str], concurrency: int, aiohttp: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    ok = asyncio.run(_loop(texts, concurrency, aiohttp))
    return time.perf_counter() - t0, ok


# --------------------------------------------------------------------------- (c)


def make_transport(method: str) -> Any:
    """None for the broker as shipped; a prototype transport (benchmarks/_proto_transport.py)."""
    if method == "c":
        return None
    from _proto_transport import DirectAioHttpTransport, SdkPostTransport

    return SdkPostTransport() if method == "p1" else DirectAioHttpTransport()


def run_broker(texts: list[str], concurrency: int, workdir: str,
               method: str = "c") -> tuple[float, int]:
    requests = [make_request(f"{MODEL}@openai", [{"role": "user", "content": t}], PARAMS)
                for t in texts]
    path = os.path.join(workdir, f"ledger-{uuid.uuid4().hex[:8]}.jsonl")
    t0 = time.perf_counter()
    broker = ConcurrentLLMCallBroker(path, concurrency=concurrency,
                                     transport=make_transport(method))
    try:
        results = broker.run(requests)
    finally:
        broker.close()
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt, sum(1 for r in results if r.status == "done" and not r.cached)


# --------------------------------------------------------------------------- (d)


def local_requests(n: int) -> list[dict[str, Any]]:
    return [make_request(f"{MODEL}@local",
                         [{"role": "user", "content": f"Cached prompt number {i}: say hi."}],
                         PARAMS) for i in range(n)]


def cached_rerun(n: int, reps: int, workdir: str) -> dict[str, Any]:
    requests = local_requests(n)
    path = os.path.join(workdir, "cached.jsonl")
    gc.collect()
    t0 = time.perf_counter()
    broker = ConcurrentLLMCallBroker(path, concurrency=256)
    filled = broker.run(requests)
    broker.close()
    fill = time.perf_counter() - t0
    assert all(r.status == "done" and not r.cached for r in filled), "fill run failed"
    out: dict[str, Any] = {"n": n, "fill_s": fill, "ledger_bytes": os.path.getsize(path),
                           "with_load_s": [], "without_load_s": [], "load_only_s": [],
                           "gc_off_with_load_s": []}
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        broker = ConcurrentLLMCallBroker(path, concurrency=256)
        results = broker.run(requests)  # the ledger is opened (indexed) inside run()
        out["with_load_s"].append(time.perf_counter() - t0)
        broker.close()
        assert len(results) == n and all(r.cached for r in results), "re-run was not all hits"
        del results
        gc.collect()
        broker = ConcurrentLLMCallBroker(path, concurrency=256)
        t0 = time.perf_counter()
        _ = broker.ledger  # load the ledger before the clock starts
        t1 = time.perf_counter()
        results = broker.run(requests)
        out["without_load_s"].append(time.perf_counter() - t1)
        out["load_only_s"].append(t1 - t0)
        broker.close()
        assert all(r.cached for r in results)
        del results
        # Prototype of a fix, not the shipped behaviour: the same re-run with the cyclic GC
        # paused (as Broker.run could do around its lookup / result building).
        gc.collect()
        t0 = time.perf_counter()
        gc.disable()
        try:
            broker = ConcurrentLLMCallBroker(path, concurrency=256)
            results = broker.run(requests)
        finally:
            gc.enable()
        out["gc_off_with_load_s"].append(time.perf_counter() - t0)
        broker.close()
        assert all(r.cached for r in results)
        del results
    os.unlink(path)
    return out


# --------------------------------------------------------------------------- driver


def measure_config(server: FakeServerProcess, latency: float, concurrency: int, n: int,
                   reps: int, workdir: str, log: Any, methods: tuple[str, ...] = METHODS
                   ) -> dict[str, Any]:
    for m in methods:  # untimed warm-up: lazy imports, first connections, code paths
        texts = prompts(min(n, 2 * concurrency))
        if m in ("c",) + PROTO_METHODS:
            run_broker(texts, concurrency, workdir, m)
        else:
            run_loop(texts, concurrency, aiohttp=(m == "b"))
    runs: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}  # client CPU us per request
    for rep in range(reps):
        for m in methods:
            texts = prompts(n)
            server.reset()
            gc.collect()
            cpu0 = time.process_time()  # every thread of this process, not the server's
            if m in ("c",) + PROTO_METHODS:
                dt, ok = run_broker(texts, concurrency, workdir, m)
            else:
                dt, ok = run_loop(texts, concurrency, aiohttp=(m == "b"))
            cpu[m].append((time.process_time() - cpu0) / n * 1e6)
            served = server.count()
            if ok != n or served != n:
                raise RuntimeError(f"{m}: {ok} answers, server saw {served}, expected {n}")
            runs[m].append(n / dt)
            log(f"  lat={latency * 1000:.0f}ms c={concurrency} rep={rep + 1} {LABELS[m]}: "
                f"{n / dt:8.1f} req/s ({dt:.2f} s, client CPU {cpu[m][-1]:.0f} us/req)")
    med = {m: statistics.median(v) for m, v in runs.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    out = {"latency": latency, "concurrency": concurrency, "n": n, "runs": runs,
           "median": med, "bound": concurrency / latency, "cpu_us": cpu, "median_cpu_us": med_cpu}
    for m in ("c",) + PROTO_METHODS:
        for base in ("a", "b"):
            if m in med and base in med:
                out[f"{m}_over_{base}"] = med[m] / med[base]
    return out


def machine() -> dict[str, Any]:
    import aiohttp
    import orjson

    try:
        import httpx2
        httpx_v = f"httpx2 {httpx2.__version__}"
    except ImportError:  # older openai releases use httpx
        import httpx
        httpx_v = f"httpx {httpx.__version__}"
    return {"nproc": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "openai": openai.__version__,
            "aiohttp": aiohttp.__version__, "orjson": orjson.__version__, "http": httpx_v,
            "loadavg_at_start": os.getloadavg()}


def table(configs: list[dict[str, Any]]) -> str:
    lines = [
        "| latency | C | N | bound | (a) httpx loop | (b) aiohttp loop | (c) broker | c/b | c/a |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in configs:
        med = r["median"]
        lines.append(
            f"| {r['latency'] * 1000:.0f} ms | {r['concurrency']} | {r['n']:,} | "
            f"{r['bound']:,.0f} | {med['a']:,.0f} | {med['b']:,.0f} | {med['c']:,.0f} | "
            f"{r['c_over_b']:.2f} | {r['c_over_a']:.1f} |")
    methods = [m for m in METHODS + PROTO_METHODS if m in configs[0]["median"]]
    lines += ["", "client CPU per request (us, median; the client process incl. the broker thread):",
              "", "| latency | C | " + " | ".join(LABELS[m] for m in methods) + " |",
              "|---:|---:|" + "---:|" * len(methods)]
    for r in configs:
        lines.append(f"| {r['latency'] * 1000:.0f} ms | {r['concurrency']} | "
                     + " | ".join(f"{r['median_cpu_us'][m]:,.0f}" for m in methods) + " |")
    if any("p1" in r["median"] for r in configs):
        lines += ["", "prototype transports (same run, interleaved with the above):", "",
                  "| latency | C | (c) broker | (p1) broker+SdkPost | p1/b | (p2) broker+DirectAioHttp | p2/b |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in configs:
            med = r["median"]
            lines.append(
                f"| {r['latency'] * 1000:.0f} ms | {r['concurrency']} | {med['c']:,.0f} | "
                f"{med['p1']:,.0f} | {r['p1_over_b']:.2f} | {med['p2']:,.0f} | "
                f"{r['p2_over_b']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sanity run (<60 s)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per configuration")
    parser.add_argument("--cached-n", type=int, default=None, help="size of the cached re-run")
    parser.add_argument("--skip-cached", action="store_true", help="skip (d)")
    parser.add_argument("--skip-live", action="store_true", help="skip (a)-(c)")
    parser.add_argument("--only", action="append", default=None, metavar="LATENCY_MS:C",
                        help="run only this configuration, e.g. 200:256 (repeatable)")
    parser.add_argument("--n", type=int, default=None, help="override N for every configuration")
    parser.add_argument("--prototypes", action="store_true",
                        help="also measure the prototype transports in benchmarks/_proto_transport.py")
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    sizes = QUICK_N if args.quick else FULL_N
    cached_n = args.cached_n or (10_000 if args.quick else 100_000)
    only = None
    if args.only:
        only = set()
        for item in args.only:
            ms, _, c = item.partition(":")
            only.add((float(ms) / 1000, int(c)))

    def log(msg: str) -> None:
        print(msg, flush=True)

    info = machine()
    log(f"machine: {json.dumps(info)}")
    report: dict[str, Any] = {"machine": info, "quick": args.quick, "reps": reps, "configs": []}
    workdir = tempfile.mkdtemp(prefix="broker-throughput-")
    saved_env = {k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    try:
        if not args.skip_live:
            for latency in LATENCIES:
                if only is not None and all(lat != latency for lat, _ in only):
                    continue
                with FakeServerProcess(latency=latency) as server:
                    os.environ["OPENAI_BASE_URL"] = server.base_url
                    os.environ["OPENAI_API_KEY"] = "sk-fake-benchmark"
                    for concurrency in CONCURRENCIES:
                        if only is not None and (latency, concurrency) not in only:
                            continue
                        n = args.n or sizes[(latency, concurrency)]
                        methods = METHODS + (PROTO_METHODS if args.prototypes else ())
                        report["configs"].append(measure_config(
                            server, latency, concurrency, n, reps, workdir, log, methods))
            log("\nmedians, requests/s (bound = concurrency / latency):\n")
            log(table(report["configs"]))
        if not args.skip_cached:
            log(f"\n(d) cached re-run of {cached_n:,} requests, median of {1 if args.quick else 3}:")
            d = cached_rerun(cached_n, 3 if not args.quick else 1, workdir)
            d["median_with_load_s"] = statistics.median(d["with_load_s"])
            d["median_without_load_s"] = statistics.median(d["without_load_s"])
            d["median_load_only_s"] = statistics.median(d["load_only_s"])
            report["cached"] = d
            log(f"  fill (local provider, broker path, c=256): {d['fill_s']:.2f} s "
                f"= {cached_n / d['fill_s']:,.0f} req/s, ledger {d['ledger_bytes'] / 1e6:.1f} MB")
            log(f"  re-run incl. ledger load: {d['median_with_load_s']:.2f} s "
                f"(runs: {', '.join(f'{x:.2f}' for x in d['with_load_s'])})")
            log(f"  re-run, ledger loaded:    {d['median_without_load_s']:.2f} s "
                f"(runs: {', '.join(f'{x:.2f}' for x in d['without_load_s'])})")
            log(f"  ledger load alone:        {d['median_load_only_s']:.2f} s")
            d["median_gc_off_with_load_s"] = statistics.median(d["gc_off_with_load_s"])
            log(f"  prototype, GC paused, incl. load: {d['median_gc_off_with_load_s']:.2f} s "
                f"(runs: {', '.join(f'{x:.2f}' for x in d['gc_off_with_load_s'])})")
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
