"""Bounded-time soak: concurrent mixed traffic against a real server on 127.0.0.1.

    python bench/soak.py --seconds 300 --concurrency 8 --json soak.json

Without `--url` it starts its own `python -m server` (real model) in a temporary folder with three
real LoRA adapters (`soak-a`, `soak-b`, `soak-c`) and a prompt route (`soak-prompt`). Traffic: the
base model, the three adapters and the route, streaming and not, random `max_tokens`, ~10% of
clients disconnecting at a random moment, ~3% malformed bodies. It reports crashes (the server
process exited or /health failed), 5xx answers and error events in streams, transport errors,
memory drift (VmRSS of the server pid after warm-up vs at the end), p50/p99 latency of completed
requests, and log rows left `in_progress` after the run. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ["base", "soak-a", "soak-b", "soak-c", "soak-prompt"]
ROUTES = """
[routes.soak-prompt]
prompt = "soak.j2"
[routes.soak-prompt.params]
temperature = 0.0
"""
PROMPTS = ["What is a harbour?", "Name three colours.", "Tell me about lighthouses.", "Why is the sea salty?",
           "Write a haiku about ships.", "Explain tides in one paragraph."]


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))], 3)


def start_server(work: Path, parallel: int) -> tuple[subprocess.Popen, str, Path]:
    from scripts.fetch_model import fetch
    from adapter_chat.gguf_info import BaseModelInfo
    from tests.conftest import free_port, publish_lora

    model = fetch()
    base = BaseModelInfo.load(model)
    adapters, prompts = work / "adapters", work / "prompts"
    adapters.mkdir()
    prompts.mkdir()
    for i, name in enumerate(("soak-a", "soak-b", "soak-c")):
        publish_lora(adapters, name, base, seed=100 + i, tmp=work, rank=8)
    (prompts / "soak.j2").write_text("You are a terse harbour master. Answer in one sentence.")
    (prompts / "routes.toml").write_text(ROUTES)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update({"CHAT_MODEL": str(model), "CHAT_ADAPTERS_DIR": str(adapters), "CHAT_PROMPTS_DIR": str(prompts),
                "CHAT_DB_PATH": str(work / "log.sqlite3"), "CHAT_N_CTX": "1024", "CHAT_PARALLEL": str(parallel),
                "CHAT_QUEUE_MAX": "16", "CHAT_ADAPTER_WATCH_INTERVAL_S": "1"})
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited at start-up: {(work / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url, work / "log.sqlite3"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready after 180 s")


class Stats:
    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.errors: list[str] = []
        self.ids: list[str] = []

    def count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


async def one(http: httpx.AsyncClient, rng: random.Random, stats: Stats) -> None:
    model = rng.choice(MODELS)
    stream = rng.random() < 0.5
    leave = rng.random() < 0.10
    malformed = rng.random() < 0.03
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                            "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0, 0.7]),
                            "stream": stream, "user": "soak"}
    if malformed:
        body[rng.choice(["temperature", "max_tokens", "messages"])] = rng.choice([-5, "x", [], None])
    t0 = time.monotonic()
    try:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    stats.count(f"http_{r.status_code}")
                    return
                stats.ids.append(r.headers.get("x-request-id", ""))
                cut = rng.randint(1, 10) if leave else None
                n = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    n += 1
                    if n == 2:
                        stats.ttft.append(time.monotonic() - t0)
                    if '"error"' in line and line.startswith('data: {"error"'):
                        stats.count("stream_error_event")
                        stats.errors.append(line[:200])
                    if cut is not None and n >= cut:
                        stats.count("client_left_stream")
                        return
            stats.latency.append(time.monotonic() - t0)
            stats.count("http_200")
        else:
            timeout = rng.uniform(0.05, 1.5) if leave else 300
            try:
                r = await http.post("/v1/chat/completions", json=body, timeout=timeout)
            except httpx.TimeoutException:
                stats.count("client_left_nonstream")
                return
            stats.count(f"http_{r.status_code}")
            if r.status_code == 200:
                stats.latency.append(time.monotonic() - t0)
                stats.ids.append(r.headers.get("x-request-id", ""))
            elif r.status_code >= 500:
                stats.errors.append(r.text[:200])
    except httpx.TransportError as e:
        stats.count("transport_error")
        stats.errors.append(repr(e)[:200])


async def soak(url: str, pid: int, seconds: float, concurrency: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    stats = Stats()
    rss: list[tuple[float, int]] = []
    health_failures = 0
    t_start = time.monotonic()
    end = t_start + seconds

    async def worker(i: int) -> None:
        wrng = random.Random(rng.random())
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            while time.monotonic() < end:
                await one(http, wrng, stats)

    async def sampler() -> None:
        nonlocal health_failures
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.monotonic() < end:
                rss.append((time.monotonic() - t_start, rss_kb(pid)))
                try:
                    if (await http.get("/health")).status_code != 200:
                        health_failures += 1
                except httpx.HTTPError:
                    health_failures += 1
                await asyncio.sleep(5)
            rss.append((time.monotonic() - t_start, rss_kb(pid)))

    await asyncio.gather(sampler(), *[worker(i) for i in range(concurrency)])
    warm = [kb for t, kb in rss if t >= min(60.0, seconds * 0.2)] or [kb for _, kb in rss]
    return {
        "seconds": round(time.monotonic() - t_start, 1), "concurrency": concurrency,
        "requests": sum(stats.outcomes.values()), "outcomes": dict(sorted(stats.outcomes.items())),
        "5xx": sum(v for k, v in stats.outcomes.items() if k.startswith("http_5")),
        "stream_error_events": stats.outcomes.get("stream_error_event", 0),
        "transport_errors": stats.outcomes.get("transport_error", 0), "health_failures": health_failures,
        "latency_p50_s": pct(stats.latency, 50), "latency_p99_s": pct(stats.latency, 99),
        "ttft_p99_s": pct(stats.ttft, 99),
        "rss_kb_after_warmup": warm[0], "rss_kb_end": rss[-1][1], "rss_kb_max": max(kb for _, kb in rss),
        "rss_drift_kb": rss[-1][1] - warm[0], "errors": stats.errors[:10], "_ids": stats.ids,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--parallel", type=int, default=4, help="server slots when the script starts the server")
    p.add_argument("--url", help="an already running server (then --pid and --db are needed for RSS and rows)")
    p.add_argument("--pid", type=int)
    p.add_argument("--db", type=Path)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        if args.url:
            url, pid, db = args.url, args.pid or 0, args.db
        else:
            proc, url, db = start_server(Path(tmp), args.parallel)
            pid = proc.pid
        print(f"soak: {args.seconds:.0f} s, {args.concurrency} clients against {url} (pid {pid})", flush=True)
        result = asyncio.run(soak(url, pid, args.seconds, args.concurrency, args.seed))
        ids = [i for i in result.pop("_ids") if i]
        result["crashes"] = int(proc is not None and proc.poll() is not None)
        if db is not None and db.exists():
            time.sleep(2)  # let the writer thread finish the last rows
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            found = {r[0]: r[1] for r in conn.execute("SELECT id, status FROM exchanges")}
            result["rows_in_progress_after"] = sum(1 for s in found.values() if s == "in_progress")
            result["acknowledged_ids_missing_in_log"] = sum(1 for i in ids if i not in found)
            result["integrity_check"] = conn.execute("PRAGMA integrity_check").fetchone()[0]
            conn.close()
        if proc is not None:
            proc.terminate()
            result["exit_code"] = proc.wait(60)
            if result["exit_code"] not in (0, -15) or result["crashes"]:
                result["server_log_tail"] = (Path(tmp) / "server.log").read_text(errors="replace")[-2000:]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    failed = result["crashes"] or result["5xx"] or result["stream_error_events"] or result["transport_errors"] \
        or result.get("rows_in_progress_after") or result.get("acknowledged_ids_missing_in_log") \
        or result.get("exit_code", 0) not in (0, -15)  # -15: uvicorn re-raises SIGTERM (docs/reliability.md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
