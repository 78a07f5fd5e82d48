"""Compare the prompt path and the finetuned path on held-out questions, scored by the house-style check.

    python examples/fractional-cto/compare.py --server http://127.0.0.1:8000     # through the server's routes
    python examples/fractional-cto/compare.py --offline --adapter adapters/cto-house-style/v1.gguf

`--server` asks the running server on routes `cto-prompt` and `cto-finetuned` (official openai
client). `--offline` does the same in-process with llama.cpp (greedy decoding): the prompt path
renders the route's system prompt before the question, the finetuned path renders the question
alone with the adapter attached, exactly as the server's routes do. The questions come from the
generator with a seed the training data did not use.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from generate import conversation  # noqa: E402
from style_check import is_house_style, style_problems  # noqa: E402


def questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [conversation(rng)[1][0]["content"] for _ in range(n)]


def ask_server(url: str, route: str, question: str, max_tokens: int) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=route, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0].message.content or ""


def run_offline(model: Path, adapter: Path, qs: list[str], max_tokens: int, n_ctx: int) -> dict[str, list[str]]:
    from server.chat_template import ChatTemplate, render_system_prompt
    from server.gguf_info import BaseModelInfo
    from trainer.llama_opt import InferenceSession

    template = ChatTemplate.from_model(BaseModelInfo.load(model, sha256="-"))
    system = render_system_prompt((HERE / "cto-house-style.j2").read_text(encoding="utf-8"), {})
    out: dict[str, list[str]] = {"cto-prompt": [], "cto-finetuned": []}
    with InferenceSession(model, n_ctx=n_ctx) as s:
        for q in qs:
            prompt = template.render([{"role": "system", "content": system}, {"role": "user", "content": q}])
            out["cto-prompt"].append(s.generate(prompt, max_tokens=max_tokens))
    with InferenceSession(model, n_ctx=n_ctx, adapter=adapter) as s:
        for q in qs:
            out["cto-finetuned"].append(s.generate(template.render([{"role": "user", "content": q}]), max_tokens=max_tokens))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--server", help="base URL of a running server")
    mode.add_argument("--offline", action="store_true", help="in-process with llama.cpp, no server")
    p.add_argument("--adapter", type=Path, help="adapter GGUF for --offline")
    p.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--n", type=int, default=20, help="questions")
    p.add_argument("--seed", type=int, default=2027, help="question seed (not the training seed)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--show", type=int, default=1, help="answers to print per path")
    p.add_argument("--json", type=Path, help="write every answer and score here")
    args = p.parse_args(argv)
    qs = questions(args.n, args.seed)
    t0 = time.perf_counter()
    if args.offline:
        if args.adapter is None:
            p.error("--offline needs --adapter")
        answers = run_offline(args.model, args.adapter, qs, args.max_tokens, n_ctx=1024)
    else:
        answers = {r: [ask_server(args.server, r, q, args.max_tokens) for q in qs] for r in ("cto-prompt", "cto-finetuned")}
    print(f"{len(qs)} held-out questions, {time.perf_counter() - t0:.0f}s")
    for route, replies in answers.items():
        share = sum(map(is_house_style, replies)) / len(replies)
        print(f"{route:>14}: house style {share:.0%}")
        for reply in replies[: args.show]:
            print("    " + reply.replace("\n", "\n    ")[:600])
            print("    problems:", style_problems(reply) or "none")
    if args.json:
        args.json.write_text(json.dumps({"questions": qs, "answers": answers}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
