"""How fast, and how lean, does a million-record JsonlLedger open?

Writes a ledger of realistic LLM-response records into a temp dir, then, in a fresh
subprocess per run (so nothing is warm in the interpreter), measures:

* load: `JsonlLedger(path)` -- open and index every line, validating each;
* peak RSS of that subprocess (ru_maxrss) minus its baseline after imports;
* 100,000 random `get()`s;
* the file size.

The file is freshly written, so it sits in the page cache: these are warm-cache numbers.

Reproduce:  .venv/bin/python benchmarks/ledger_load.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing the package

from batchfactory_dagster.core.ledger import JsonlLedger  # noqa: E402

WORDS = (
    "the model answers with a short summary of the passage and cites two facts "
    "from the source while keeping a neutral tone über café naïve"
).split()


def key_of(i: int) -> str:
    """Brokers key records by the hash of the request; so do we."""
    return hashlib.sha256(f"request-{i}".encode()).hexdigest()


def make_record(i: int, rng: random.Random) -> dict:
    """One cached chat completion, shaped like what a broker stores."""
    text = " ".join(rng.choices(WORDS, k=rng.randint(8, 36)))
    prompt_tokens, completion_tokens = rng.randint(80, 900), rng.randint(20, 120)
    return {
        "key": key_of(i),
        "kind": "chat",
        "model": "gpt-4o-mini-2024-07-18",
        "created": 1_732_700_000 + i,
        "request": {"temperature": 0.7, "max_tokens": 256, "n_messages": rng.randint(1, 4)},
        "response": {
            "id": f"chatcmpl-{rng.getrandbits(96):024x}",
            "text": text + "\n",
            "finish_reason": "stop",
        },
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "cost_usd": round((prompt_tokens * 0.15 + completion_tokens * 0.6) / 1e6, 8),
        "latency_s": round(rng.uniform(0.3, 4.0), 3),
        "attempts": 1,
    }


def write_ledger(path: str, n: int) -> None:
    rng = random.Random(0)
    with JsonlLedger(path) as ledger:
        for start in range(0, n, 10_000):
            ledger.append_many(make_record(i, rng) for i in range(start, min(n, start + 10_000)))


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hwm_mb() -> float:
    """VmHWM, a cross-check of ru_maxrss that starts afresh at exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(path: str, n: int, gets: int) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    baseline, hwm_baseline = maxrss_mb(), hwm_mb()
    t0 = time.perf_counter()
    ledger = JsonlLedger(path)
    load_s = time.perf_counter() - t0
    peak, hwm_peak = maxrss_mb(), hwm_mb()
    rng = random.Random(1)
    wanted = [key_of(rng.randrange(n)) for _ in range(gets)]
    t0 = time.perf_counter()
    found = sum(ledger.get(key) is not None for key in wanted)
    get_s = time.perf_counter() - t0
    assert found == gets and len(ledger) == n and ledger.torn_lines == 0
    result = {
        "load_s": load_s,
        "rss_mb": peak - baseline,
        "hwm_mb": hwm_peak - hwm_baseline,
        "baseline_mb": baseline,
        "get_s": get_s,
    }
    print(json.dumps(result))


def spawn(*args: str) -> str:
    """Run this script again in a fresh process; return its last stdout line."""
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def measure(path: str, n: int, gets: int) -> dict:
    return json.loads(spawn("--child", path, "--records", str(n), "--gets", str(gets)))


def table(runs: list[dict], n: int, gets: int, size: int) -> str:
    def row(label: str, field: str, fmt: str) -> str:
        values = [r[field] for r in runs]
        return f"| {label} | {min(values):{fmt}} | {statistics.median(values):{fmt}} |"

    return "\n".join(
        [
            f"| {n:,} records, {size / 1e6:.0f} MB file ({size / n:.0f} B/record) | min | median |",
            "| --- | ---: | ---: |",
            row("load: open + index (s)", "load_s", ".2f"),
            row("peak RSS over baseline, ru_maxrss (MB)", "rss_mb", ".0f"),
            row("same, from /proc VmHWM (MB)", "hwm_mb", ".0f"),
            row(f"{gets:,} random get() (s)", "get_s", ".3f"),
            row("interpreter baseline RSS (MB)", "baseline_mb", ".0f"),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--gets", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.records, args.gets)
        return
    if args.write:
        write_ledger(args.write, args.records)
        print("ok")
        return
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        path = os.path.join(tmp, "ledger.jsonl")
        t0 = time.perf_counter()
        # Linux carries ru_maxrss across fork+exec: this parent must stay small, so even
        # the writing happens in a child.
        spawn("--write", path, "--records", str(args.records))
        print(
            f"wrote {args.records:,} records in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
        runs = [measure(path, args.records, args.gets) for _ in range(args.runs)]
        print(table(runs, args.records, args.gets, os.path.getsize(path)))


if __name__ == "__main__":
    main()
