"""The engine alone, in-process (no HTTP): 8 clients on one adapter vs half on A and half on B.

Separates what the scheduler does from what the HTTP/SSE layer and the client add: same prompts,
same rounds, same token counts as bench/bench_serve.py's same_adapter / mixed_adapter scenarios,
but the clients are coroutines reading GenerationStreams directly. Records every lane step and
prints a breakdown (steps, switches, sequences per step, median time between steps).

    .venv/bin/python bench/engine_mix.py [--lanes 1,2] [--flash-attn off,on] [--repeats 3] [--turn-steps 48]

`--flash-attn on` measures what the engine's default (off, for batch-invariant output) costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_serve import DEFAULT_MODEL, task_messages, make_lora_file  # noqa: E402
from adapter_chat import engine as E  # noqa: E402
from adapter_chat.chat_template import ChatTemplate  # noqa: E402
from adapter_chat.gguf_info import BaseModelInfo  # noqa: E402


class Trace(E._NullObserver):
    """Records every lane step: (time, batch tokens, decoding sequences, adapter set switched)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int, int, bool]] = []

    def on_step(self, batch_tokens: int, decode_seqs: int, switched: bool) -> None:
        self.steps.append((time.perf_counter(), batch_tokens, decode_seqs, switched))


async def scenario(eng: E.Engine, tmpl: ChatTemplate, handles: dict[str, E.LoraHandle], adapter_of,
                   clients: int, rounds: int, tokens: int) -> dict:
    params = E.SamplingParams(max_tokens=tokens, temperature=0.0)

    async def client(i: int) -> int:
        n = 0
        for _ in range(rounds):
            prompt = eng.tokenize(tmpl.render_segments(task_messages(), add_generation_prompt=True))
            name = adapter_of(i)
            ads = ((handles[name], 1.0),) if name else ()
            async for ev in eng.submit(prompt, params, ads):
                if ev.final:
                    n += ev.completion_tokens
        return n

    trace: Trace = eng.observer  # type: ignore[assignment]
    start = len(trace.steps)
    t0 = time.perf_counter()
    toks = sum(await asyncio.gather(*(client(i) for i in range(clients))))
    wall = time.perf_counter() - t0
    steps = trace.steps[start:]
    gaps = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
    by_seqs = Counter(s[2] for s in steps)
    prefill_steps = sum(1 for s in steps if s[1] > s[2])
    return {"agg_tok_s": toks / wall, "wall_s": wall, "steps": len(steps), "switches": sum(s[3] for s in steps),
            "prefill_steps": prefill_steps, "decode_seqs_hist": dict(sorted(by_seqs.items())),
            "step_ms_median": 1000 * statistics.median(gaps) if gaps else float("nan")}


def run_engine(a: argparse.Namespace, lanes: int, flash_attn: bool, info: BaseModelInfo, tmpl: ChatTemplate,
               tmp: Path) -> tuple[float, float]:
    """Median same-adapter and mixed aggregate tok/s for one engine configuration."""
    eng = E.Engine(E.EngineConfig(DEFAULT_MODEL, n_ctx=1024, parallel=8, turn_steps=a.turn_steps, lanes=lanes,
                                  flash_attn=flash_attn), observer=Trace())
    eng.start()

    async def run() -> tuple[float, float]:
        handles = {n: await eng.load_adapter(make_lora_file(tmp / f"{n}.gguf", info, seed=s))
                   for n, s in (("a", 1), ("b", 2))}
        await scenario(eng, tmpl, handles, lambda i: "a" if i % 2 == 0 else "b", 8, 1, 8)  # warm-up
        out: dict[str, list[dict]] = {"same": [], "mixed": []}
        for _ in range(a.repeats):
            for name, fn in (("same", lambda i: "a"), ("mixed", lambda i: "a" if i % 2 == 0 else "b")):
                r = await scenario(eng, tmpl, handles, fn, 8, a.rounds, a.tokens)
                out[name].append(r)
                print(f"lanes={lanes} flash_attn={flash_attn}", name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()},
                      flush=True)
        return (statistics.median(r["agg_tok_s"] for r in out["same"]),
                statistics.median(r["agg_tok_s"] for r in out["mixed"]))

    try:
        return asyncio.run(run())
    finally:
        eng.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--turn-steps", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--lanes", default="1,2", help="comma-separated lane counts to compare")
    p.add_argument("--flash-attn", default="off", help="comma-separated: off (the engine's default), on")
    a = p.parse_args()
    info = BaseModelInfo.load(DEFAULT_MODEL)
    tmpl = ChatTemplate.from_model(info)
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for lanes in (int(x) for x in a.lanes.split(",")):
        for fa in a.flash_attn.split(","):
            same, mixed = run_engine(a, lanes, fa == "on", info, tmpl, tmp)
            rows.append(f"| {lanes} | {fa} | {same:.1f} tok/s | {mixed:.1f} tok/s | {mixed / same:.1%} |")
    print("| lanes | flash attention | same adapter, 8 streams | mixed A/B, 8 streams | mixed / same |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
