"""What does copying a slot's KV from one lane (llama.cpp context) to another cost?

engine._borrow_prefix copies a shared prefix across lanes with llama_state_seq_get_data (donor's
context) and llama_state_seq_set_data (receiver's context): a host-memory copy of every KV cell the
donor holds. This times that copy for donors of several lengths, next to prefilling the same number of
tokens, which is what the copy saves.

    .venv/bin/python bench/lane_copy_cost.py
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


def main() -> int:
    eng = E.Engine(E.EngineConfig(MODEL, n_ctx=4096, parallel=2, lanes=2, n_batch=512))
    eng.start()

    def job() -> list[str]:
        out = []
        donor, recv = eng.lanes[0].slots[0], eng.lanes[1].slots[0]
        toks = eng.tokenize_text("the quick brown fox jumps over the lazy dog " * 500)
        for n in (64, 512, 2048, 4000):
            C.llama_memory_seq_rm(donor.lane.mem, donor.seq, -1, -1)
            b = donor.lane.batch
            prefill = 0.0
            for start in range(0, n, 512):  # fill the donor with n tokens
                k = min(512, n - start)
                for i in range(k):
                    eng._put(b, i, toks[start + i], start + i, donor.seq, i == k - 1)
                b.n_tokens = k
                t0 = time.perf_counter()
                assert C.llama_decode(donor.lane.ctx, b) == 0
                prefill += time.perf_counter() - t0
            donor.kv_tokens = toks[:n]
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert eng._copy_across_lanes(donor, recv)
                times.append(time.perf_counter() - t0)
            ms = 1000 * statistics.median(times)
            out.append(f"| {n} | {ms:.2f} ms | {1000 * ms / n:.1f} us | {1000 * prefill:.0f} ms "
                       f"({1000 * prefill / n:.2f} ms/token) |")
        return out

    try:
        rows = eng._call(job).result(timeout=600)
    finally:
        eng.close()
    print("| donor tokens | cross-lane copy | per token | prefill of the same tokens |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
