"""Serving benchmark: a raw llama.cpp decode loop, our server and llama-server, measured in one run.

Not a test. It starts everything it talks to on 127.0.0.1, is bounded in request count and in time
(`--max-seconds`), and stops the servers it started on the way out.

    .venv/bin/python bench/bench_serve.py                        # full run, appends to bench/RESULTS.md
    .venv/bin/python bench/bench_serve.py --skip-llama-server --tokens 64 --clients 1,8 --no-results

Parts:
1. raw    - `llama_decode` over llama_cpp.llama_cpp (no server), same model, threads and context layout
            as the engine (n_seq_max = parallel, per-sequence KV); greedy, `--tokens` tokens ignoring EOS:
            prompt prefill time, single-sequence decode tok/s, `parallel` sequences in one batch.
2. ours   - `python -m server` (CHAT_PARALLEL, CHAT_N_THREADS, two random LoRA adapters published like
            tests/conftest.py `publish_lora`), streamed with an async httpx client.
3. llama  - llama-server built by bench/llama_server.sh, `--parallel P -t T -c P*n_ctx`, the same
            adapters preloaded with `--lora ... --lora-init-without-apply` and chosen per request.
4. lcp    - llama-cpp-python's own server (`python -m llama_cpp.server`, venv made by
            bench/lcp_server.sh from the same llama-cpp-python wheel), default settings plus the same
            threads and context. It has no per-request adapters, so only the base-model scenarios run.

Client measurements (same for both servers): single-stream TTFT and decode tok/s (tokens after the
first / time after the first token); aggregate tok/s at each `--clients` level; 8 clients all on adapter A
vs half on A and half on B (aggregate, p95 latency); TTFT of turn 1 vs turn `--turns` of a conversation
whose history is re-sent each turn, on base and on adapter A; TTFT p95 at the largest client count,
twice: in a burst (all clients send at the same instant, and, answers being equally long, again at
the same instant every round) and with staggered arrivals (client i starts i * `--stagger` seconds
after the first, so each new request meets the others mid-answer, as in steady traffic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapter_chat import publish, registry  # noqa: E402
from adapter_chat.chat_template import ChatTemplate  # noqa: E402
from adapter_chat.gguf_info import BaseModelInfo  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORK = ROOT / "bench" / ".work"
LLAMA_SERVER = WORK / "llama-server-build" / "bin" / "llama-server"
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

SYSTEM = "You are a precise assistant. Follow the instructions exactly and never stop early."
# Checked on the base model and both bench adapters: greedy decoding runs past 150 tokens without EOS
# (a "count in words" prompt stopped at 121 on base and at 60 on adapter B). completion_tokens is
# still checked and reported for every scenario.
TASK = "List the numbers from 1 to 500, one per line, with no other text."
TURNS = [
    "Tell me about the history of tea.", "What about coffee?", "Which one has more caffeine?",
    "How is green tea made?", "And black tea?", "What is matcha?", "How do I brew it?",
    "What water temperature is best?", "Can I add milk?", "Summarise everything so far.",
    "What did I ask first?", "Thank you.",
]


# ---------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = max(0, min(len(xs) - 1, int(np.ceil(q / 100 * len(xs))) - 1))
    return xs[k]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_lora_file(path: Path, base: BaseModelInfo, *, seed: int, rank: int = 8, strength: float = 0.06) -> Path:
    """A real llama.cpp LoRA GGUF with random low-rank A/B (as tests/conftest.py make_lora_file)."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for name, shape in base.tensor_shapes.items():
        if not name.startswith("blk.") or name.split(".")[2] not in LORA_TARGETS or len(shape) != 2:
            continue
        n_out, n_in = shape
        pairs[name] = (rng.normal(0, strength, (rank, n_in)).astype(np.float32),
                       rng.normal(0, strength, (n_out, rank)).astype(np.float32))
    registry.write_lora_gguf(path, architecture=base.architecture, pairs=pairs, alpha=float(rank),
                             metadata={"training.note": f"random bench adapter seed={seed}"})
    return path


def publish_lora(adapters_dir: Path, name: str, base: BaseModelInfo, *, seed: int, tmp: Path) -> Path:
    """Publish a random adapter through the shared registry code; returns the published GGUF."""
    src = make_lora_file(tmp / f"{name}-{seed}.gguf", base, seed=seed)
    m = publish.publish_version(adapters_dir, name, src, base_model_sha256=base.sha256, base_model_name=base.name,
                                 architecture=base.architecture, rank=8, alpha=8.0, metrics={"note": "bench"})
    return adapters_dir / name / m.file


# ---------------------------------------------------------------------------------------- 1. raw loop


