"""Per-token decode cost of structured outputs and logprobs vs a plain request, in one run.

The server's engine in process (no HTTP), one sequence at a time, greedy: the same prompts
answered plain, with a JSON-schema grammar in the sampler chain (the converter the server uses),
and with ``logprobs`` and 5 top alternatives per token. The three modes are interleaved round by
round so that a change in the machine's speed hits them alike; the figure is the median over
rounds of (generation wall time / generated tokens), as a ratio to the plain request.

    .venv/bin/python bench/api_overhead.py [--rounds 5] [--tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_serve import DEFAULT_MODEL  # noqa: E402
from adapter_chat.chat_template import ChatTemplate  # noqa: E402
from adapter_chat.engine import Engine, EngineConfig  # noqa: E402
from adapter_chat.gguf_info import BaseModelInfo  # noqa: E402
from adapter_chat.sampling import SamplingParams, json_schema_grammar  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "rating": {"type": "integer"},
        "summary": {"type": "string"},
    },
    "required": ["title", "tags", "rating", "summary"],
}
QUESTIONS = ["Describe a book you like as JSON.", "Describe a city as JSON.", "Describe a film as JSON."]


async def one(eng: Engine, prompt: list[int], params: SamplingParams) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    async for ev in eng.submit(prompt, params):
        if ev.final:
            n = ev.completion_tokens
            if ev.error:
                raise RuntimeError(ev.error)
    return time.perf_counter() - t0, n


async def main_async(args: argparse.Namespace) -> None:
    info = BaseModelInfo.load(DEFAULT_MODEL)
    tmpl = ChatTemplate.from_model(info)
    eng = Engine(EngineConfig(model_path=DEFAULT_MODEL, n_ctx=1024, parallel=1, n_threads=2))
    await asyncio.to_thread(eng.start)
    grammar = json_schema_grammar(SCHEMA)
    modes = {
        "plain": SamplingParams(max_tokens=args.tokens, temperature=0.0),
        "json_schema grammar": SamplingParams(max_tokens=args.tokens, temperature=0.0, grammar=grammar),
        "logprobs, top_logprobs 5": SamplingParams(max_tokens=args.tokens, temperature=0.0, logprobs=5),
    }
    prompts = [eng.tokenize(tmpl.render_segments([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in QUESTIONS]  # fmt: skip
    per_token: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, int] = {m: 0 for m in modes}
    try:
        await one(eng, prompts[0], modes["plain"])  # warm-up
        for _ in range(args.rounds):
            for name, params in modes.items():
                wall, n = 0.0, 0
                for p in prompts:
                    w, k = await one(eng, p, params)
                    wall, n = wall + w, n + k
                per_token[name].append(wall / max(1, n))
                tokens[name] += n
    finally:
        await asyncio.to_thread(eng.close)
    base = statistics.median(per_token["plain"])
    print(f"Command: `python bench/api_overhead.py {' '.join(sys.argv[1:])}`\n")
    print("| request | tokens generated | ms per token (median of rounds) | vs plain |")
    print("|---|---|---|---|")
    for name in modes:
        med = statistics.median(per_token[name])
        print(f"| {name} | {tokens[name]} | {med * 1000:.2f} | {med / base:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=96)
    asyncio.run(main_async(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
