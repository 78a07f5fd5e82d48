"""Task evaluation: greedy answers to held-out prompts, scored by the adapter's own scorer.

Owns: loading a scorer (``file.py:function`` or ``module:function``), reading held-out prompts
(``gate.score_file``, or the validation items' prompts), and answering them through the server's
own engine (``adapter_chat.engine.Engine``: the same tokenization, batching and sampler chain the
server uses; greedy, the adapter's and the base's prompts all submitted at once to one engine),
with and without the adapter (the base's answers from a ``trainer.base_cache`` where it has
them). The result (:class:`TaskScore`) is the share of answers the scorer accepts, for the gate
and the manifest.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapter_chat.chat_template import ChatTemplate, tokenize_segments
from trainer.base_cache import BaseCache
from trainer.llama_opt import VocabOnly

Scorer = Callable[[str], Any]


@dataclass(frozen=True)
class AnswerJob:
    """Chat prompts to answer greedily on one path: with an adapter (scale 1) or the bare base,
    optionally constrained by a GBNF grammar (root rule ``root``), as a request's ``grammar`` is."""

    prompts: Sequence[list[dict[str, str]]]
    adapter: Path | None = None
    grammar: str | None = None


def load_scorer(spec: str) -> Scorer:
    """``path/to/file.py:function`` or ``package.module:function`` -> the function."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"scorer must be 'file.py:function' or 'module:function', got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise ValueError(f"scorer file {path} does not exist")
        sys.path.insert(0, str(path.parent))  # let the scorer import its neighbours
        try:
            mod_spec = importlib.util.spec_from_file_location(f"_scorer_{path.stem}", path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"scorer {spec!r}: {name} is not a function of {target}")
    return fn


def read_prompts(path: Path) -> list[list[dict[str, str]]]:
    """Held-out prompts: JSONL of ``{"messages": [...]}`` (a trailing assistant message is
    dropped) or ``{"prompt": "..."}``; a ``.txt`` file: one user question per line."""
    out: list[list[dict[str, str]]] = []
    if path.suffix == ".txt":
        return [[{"role": "user", "content": line.strip()}] for line in path.read_text().splitlines() if line.strip()]
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "messages" in rec:
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
            if msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
        elif "prompt" in rec:
            msgs = [{"role": "user", "content": rec["prompt"]}]
        else:
            raise ValueError(f"{path}:{n}: needs 'messages' or 'prompt'")
        out.append(msgs)
    return out


@dataclass
class TaskScore:
    """Mean scorer value of the adapter's and the base's greedy answers to the same prompts."""

    scorer: str
    prompts: int
    adapter: float
    base: float
    max_tokens: int
    seconds: float
    examples: list[dict[str, str]] = field(default_factory=list)
    base_cached: int = 0
    """Base answers read from the base cache (``trainer.base_cache``), not generated now."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_score(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    return max(0.0, min(1.0, float(value)))


MAX_PARALLEL = 16
"""Sequences the scoring engine decodes together (greedy output does not depend on the batch)."""


async def _answer_all(
    model: Path, jobs: Sequence[tuple[AnswerJob, Sequence[list[int]]]], *, max_tokens: int, n_ctx: int, threads: int,
    n_gpu_layers: int,
) -> list[list[str]]:
    from adapter_chat.engine import Engine, EngineConfig, SamplingParams

    total = sum(len(p) for _, p in jobs)
    parallel = max(1, min(MAX_PARALLEL, total))
    engine = Engine(EngineConfig(model_path=model, n_ctx=n_ctx, parallel=parallel, n_threads=threads,
                                 queue_max=total + 1, n_gpu_layers=n_gpu_layers))  # fmt: skip
    await asyncio.to_thread(engine.start)
    try:
        loaded: dict[Path, Any] = {}
        for job, _ in jobs:
            if job.adapter is not None and job.adapter not in loaded:
                loaded[job.adapter] = await engine.load_adapter(job.adapter)

        async def one(job: AnswerJob, tokens: list[int]) -> str:
            handles = ((loaded[job.adapter], 1.0),) if job.adapter is not None else ()
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=job.grammar)
            text = []
            async for ev in engine.submit(tokens, params, adapters=handles):
                text.append(ev.text)
                if ev.error:
                    raise RuntimeError(f"engine error while scoring: {ev.error}")
            return "".join(text)

        flat = await asyncio.gather(*(one(job, p) for job, prompts in jobs for p in prompts))
        out, i = [], 0
        for _, prompts in jobs:
            out.append(list(flat[i : i + len(prompts)]))
            i += len(prompts)
        return out
    finally:
        await asyncio.to_thread(engine.close)