def raw_baseline(model: Path, prompt: str, *, n_tokens: int, n_seqs: int, n_threads: int, n_ctx: int,
                 n_batch: int, shared_prefix: int = 0) -> dict[str, Any]:
    """Plain llama_decode loop with the engine's context layout; greedy, EOS ignored.

    With `shared_prefix` (tokens the prompts of different requests have in common), also the prefill
    floor of a burst when that prefix is computed once and copied: the prefix on one sequence, then
    every sequence's own rest in one batch."""
    import llama_cpp._logger as llama_logger
    import llama_cpp.llama_cpp as C

    llama_logger.set_verbose(False)
    C.llama_backend_init()
    mp = C.llama_model_default_params()
    mp.n_gpu_layers = 0
    mdl = C.llama_model_load_from_file(str(model).encode(), mp)
    assert mdl, "could not load the model"
    vocab = C.llama_model_get_vocab(mdl)
    cp = C.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx * n_seqs, n_batch, n_batch
    cp.n_seq_max, cp.n_threads, cp.n_threads_batch = n_seqs, n_threads, n_threads
    cp.no_perf, cp.kv_unified = True, False
    ctx = C.llama_init_from_model(mdl, cp)
    assert ctx, "could not create a context"
    mem = C.llama_get_memory(ctx)
    data = prompt.encode()
    buf = (C.llama_token * (len(data) + 8))()
    n = C.llama_tokenize(vocab, data, len(data), buf, len(buf), True, True)
    toks = list(buf[:n])
    batch = C.llama_batch_init(max(n_batch, n * n_seqs, n_seqs), 0, 1)
    greedy = C.llama_sampler_init_greedy()

    def put(i: int, tok: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    def run(seqs: int) -> dict[str, float]:
        for s in range(n_seqs):
            C.llama_memory_seq_rm(mem, s, -1, -1)
        nb = 0
        for s in range(seqs):
            for j, t in enumerate(toks):
                put(nb, t, j, s, j == len(toks) - 1)
                nb += 1
        batch.n_tokens = nb
        t0 = time.perf_counter()
        rc = C.llama_decode(ctx, batch)
        prefill = time.perf_counter() - t0
        assert rc == 0, f"prefill decode failed ({rc})"
        nxt = [C.llama_sampler_sample(greedy, ctx, (s + 1) * len(toks) - 1) for s in range(seqs)]
        t0 = time.perf_counter()
        for step in range(n_tokens - 1):  # the first token came from the prefill
            for s in range(seqs):
                put(s, nxt[s], len(toks) + step, s, True)
            batch.n_tokens = seqs
            rc = C.llama_decode(ctx, batch)
            assert rc == 0, f"decode failed ({rc})"
            nxt = [C.llama_sampler_sample(greedy, ctx, s) for s in range(seqs)]
        dt = time.perf_counter() - t0
        return {"prefill_s": prefill, "decode_s": dt, "tok_s": seqs * (n_tokens - 1) / dt}

    def shared_prefill() -> float:
        for s in range(n_seqs):
            C.llama_memory_seq_rm(mem, s, -1, -1)
        for j in range(shared_prefix):
            put(j, toks[j], j, 0, False)
        batch.n_tokens = shared_prefix
        t0 = time.perf_counter()
        assert C.llama_decode(ctx, batch) == 0
        for s in range(1, n_seqs):
            C.llama_memory_seq_cp(mem, 0, s, -1, -1)
        nb = 0
        for s in range(n_seqs):
            for j in range(shared_prefix, len(toks)):
                put(nb, toks[j], j, s, j == len(toks) - 1)
                nb += 1
        batch.n_tokens = nb
        assert C.llama_decode(ctx, batch) == 0
        return time.perf_counter() - t0

    try:
        run(1)  # warm-up
        one = min((run(1) for _ in range(2)), key=lambda r: r["decode_s"])
        many = run(n_seqs)
        shared = min(shared_prefill() for _ in range(2)) if 0 < shared_prefix < len(toks) - 1 else float("nan")
    finally:
        C.llama_sampler_free(greedy)
        C.llama_batch_free(batch)
        C.llama_free(ctx)
        C.llama_model_free(mdl)
    return {"prompt_tokens": len(toks), "single_prefill_s": one["prefill_s"], "single_tok_s": one["tok_s"],
            "batch_seqs": n_seqs, "batch_prefill_s": many["prefill_s"], "batch_tok_s": many["tok_s"],
            "shared_prefix_tokens": shared_prefix, "batch_prefill_shared_s": shared}


def common_prefix_tokens(model: Path, a: str, b: str) -> int:
    """How many leading tokens two prompts share (the part a server can compute once and copy)."""
    import llama_cpp.llama_cpp as C

    mp = C.llama_model_default_params()
    mp.vocab_only = True
    mdl = C.llama_model_load_from_file(str(model).encode(), mp)
    vocab = C.llama_model_get_vocab(mdl)

    def tok(text: str) -> list[int]:
        data = text.encode()
        buf = (C.llama_token * (len(data) + 8))()
        return list(buf[:C.llama_tokenize(vocab, data, len(data), buf, len(buf), True, True)])

    ta, tb = tok(a), tok(b)
    C.llama_model_free(mdl)
    return next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))


