"""What does copying one slot's KV into another cost? (engine.SHARE_WORTH_TOKENS rests on this.)

Times a 1-token llama_decode on slot 2 right after `llama_memory_seq_cp(0 -> 1)` (the copy runs at
the start of that decode) against the same decode with no copy pending, for two context sizes.

    .venv/bin/python bench/kv_copy_cost.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapter_chat import engine as E  # noqa: E402

C = E.C
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(n_ctx: int, reps: int = 20) -> dict[str, float]:
    eng = E.Engine(E.EngineConfig(MODEL, n_ctx=n_ctx, parallel=8, lanes=1))
    eng.start()

    def job() -> dict[str, float]:
        b = eng.lanes[0].batch
        toks = eng.tokenize_text("hello world " * 20)[:40]
        for i, t in enumerate(toks):
            eng._put(b, i, t, i, 0, i == len(toks) - 1)
        b.n_tokens = len(toks)
        C.llama_decode(eng.lanes[0].ctx, b)  # slot 0 holds a 40-token prefix
        times: dict[str, list[float]] = {"no copy": [], "copy pending": []}
        for _ in range(reps):
            for kind in times:
                C.llama_memory_seq_rm(eng.lanes[0].mem, 1, -1, -1)
                if kind == "copy pending":
                    C.llama_memory_seq_cp(eng.lanes[0].mem, 0, 1, -1, -1)
                    C.llama_memory_seq_rm(eng.lanes[0].mem, 1, 30, -1)
                C.llama_memory_seq_rm(eng.lanes[0].mem, 2, -1, -1)
                eng._put(b, 0, toks[0], 0, 2, True)
                b.n_tokens = 1
                t0 = time.perf_counter()
                C.llama_decode(eng.lanes[0].ctx, b)
                times[kind].append(time.perf_counter() - t0)
        return {k: statistics.median(v) * 1e3 for k, v in times.items()}

    try:
        return eng._call(job).result()
    finally:
        eng.close()


if __name__ == "__main__":
    for n_ctx in (1024, 4096):
        r = measure(n_ctx)
        print(f"n_ctx per slot {n_ctx}: 1-token decode {r['no copy']:.2f} ms, with a KV copy pending "
              f"{r['copy pending']:.2f} ms (+{r['copy pending'] - r['no copy']:.2f} ms)")
