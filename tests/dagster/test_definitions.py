"""definitions.py end to end: CLI jobs, asset materialisation, multiprocess, the web UI's API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.dagster


def cli(args: list[str], cwd: Path, timeout: float = 180) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DAGSTER_"))}
    env["BATCHFACTORY_DATA_DIR"] = str(cwd / "data")
    proc = subprocess.run([str(BIN / args[0]), *args[1:], "-f", str(ROOT / "definitions.py")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def summary_line(log: str, job: str) -> str:
    return next(line for line in log.splitlines() if f"{job}: " in line and "entries out" in line)


def test_definitions_load_with_lineage():
    sys.path.insert(0, str(ROOT))
    import definitions

    defs = definitions.defs
    repo = defs.get_repository_def()
    assert {"quickstart", "role_playing", "long_text_segmentation", "build_datasets"} <= {
        j.name for j in repo.get_all_jobs()}
    graph = repo.asset_graph
    deps = {k.to_user_string(): {d.to_user_string() for d in graph.get(k).parent_keys}
            for k in graph.get_all_asset_keys()}
    assert deps["poems"] == {"myth_passages"} and deps["poems_batch"] == {"myth_passages"}
    assert deps["fable_synopses"] == {"paragraph_summaries"}
    assert deps["paragraph_summaries"] == {"fable_chapters"}


def test_quickstart_job_twice_offline_second_run_is_free(tmp_path):
    first = cli(["dagster", "job", "execute", "-j", "quickstart"], tmp_path)
    assert "3 entries out; 3 new calls, 0 cache hits" in summary_line(first, "quickstart")
    second = cli(["dagster", "job", "execute", "-j", "quickstart"], tmp_path)
    assert "3 entries out; 0 new calls, 3 cache hits" in summary_line(second, "quickstart")
    poems = tmp_path / "data" / "quickstart_v1.0.0" / "out" / "poems.jsonl"
    rows = [json.loads(line) for line in poems.read_text().splitlines()]
    assert len(rows) == 3 and all(r["text"].startswith("[synthetic]") for r in rows)


def test_multiprocess_executor_same_output_no_ledger_record_lost_or_twice(tmp_path):
    inproc, multi = tmp_path / "inproc", tmp_path / "multi"
    inproc.mkdir(), multi.mkdir()
    cli(["dagster", "job", "execute", "-j", "quickstart"], inproc)
    cli(["dagster", "job", "execute", "-j", "quickstart_multiprocess"], multi)
    out = "quickstart_v1.0.0/out/poems.jsonl"
    assert (inproc / "data" / out).read_text() == (multi / "data" / out).read_text()
    records = [json.loads(line) for line in (multi / "data" / "llm_broker.jsonl").read_text().splitlines()]
    done = [r["key"] for r in records if r["status"] == "done"]
    assert len(done) == 3 and len(set(done)) == 3


def test_asset_materialize_writes_parquet_pandas_can_read(tmp_path):
    log = cli(["dagster", "asset", "materialize", "--select", "myth_passages,poems"], tmp_path)
    assert "poems: 3 entries out" in log
    df = pd.read_parquet(tmp_path / "data" / "assets" / "poems.parquet")
    assert len(df) == 3 and {"idx", "keyword", "text"} <= set(df.columns)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_webserver_graphql_shows_lineage(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(tmp_path)
    proc = subprocess.Popen([str(BIN / "dagster-webserver"), "-f", str(ROOT / "definitions.py"),
                             "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        data = None
        while time.monotonic() < deadline:
            try:
                data = _graphql(port, "{ assetNodes { assetKey { path } "
                                      "dependencyKeys { path } } }")
                if data.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert data and data["data"]["assetNodes"], data
        edges = {(d["path"][-1], n["assetKey"]["path"][-1])
                 for n in data["data"]["assetNodes"] for d in n["dependencyKeys"]}
        assert {("myth_passages", "poems"), ("fable_chapters", "paragraph_summaries"),
                ("paragraph_summaries", "fable_synopses")} <= edges
    finally:
        proc.terminate()
        proc.wait(timeout=30)