# ---------------------------------------------------------------------------------------- servers


class Server:
    """A server subprocess on 127.0.0.1; `body(model_kind)` adapts a request to it."""

    name = "server"
    per_request_adapters = True

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path, ready_path: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ready_path = ready_path

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def adapt(self, body: dict[str, Any], adapter: str | None) -> dict[str, Any]:
        raise NotImplementedError


class OurServer(Server):
    name = "ours"

    def adapt(self, body: dict[str, Any], adapter: str | None) -> dict[str, Any]:
        return {**body, "model": adapter or "base"}


class LlamaServer(Server):
    name = "llama-server"
    LORA_IDS = {"bench-a": 0, "bench-b": 1}

    def adapt(self, body: dict[str, Any], adapter: str | None) -> dict[str, Any]:
        out = {**body, "model": "base"}
        if adapter:
            out["lora"] = [{"id": self.LORA_IDS[adapter], "scale": 1.0}]
        return out


class LcpServer(Server):
    name = "llama-cpp-python"
    per_request_adapters = False

    def adapt(self, body: dict[str, Any], adapter: str | None) -> dict[str, Any]:
        assert adapter is None, "llama-cpp-python's server has no per-request adapters"
        return {**body, "model": "base"}


# ---------------------------------------------------------------------------------------- client


@dataclass
class Result:
    ok: bool
    ttft: float = float("nan")
    latency: float = float("nan")
    completion_tokens: int = 0
    chunks: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    error: str = ""

    @property
    def decode_tok_s(self) -> float:
        gen = self.latency - self.ttft
        return (self.completion_tokens - 1) / gen if self.completion_tokens > 1 and gen > 0 else float("nan")


async def stream_chat(client: httpx.AsyncClient, srv: Server, messages: list[dict[str, str]], max_tokens: int,
                      adapter: str | None) -> Result:
    body = srv.adapt({"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
                      "stream_options": {"include_usage": True}}, adapter)
    t0 = time.perf_counter()
    res = Result(ok=False)
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                obj = json.loads(payload)
                if "error" in obj:
                    res.error = str(obj["error"])[:200]
                    return res
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        if not parts:
                            res.ttft = time.perf_counter() - t0
                        parts.append(piece)
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - t0
    res.chunks = len(parts)
    res.text = "".join(parts)
    res.completion_tokens = int(usage["completion_tokens"]) if usage else len(parts)
    if usage:
        res.prompt_tokens = int(usage.get("prompt_tokens", 0))
        res.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0)
    res.ok = bool(parts)
    if not parts:
        res.error = "the stream ended without any content (cut off by the server?)"
    return res


CONTENT = re.compile(rb'"content":\s?"(?!")')  # a non-empty content delta, with or without a space


def lean_stream(srv: Server, messages: list[dict[str, str]], max_tokens: int) -> float:
    """Single-stream decode tok/s seen by a minimal client: HTTP/1.1 over a plain socket, content
    deltas counted in the raw bytes, no JSON parsing. The standard client (httpx, JSON per chunk)
    costs about 0.4 ms of CPU per token on the cores llama.cpp computes on; this one a few us, so the
    pair of numbers separates the server's per-token cost from the client's."""
    body = json.dumps(srv.adapt({"messages": messages, "temperature": 0, "max_tokens": max_tokens,
                                 "stream": True}, None)).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(body)) + body)
        buf, scanned, n, t_first, t_last = b"", 0, 0, None, 0.0
        while chunk := sock.recv(65536):
            now = time.perf_counter()
            buf += chunk
            k = sum(1 for m in CONTENT.finditer(buf, max(0, scanned - 16)) if m.end() > scanned)
            scanned = len(buf)
            if k:
                if t_first is None:
                    t_first = now
                    k -= 1  # the rate is over the tokens after the first
                n += k
                t_last = now
    return n / (t_last - t_first) if n and t_first is not None and t_last > t_first else float("nan")


_uid = iter(range(1, 1 << 30))


