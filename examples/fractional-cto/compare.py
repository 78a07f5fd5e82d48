"""Compare the prompt path, the finetuned path and a grammar on held-out questions, scored by the house-style check.

    python examples/fractional-cto/compare.py --server http://127.0.0.1:8000     # through the server's routes
    python examples/fractional-cto/compare.py --offline --adapter adapters/cto-house-style/v1.gguf

Four paths, greedy (`--paths` picks some):
- `cto-prompt`: the route's system prompt, then the question;
- `cto-finetuned`: the question alone, with the adapter attached;
- `cto-grammar`: the prompt path constrained by `house-style.gbnf` (llama-server's `grammar`
  field): the format guaranteed by llama.cpp's grammar sampler, the content the base's own;
- `base`: the question alone.

`--server` asks the running server on routes `cto-prompt` (twice: without and with the grammar),
`cto-finetuned` and `base` (official openai client). `--offline` does the same in process through
the server's own engine, the four paths batched in one run as the server batches them. The questions come from
the generator with a seed the training data did not use, or from `--questions-file`
(`heldout_questions.txt`: 30 questions written by hand, in no training file).

Scores per path: strict house style, strict with three distinct reasons (the target), the opening
and sign-off alone, answers that repeat a line, and answers that share a content word with the
question (on topic).
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
from style_check import (  # noqa: E402
    SIGN_OFF,
    is_house_style,
    is_house_style_distinct,
    on_topic,
    repeats_a_line,
    style_problems,
)


def questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [conversation(rng)[1][0]["content"] for _ in range(n)]


GRAMMAR = (HERE / "house-style.gbnf").read_text(encoding="utf-8")


def ask_server(url: str, route: str, question: str, max_tokens: int, grammar: str | None = None) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=route, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        extra_body={"grammar": grammar} if grammar else None,
    )
    return reply.choices[0].message.content or ""


PATHS = ("cto-prompt", "cto-finetuned", "cto-grammar", "base")


def run_offline(model: Path, adapter: Path, qs: list[str], max_tokens: int,
                paths: tuple[str, ...] = PATHS) -> dict[str, list[str]]:
    """The chosen paths in process, through the server's own engine (same tokenization, batching,
    greedy sampler and grammar sampler as `python -m server`)."""
    from adapter_chat.chat_template import ChatTemplate, render_system_prompt
    from adapter_chat.gguf_info import BaseModelInfo
    from trainer.task_eval import AnswerJob, answer_many

    template = ChatTemplate.from_model(BaseModelInfo.load(model, sha256="-"))
    system = render_system_prompt((HERE / "cto-house-style.j2").read_text(encoding="utf-8"), {})
    user = [[{"role": "user", "content": q}] for q in qs]
    prompted = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in qs]
    kw = {"template": template, "max_tokens": max_tokens}
    every = {"cto-prompt": AnswerJob(prompted), "cto-finetuned": AnswerJob(user, adapter),
             "cto-grammar": AnswerJob(prompted, grammar=GRAMMAR), "base": AnswerJob(user)}  # fmt: skip
    # one engine run, the paths batched together as the server batches them
    return dict(zip(paths, answer_many(model, [every[name] for name in paths], **kw)))


def scores(qs: list[str], replies: list[str]) -> dict[str, float]:
    n = len(replies)
    return {
        "strict": sum(map(is_house_style, replies)) / n,
        "strict_distinct": sum(map(is_house_style_distinct, replies)) / n,
        "bottom_line": sum(r.strip().startswith("**Bottom line:**") for r in replies) / n,
        "sign_off": sum(r.strip().endswith(SIGN_OFF) for r in replies) / n,
        "repeats_a_line": sum(map(repeats_a_line, replies)) / n,
        "on_topic": sum(on_topic(q, r) for q, r in zip(qs, replies)) / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--server", help="base URL of a running server")
    mode.add_argument("--offline", action="store_true", help="in-process with llama.cpp, no server")
    p.add_argument("--adapter", type=Path, help="adapter GGUF for --offline")
    p.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--n", type=int, default=20, help="questions")
    p.add_argument("--seed", type=int, default=2027, help="question seed (not the training seed)")
    p.add_argument("--questions-file", type=Path, help="one question per line instead of generated ones "
                   "(e.g. heldout_questions.txt, written by hand, never read by the trainer)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--show", type=int, default=1, help="answers to print per path")
    p.add_argument("--json", type=Path, help="write every answer and score here")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="only these paths (default: all four)")
    args = p.parse_args(argv)
    if args.questions_file:
        qs = [q.strip() for q in args.questions_file.read_text(encoding="utf-8").splitlines() if q.strip()][: args.n]
    else:
        qs = questions(args.n, args.seed)
    t0 = time.perf_counter()
    if args.offline:
        if args.adapter is None:
            p.error("--offline needs --adapter")
        answers = run_offline(args.model, args.adapter, qs, args.max_tokens, tuple(args.paths))
    else:
        paths = {"cto-prompt": ("cto-prompt", None), "cto-finetuned": ("cto-finetuned", None),
                 "cto-grammar": ("cto-prompt", GRAMMAR), "base": ("base", None)}  # fmt: skip
        answers = {name: [ask_server(args.server, route, q, args.max_tokens, grammar) for q in qs]
                   for name, (route, grammar) in paths.items() if name in args.paths}  # fmt: skip
    print(f"{len(qs)} held-out questions, {time.perf_counter() - t0:.0f}s")
    print("| path | strict house style | strict, 3 distinct reasons | opens with Bottom line | sign-off "
          "| repeats a line | on topic |")
    print("|---|---|---|---|---|---|---|")
    table = {}
    for route, replies in answers.items():
        sc = table[route] = scores(qs, replies)
        print(f"| {route} | {sc['strict']:.0%} | {sc['strict_distinct']:.0%} | {sc['bottom_line']:.0%} "
              f"| {sc['sign_off']:.0%} | {sc['repeats_a_line']:.0%} | {sc['on_topic']:.0%} |")
    for route, replies in answers.items():
        print(f"{route}:")
        for reply in replies[: args.show]:
            print("    " + reply.replace("\n", "\n    ")[:600])
            print("    problems:", style_problems(reply) or "none")
    if args.json:
        args.json.write_text(json.dumps({"questions": qs, "answers": answers, "scores": table}, indent=2),
                             encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