def prompt_tokens(
    base_model: Path, prompts: Sequence[list[dict[str, str]]], *, template: ChatTemplate
) -> list[list[int]]:
    """Chat prompts as token ids, with the generation prompt, tokenized as the server tokenizes
    a request."""
    with VocabOnly(base_model) as vocab:
        return [tokenize_segments(vocab, template.render_segments(list(p), add_generation_prompt=True)) for p in prompts]


def answer_many(
    base_model: Path,
    jobs: Sequence[AnswerJob],
    *,
    template: ChatTemplate,
    max_tokens: int = 200,
    threads: int = 2,
    n_gpu_layers: int = 0,
) -> list[list[str]]:
    """Greedy answers for several jobs (paths) in one engine run: all prompts are submitted at
    once and batched together, as the server batches requests on different adapters and
    grammars. Tokenized as the server tokenizes a request; adapters at scale 1."""
    tokens = prompt_tokens(base_model, [p for job in jobs for p in job.prompts], template=template)
    token_jobs, i = [], 0
    for job in jobs:
        token_jobs.append((job, tokens[i : i + len(job.prompts)]))
        i += len(job.prompts)
    return _answer_tokens(base_model, token_jobs, max_tokens=max_tokens, threads=threads, n_gpu_layers=n_gpu_layers)


def _answer_tokens(
    base_model: Path, token_jobs: Sequence[tuple[AnswerJob, Sequence[list[int]]]], *, max_tokens: int, threads: int,
    n_gpu_layers: int,
) -> list[list[str]]:
    """`answer_many` for prompts already tokenized (one list of token ids per job prompt)."""
    n_ctx = max(len(t) for _, ts in token_jobs for t in ts) + max_tokens + 8
    return asyncio.run(_answer_all(base_model, token_jobs, max_tokens=max_tokens, n_ctx=n_ctx, threads=threads,
                                   n_gpu_layers=n_gpu_layers))  # fmt: skip


def answer_prompts(
    base_model: Path,
    adapter: Path | None,
    prompts: Sequence[list[dict[str, str]]],
    *,
    template: ChatTemplate,
    max_tokens: int = 200,
    threads: int = 2,
) -> list[str]:
    """Greedy answers to chat ``prompts`` through the server's engine, with the adapter at scale
    1 (or the bare base)."""
    return answer_many(base_model, [AnswerJob(prompts, adapter)], template=template, max_tokens=max_tokens,
                       threads=threads)[0]


def score_task(
    base_model: Path,
    adapter: Path,
    prompts: Sequence[list[dict[str, str]]],
    *,
    scorer: str,
    template: ChatTemplate,
    max_tokens: int = 200,
    threads: int = 2,
    n_gpu_layers: int = 0,
    n_examples: int = 3,
    base_cache: BaseCache | None = None,
) -> TaskScore:
    """Answer ``prompts`` greedily with the adapter and with the bare base, through the server's
    engine, and score every answer with ``scorer``. With a ``base_cache``, the base's answers
    to prompts it holds are read from it; the rest are generated (with the adapter's, in one
    engine run) and stored."""
    fn = load_scorer(scorer)
    t0 = time.perf_counter()
    tokens = prompt_tokens(base_model, prompts, template=template)  # once: the cache's keys and the engine's input
    requests = [{"tokens": t, "max_tokens": max_tokens} for t in tokens]
    answers_base: list[Any] = [base_cache.get("answer", r) if base_cache is not None else None for r in requests]
    missing = [i for i, a in enumerate(answers_base) if a is None]
    jobs = [(AnswerJob(prompts, adapter), tokens)]
    if missing:
        jobs.append((AnswerJob([prompts[i] for i in missing]), [tokens[i] for i in missing]))
    answers_ad, *fresh = _answer_tokens(base_model, jobs, max_tokens=max_tokens, threads=threads,
                                        n_gpu_layers=n_gpu_layers)  # fmt: skip
    for i, answer in zip(missing, fresh[0] if fresh else ()):
        answers_base[i] = answer
        if base_cache is not None:
            base_cache.put("answer", requests[i], answer)
    ad = [_as_score(fn(a)) for a in answers_ad]
    base = [_as_score(fn(a)) for a in answers_base]
    examples = [
        {"prompt": p[-1]["content"], "adapter": a, "base": b}
        for p, a, b in list(zip(prompts, answers_ad, answers_base))[:n_examples]
    ]
    return TaskScore(
        scorer=scorer,
        prompts=len(prompts),
        adapter=sum(ad) / len(ad) if ad else 0.0,
        base=sum(base) / len(base) if base else 0.0,
        max_tokens=max_tokens,
        seconds=round(time.perf_counter() - t0, 2),
        examples=examples,
        base_cached=len(prompts) - len(missing),
    )


__all__ = [
    "AnswerJob", "TaskScore", "answer_many", "answer_prompts", "load_scorer", "prompt_tokens", "read_prompts", "score_task",
]