def task_messages() -> list[dict[str, str]]:
    """A fresh prompt per request (a unique tag), so no request reuses another's full prompt."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Job {next(_uid)}. {TASK}"}]


async def load(srv: Server, n_clients: int, rounds: int, max_tokens: int,
               adapter_of: Callable[[int], str | None], stagger_s: float = 0.0) -> dict[str, Any]:
    """`n_clients` concurrent streaming clients, each sending `rounds` requests back to back; client i
    starts `i * stagger_s` seconds after client 0."""
    limits = httpx.Limits(max_connections=n_clients + 2, max_keepalive_connections=n_clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def one_client(i: int) -> list[Result]:
            await asyncio.sleep(i * stagger_s)
            return [await stream_chat(client, srv, task_messages(), max_tokens, adapter_of(i)) for _ in range(rounds)]

        t0 = time.perf_counter()
        per = await asyncio.gather(*(one_client(i) for i in range(n_clients)))
        wall = time.perf_counter() - t0
    results = [r for rs in per for r in rs]
    good = [r for r in results if r.ok]
    toks = sum(r.completion_tokens for r in good)
    return {
        "clients": n_clients, "requests": len(results), "errors": [r.error for r in results if not r.ok][:3],
        "wall_s": wall, "agg_tok_s": toks / wall if wall > 0 else float("nan"),
        "completion_tokens_min": min((r.completion_tokens for r in good), default=0),
        "completion_tokens_max": max((r.completion_tokens for r in good), default=0),
        "ttft_p50": med([r.ttft for r in good]), "ttft_p95": pct([r.ttft for r in good], 95),
        "latency_p50": med([r.latency for r in good]), "latency_p95": pct([r.latency for r in good], 95),
        "decode_tok_s_p50": med([r.decode_tok_s for r in good]),
    }


async def conversation(srv: Server, turns: int, max_tokens: int, adapter: str | None) -> dict[str, Any]:
    """One client; the whole history is re-sent every turn. TTFT and prompt size per turn."""
    tag = next(_uid)
    messages = [{"role": "system", "content": f"{SYSTEM} (conversation {tag})"}]
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        for t in range(turns):
            messages.append({"role": "user", "content": TURNS[t % len(TURNS)]})
            r = await stream_chat(client, srv, messages, max_tokens, adapter)
            if not r.ok:
                out.append({"turn": t + 1, "error": r.error})
                break
            out.append({"turn": t + 1, "ttft": r.ttft, "prompt_tokens": r.prompt_tokens,
                        "cached_tokens": r.cached_tokens, "completion_tokens": r.completion_tokens})
            messages.append({"role": "assistant", "content": r.text})
    return {"turns": out}


async def measure(srv: Server, a: argparse.Namespace, deadline: float,
                  raw_single: Callable[[], float] | None = None) -> dict[str, Any]:
    """Every scenario against one server. Past `deadline` the remaining scenarios are skipped (and
    listed under "skipped"), so a slow machine still yields the scenarios that finished.

    `raw_single` (the raw loop's single-sequence tok/s) is measured right before and right after the
    server's single-stream scenario: this machine's raw decode rate drifts by 10-15% over minutes, so
    the single-stream ratio is taken against the raw loop measured next to it, not minutes earlier."""
    res: dict[str, Any] = {"uptime_start": uptime(), "skipped": []}
    async with httpx.AsyncClient(timeout=60) as client:  # warm-up: base and both adapters loaded
        for ad in (None, "bench-a", "bench-b") if srv.per_request_adapters else (None,):
            w = await stream_chat(client, srv, task_messages(), 8, ad)
            if not w.ok:
                raise RuntimeError(f"{srv.name}: warm-up request failed ({ad}): {w.error}")
    nmax = max(a.clients)
    mixed = lambda i: "bench-a" if i % 2 == 0 else "bench-b"  # noqa: E731
    phases: list[tuple[str, Callable[[], Any]]] = [("single", lambda: load(srv, 1, a.rounds, a.tokens, lambda i: None))]
    phases += [(f"agg_{n}", (lambda n=n: load(srv, n, a.rounds, a.tokens, lambda i: None))) for n in a.clients if n > 1]
    phases += [("same_adapter", lambda: load(srv, nmax, a.rounds, a.tokens, lambda i: "bench-a")),
               ("mixed_adapter", lambda: load(srv, nmax, a.rounds, a.tokens, mixed)),
               ("staggered", lambda: load(srv, nmax, a.rounds, a.tokens, lambda i: None, a.stagger)),
               ("conv_base", lambda: conversations(srv, a, None)),
               ("conv_adapter", lambda: conversations(srv, a, "bench-a"))]
    for key, run in phases:
        if a.only and key not in a.only:
            continue
        if not srv.per_request_adapters and key in ("same_adapter", "mixed_adapter", "conv_adapter"):
            continue
        if time.monotonic() > deadline:
            res["skipped"].append(key)
            continue
        if key == "single" and raw_single is not None:
            res["raw_single_before"] = raw_single()
        res[key] = await run()
        if key == "single":
            res["agg_1"] = res["single"]
            res["single_lean_tok_s"] = med([lean_stream(srv, task_messages(), a.tokens) for _ in range(a.rounds)])
            if raw_single is not None:
                res["raw_single_after"] = raw_single()
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res[key].items() if k != "runs"}
        print(f"[bench] {srv.name} {key}: {json.dumps(shown)}", flush=True)
    if res["skipped"]:
        print(f"[bench] {srv.name}: --max-seconds reached, skipped {res['skipped']}", flush=True)
    res["uptime_end"] = uptime()
    return res


async def conversations(srv: Server, a: argparse.Namespace, adapter: str | None) -> dict[str, Any]:
    runs = [await conversation(srv, a.turns, a.turn_tokens, adapter) for _ in range(a.conversations)]
    firsts = [c["turns"][0]["ttft"] for c in runs if c["turns"] and "ttft" in c["turns"][0]]
    lasts = [c["turns"][-1]["ttft"] for c in runs if len(c["turns"]) == a.turns and "ttft" in c["turns"][-1]]
    return {"runs": runs, "ttft_turn1": med(firsts), "ttft_last": med(lasts),
            "prompt_tokens_last": med([c["turns"][-1].get("prompt_tokens", 0) for c in runs if c["turns"]]),
            "cached_tokens_last": med([c["turns"][-1].get("cached_tokens", 0) for c in runs if c["turns"]])}


# ---------------------------------------------------------------------------------------- orchestration


def start_ours(a: argparse.Namespace, work: Path, adapters_dir: Path) -> OurServer:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update({
        "CHAT_MODEL": str(a.model), "CHAT_PARALLEL": str(a.parallel), "CHAT_N_THREADS": str(a.threads),
        "CHAT_N_CTX": str(a.n_ctx), "CHAT_ADAPTERS_DIR": str(adapters_dir), "CHAT_PROMPTS_DIR": str(work / "prompts"),
        "CHAT_DB_PATH": str(work / "log.sqlite3"), "CHAT_ADAPTER_WATCH_INTERVAL_S": "0",
    })  # fmt: skip
    if a.lanes is not None:
        env["CHAT_LANES"] = str(a.lanes)
    (work / "prompts").mkdir(exist_ok=True)
    srv = OurServer([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--log-level",
                     "warning"], env, port, work / "ours.log", "/ready")
    srv.wait_ready(120)
    return srv


def start_llama(a: argparse.Namespace, work: Path, loras: list[Path]) -> LlamaServer:
    port = free_port()
    argv = [str(a.llama_server), "-m", str(a.model), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(a.parallel), "-t", str(a.threads), "-c", str(a.parallel * a.n_ctx), "--no-webui"]
    for p in loras:
        argv += ["--lora", str(p)]
    argv.append("--lora-init-without-apply")
    srv = LlamaServer(argv, dict(os.environ), port, work / "llama-server.log", "/health")
    srv.wait_ready(120)
    return srv


def start_lcp(a: argparse.Namespace, work: Path) -> LcpServer:
    port = free_port()
    argv = [str(a.lcp_python), "-m", "llama_cpp.server", "--model", str(a.model), "--model_alias", "base",
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(a.threads),
            "--n_threads_batch", str(a.threads), "--n_ctx", str(a.n_ctx)]
    srv = LcpServer(argv, dict(os.environ), port, work / "lcp-server.log", "/v1/models")
    srv.wait_ready(120)
    return srv


def ratio(x: float, y: float) -> float:
    return x / y if y and y == y and x == x else float("nan")


class Missing(dict):
    """A scenario dict whose absent scenarios (skipped at the deadline) read as all-NaN."""

    def __missing__(self, key: str) -> dict[str, Any]:
        return _NanDict()


class _NanDict(dict):
    def __missing__(self, key: str) -> float:
        return float("nan")


def raw_ref(s: dict[str, Any], raw: dict[str, Any]) -> float:
    """The raw single-sequence rate to compare a server's single stream with: the mean of the raw
    loop measured just before and just after that scenario, else the one at the start of the run."""
    around = [v for v in (s.get("raw_single_before"), s.get("raw_single_after")) if isinstance(v, float) and v == v]
    return statistics.mean(around) if around else raw["single_tok_s"]


def summarise(r: dict[str, Any], a: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """Rows: (metric, value, ratio, target)."""
    raw = r["raw"]
    ours = Missing(r["ours"]) if r.get("ours") else None
    ll = Missing(r["llama"]) if r.get("llama") else None
    lcp = Missing(r["lcp"]) if r.get("lcp") else None
    nmax = max(a.clients)
    rows: list[tuple[str, str, str, str]] = []

    def f(x: float, unit: str = "") -> str:
        return "n/a" if x != x else (f"{x:.1f}{unit}" if unit in (" tok/s", "") else f"{x * 1000:.0f} ms")

    def check(val: float, ok: bool) -> str:
        return "n/a" if val != val else ("met" if ok else "NOT met")

    rows.append(("raw: prompt prefill (1 seq, %d tok)" % raw["prompt_tokens"], f(raw["single_prefill_s"], "s"), "", ""))
    rows.append((f"raw: prompt prefill ({raw['batch_seqs']} seqs, one batch)", f(raw["batch_prefill_s"], "s"), "", ""))
    rows.append(("raw: decode, 1 seq", f(raw["single_tok_s"], " tok/s"), "", ""))
    rows.append((f"raw: decode, {raw['batch_seqs']} seqs in one batch (aggregate)", f(raw["batch_tok_s"], " tok/s"),
                 "", ""))
    for name, s in (("ours", ours), ("llama-server", ll), ("llama-cpp-python", lcp)):
        if not s:
            continue
        ref = raw_ref(s, raw)
        rows.append((f"{name}: single-stream decode", f(s["single"]["decode_tok_s_p50"], " tok/s"),
                     f"{ratio(s['single']['decode_tok_s_p50'], ref):.1%} of raw {ref:.1f} tok/s "
                     f"(before / after: {s.get('raw_single_before', float('nan')):.1f} / "
                     f"{s.get('raw_single_after', float('nan')):.1f})", ""))
        lean = s.get("single_lean_tok_s", float("nan"))
        rows.append((f"{name}: single-stream decode, minimal socket client (no JSON parsing)", f(lean, " tok/s"),
                     f"{ratio(lean, ref):.1%} of raw", ""))
        rows.append((f"{name}: single-stream TTFT p50", f(s["single"]["ttft_p50"], "s"), "", ""))
        for n in a.clients:
            g = s[f"agg_{n}"]
            rows.append((f"{name}: aggregate, {n} clients", f(g["agg_tok_s"], " tok/s"),
                         f"{ratio(g['agg_tok_s'], raw['batch_tok_s']):.1%} of raw {raw['batch_seqs']}-batch"
                         if n == nmax else "", ""))
        rows.append((f"{name}: TTFT p50 / p95, {nmax} clients, burst (base)",
                     f"{f(s[f'agg_{nmax}']['ttft_p50'], 's')} / {f(s[f'agg_{nmax}']['ttft_p95'], 's')}", "", ""))
        rows.append((f"{name}: TTFT p50 / p95, {nmax} clients, staggered {a.stagger:g} s (base)",
                     f"{f(s['staggered']['ttft_p50'], 's')} / {f(s['staggered']['ttft_p95'], 's')}", "", ""))
        sa, mx = s["same_adapter"], s["mixed_adapter"]
        rows.append((f"{name}: {nmax} clients same adapter: aggregate / p95 latency",
                     f"{f(sa['agg_tok_s'], ' tok/s')} / {f(sa['latency_p95'], 's')}", "", ""))
        rows.append((f"{name}: {nmax} clients mixed A/B: aggregate / p95 latency",
                     f"{f(mx['agg_tok_s'], ' tok/s')} / {f(mx['latency_p95'], 's')}", "", ""))
        for lab, key in (("base", "conv_base"), ("adapter", "conv_adapter")):
            c = s[key]
            rows.append((f"{name}: conversation TTFT turn 1 / turn {a.turns} ({lab})",
                         f"{f(c['ttft_turn1'], 's')} / {f(c['ttft_last'], 's')}", "", ""))
        toks = [s[k]["completion_tokens_min"] for k in ("single", "same_adapter", "mixed_adapter")]
        toks += [s[f"agg_{n}"]["completion_tokens_min"] for n in a.clients]
        toks = [t for t in toks if t == t]
        rows.append((f"{name}: min completion_tokens over load runs", str(min(toks, default="n/a")),
                     f"of {a.tokens} asked", ""))
        if s.get("skipped"):
            rows.append((f"{name}: scenarios skipped at --max-seconds", ", ".join(s["skipped"]), "", ""))
    if ours:
        v = ratio(ours["single"]["decode_tok_s_p50"], raw_ref(ours, raw))
        rows.append(("TARGET ours single-stream decode / raw loop", f"{v:.1%}", ">= 95%", check(v, v >= 0.95)))
        if ll:
            v = ratio(ours[f"agg_{nmax}"]["agg_tok_s"], ll[f"agg_{nmax}"]["agg_tok_s"])
            rows.append((f"TARGET ours aggregate@{nmax} / llama-server aggregate@{nmax}", f"{v:.2f}", ">= 1",
                         check(v, v >= 1.0)))
        if lcp:
            v = ratio(ours[f"agg_{nmax}"]["agg_tok_s"], lcp[f"agg_{nmax}"]["agg_tok_s"])
            rows.append((f"TARGET ours aggregate@{nmax} / llama-cpp-python server aggregate@{nmax}", f"{v:.2f}",
                         ">= 2.5", check(v, v >= 2.5)))
        v = ratio(ours["mixed_adapter"]["agg_tok_s"], ours["same_adapter"]["agg_tok_s"])
        rows.append(("TARGET ours mixed / same-adapter aggregate", f"{v:.1%}", ">= 85%", check(v, v >= 0.85)))
        v = ratio(ours["mixed_adapter"]["latency_p95"], ours["same_adapter"]["latency_p95"])
        rows.append(("ours p95 latency mixed / same-adapter", f"{v:.2f}", "(report)", ""))
        for lab, key in (("base", "conv_base"), ("adapter", "conv_adapter")):
            v = ratio(ours[key]["ttft_last"], ours[key]["ttft_turn1"])
            rows.append((f"TARGET ours TTFT turn {a.turns} / turn 1 ({lab})", f"{v:.2f}", "<= 1.2", check(v, v <= 1.2)))
        v = ours[f"agg_{nmax}"]["ttft_p95"]
        rows.append((f"TARGET ours TTFT p95 at {nmax} clients, burst", f(v, "s"), "< 500 ms", check(v, v < 0.5)))
        v = ours["staggered"]["ttft_p95"]
        rows.append((f"TARGET ours TTFT p95 at {nmax} clients, staggered", f(v, "s"), "< 500 ms", check(v, v < 0.5)))
        v = raw["batch_prefill_s"]
        rows.append((f"raw prefill of the {raw['batch_seqs']} prompts (the burst's floor without shared prefixes)",
                     f(v, "s"), "(reference)", ""))
        v = raw.get("batch_prefill_shared_s", float("nan"))
        rows.append((f"raw prefill of the {raw['batch_seqs']} prompts, their common {raw.get('shared_prefix_tokens', 0)} "
                     "tokens computed once and copied (the burst's floor with shared prefixes)", f(v, "s"),
                     "(reference)", ""))
    if ll:
        v = ratio(ll["mixed_adapter"]["agg_tok_s"], ll["same_adapter"]["agg_tok_s"])
        rows.append(("llama-server mixed / same-adapter aggregate", f"{v:.1%}", "(reference)", ""))
        for lab, key in (("base", "conv_base"), ("adapter", "conv_adapter")):
            v = ratio(ll[key]["ttft_last"], ll[key]["ttft_turn1"])
            rows.append((f"llama-server TTFT turn {a.turns} / turn 1 ({lab})", f"{v:.2f}", "(reference)", ""))
    return rows


def table(rows: list[tuple[str, str, str, str]]) -> str:
    out = ["| metric | value | ratio / target | status |", "|---|---|---|---|"]
    out += [f"| {m} | {v} | {r} | {s} |" for m, v, r, s in rows]
    return "\n".join(out)


def write_results(path: Path, block: str) -> None:
    """Append `block` at the end of the `## Serving` section, leaving every other section alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "## Serving")
    except StopIteration:
        text = text.rstrip("\n") + "\n\n## Serving\n\n" + block.strip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        section = "\n".join(lines[start:end]).rstrip("\n")
        new = section + "\n\n" + block.strip("\n") + "\n"
        rest = "\n".join(lines[end:])
        text = "\n".join(lines[:start]) + ("\n" if start else "") + new + ("\n" + rest + "\n" if rest else "")
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=128, help="max_tokens per request / raw decode length")
    p.add_argument("--clients", default="1,4,8", help="comma-separated concurrent client counts")
    p.add_argument("--rounds", type=int, default=3, help="requests per client in each load run")
    p.add_argument("--turns", type=int, default=10, help="conversation turns (TTFT of the last vs the first)")
    p.add_argument("--turn-tokens", type=int, default=48, help="max_tokens per conversation turn")
    p.add_argument("--conversations", type=int, default=2, help="conversations per path (medians reported)")
    p.add_argument("--stagger", type=float, default=0.5, help="seconds between client starts, staggered scenario")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lanes", type=int, default=None, help="CHAT_LANES for our server (default: the server's own)")
    p.add_argument("--n-ctx", type=int, default=1024, help="context per sequence (llama-server gets parallel*n_ctx)")
    p.add_argument("--only", default="", help="comma-separated scenarios to run (single, agg_N, same_adapter, "
                   "mixed_adapter, staggered, conv_base, conv_adapter); default all")
    p.add_argument("--skip-llama-server", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-lcp", action="store_true", help="skip llama-cpp-python's own server")
    p.add_argument("--lcp-python", type=Path, default=ROOT / "bench" / ".work" / "lcp-venv" / "bin" / "python",
                   help="python of the venv made by bench/lcp_server.sh")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    p.add_argument("--max-seconds", type=float, default=1200, help="hard cap for the whole run")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--label", default="", help="run label written with the results")
    a = p.parse_args(argv)
    a.clients = sorted({int(x) for x in a.clients.split(",") if x.strip()})
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    if not a.model.exists():
        p.error(f"model not found: {a.model} (run `make model` or pass --model)")
    if not a.skip_llama_server and not a.llama_server.exists():
        p.error(f"{a.llama_server} missing: run bench/llama_server.sh first, or pass --skip-llama-server")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    deadline = time.monotonic() + a.max_seconds
    # hard stop even if something hangs outside the asyncio deadline checks
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("--max-seconds reached")))
    signal.alarm(int(a.max_seconds * 1.5) + 120)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = WORK / f"serve-{stamp}-{os.getpid()}"
    work.mkdir(parents=True)
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "uptime_start": uptime(),
                              "argv": sys.argv, "args": {k: str(v) for k, v in vars(a).items()}}
    print(f"[bench] {result['uptime_start']}", flush=True)

    info = BaseModelInfo.load(a.model)
    adapters_dir = work / "adapters"
    adapters_dir.mkdir()
    loras = [publish_lora(adapters_dir, "bench-a", info, seed=1, tmp=work),
             publish_lora(adapters_dir, "bench-b", info, seed=2, tmp=work)]
    prompt = ChatTemplate.from_model(info).render(task_messages(), add_generation_prompt=True)

    print("[bench] raw llama_decode loop ...", flush=True)
    shared = common_prefix_tokens(a.model, prompt, ChatTemplate.from_model(info).render(
        task_messages(), add_generation_prompt=True))
    result["raw"] = raw_baseline(a.model, prompt, n_tokens=a.tokens, n_seqs=max(a.clients), n_threads=a.threads,
                                 n_ctx=a.n_ctx, n_batch=512, shared_prefix=shared)
    print(f"[bench] raw: {json.dumps(result['raw'])}", flush=True)

    def raw_single() -> float:
        r = raw_baseline(a.model, prompt, n_tokens=a.tokens, n_seqs=1, n_threads=a.threads, n_ctx=a.n_ctx,
                         n_batch=512)
        print(f"[bench] raw single-sequence decode: {r['single_tok_s']:.1f} tok/s", flush=True)
        return r["single_tok_s"]

    servers: list[tuple[str, Callable[[], Server]]] = []
    if not a.skip_ours:
        servers.append(("ours", lambda: start_ours(a, work, adapters_dir)))
    if not a.skip_llama_server:
        servers.append(("llama", lambda: start_llama(a, work, loras)))
    if not a.skip_lcp:
        servers.append(("lcp", lambda: start_lcp(a, work)))
    for i, (key, start) in enumerate(servers):
        print(f"[bench] {key}: starting ...", flush=True)
        srv = start()
        share = (deadline - time.monotonic()) / (len(servers) - i)  # each server gets its share of the time
        try:
            result[key] = asyncio.run(measure(srv, a, time.monotonic() + share, raw_single))
        finally:
            srv.stop()
    signal.alarm(0)
    result["uptime_end"] = uptime()
    rows = summarise(result, a)
    out_json = work / "result.json"
    out_json.write_text(json.dumps(result, indent=2, default=str))
    cmd = " ".join(["bench/bench_serve.py", *sys.argv[1:]])
    block = "\n".join([
        f"### Run {result['started']}{' (' + a.label + ')' if a.label else ''}",
        "",
        f"Command: `.venv/bin/python {cmd}`  ",
        f"Load at start: `{result['uptime_start']}`  ",
        f"Load at end: `{result['uptime_end']}`  ",
        f"Settings: model {a.model.name}, {a.parallel} slots x {a.n_ctx} ctx, {a.threads} threads, "
        f"max_tokens {a.tokens}, clients {','.join(map(str, a.clients))}, {a.rounds} requests per client per load "
        f"run, {a.turns}-turn conversations ({a.turn_tokens} tokens per turn) x {a.conversations}.",
        "",
        table(rows),
        "",
    ])
    print("\n" + block, flush=True)
    print(f"[bench] raw data: {out_json}")
    if not a.no_results:
        write_results(a.results, block)
        print(f"[bench] appended to {a.results} (## Serving)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
