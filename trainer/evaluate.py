"""Validation of an extracted adapter against the served base, and the publish gate.

Owns: scoring validation texts with llama.cpp logits for (a) the served (quantized) base,
(b) the trained FP32 model when given, (c) the adapter applied to the served base through
llama.cpp's adapter API — exactly how the server will run it; greedy samples with and without
the adapter; the :class:`EvalReport`; and :func:`gate`, the publish decision.

Scoring: each validation item is tokenized with the one tokenization the server uses
(``trainer.packing.tokenize_example``) and scored on its own, truncated to ``n_ctx + 1`` tokens;
the loss is the mean negative log-likelihood (nats) over the item's training targets only (the
assistant turns and their end-of-turn tokens, as in training; every token of a plain text),
token-weighted across items; perplexity is ``exp(loss)``.

The bare base's results (each item's summed loss, each sample reply) can come from a
:class:`trainer.base_cache.BaseCache`: the base is the same every night, so only new items cost
a forward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapter_chat.chat_template import ChatTemplate, TokenizedConversation, tokenize_segments
from adapter_chat.gguf_info import BaseModelInfo
from trainer.base_cache import BaseCache
from trainer.config import GATE_MODES
from trainer.llama_opt import InferenceSession, VocabOnly, perplexity
from trainer.packing import Example, tokenize_example


@dataclass
class ModelScore:
    """Validation loss of one model configuration."""

    loss: float
    perplexity: float
    tokens: int
    seconds: float
    cached: int = 0
    """Items whose result came from the base cache (``trainer.base_cache``), not computed now."""


@dataclass
class Sample:
    """One held-out prompt and the greedy replies of the base with and without the adapter."""

    prompt: str
    base: str
    adapter: str


@dataclass
class EvalReport:
    """Owns the evaluation results of one adapter: scores per configuration and samples."""

    base: ModelScore
    adapter: ModelScore
    trained: ModelScore | None = None
    samples: list[Sample] = field(default_factory=list)
    n_texts: int = 0
    n_truncated: int = 0  # validation texts longer than n_ctx + 1 tokens, scored on their start
    n_ctx: int = 256
    base_model: str = ""
    adapter_path: str = ""

    @property
    def val_loss_base(self) -> float:
        return self.base.loss

    @property
    def val_loss_adapter(self) -> float:
        return self.adapter.loss

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["val_loss_base"] = self.base.loss
        d["val_loss_adapter"] = self.adapter.loss
        d["val_loss_trained"] = self.trained.loss if self.trained else None
        return d


def _nll_request(conv: TokenizedConversation, n_ctx: int) -> dict[str, Any]:
    """What a validation item's score depends on, as the base cache's request."""
    return {"ids": list(conv.ids[: n_ctx + 1]), "mask": [int(m) for m in conv.mask[1 : n_ctx + 1]], "n_ctx": n_ctx}


def _item_nll(session: InferenceSession, conv: TokenizedConversation) -> tuple[float, int]:
    """Summed NLL over one item's targets (truncated to the session's window) and their count."""
    ids, mask = conv.ids[: session.n_ctx + 1], np.asarray(conv.mask[1 : session.n_ctx + 1], dtype=bool)
    if not mask.any():
        return 0.0, 0
    nll = session.window_nll(ids, only=mask)  # logits at the target positions only
    return float(nll.sum()), int(mask.sum())


def _as_model_score(parts: Sequence[tuple[float, int]], seconds: float, cached: int = 0) -> ModelScore:
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    loss = total / count if count else math.nan
    return ModelScore(loss=loss, perplexity=perplexity(loss), tokens=count, seconds=seconds, cached=cached)


def _score(session: InferenceSession, convs: Sequence[TokenizedConversation]) -> ModelScore:
    t0 = time.perf_counter()
    parts = [_item_nll(session, conv) for conv in convs]
    return _as_model_score(parts, time.perf_counter() - t0)


def _render_prompts(
    template: ChatTemplate, vocab: Any, prompts: Sequence[str | list[dict[str, str]]]
) -> list[tuple[str, str | list[int]]]:
    """(shown text, what to generate from): strings are already-rendered prompts; message lists
    are rendered with the base model's chat template (with the generation prompt) and tokenized
    as the server tokenizes a request."""
    out: list[tuple[str, str | list[int]]] = []
    for p in prompts:
        if isinstance(p, str):
            out.append((p, p))
            continue
        segments = template.render_segments(list(p), add_generation_prompt=True)
        out.append(("".join(seg.text for seg in segments), tokenize_segments(vocab, segments)))
    return out


def evaluate(
    base_model: Path,
    adapter: Path,
    val_texts: Sequence[str | Example],
    *,
    trained: Path | None = None,
    prompts: Sequence[str | list[dict[str, str]]] = (),
    n_ctx: int = 256,
    threads: int = 2,
    max_tokens: int = 64,
    adapter_scale: float = 1.0,
    n_gpu_layers: int = 0,
    base_cache: BaseCache | None = None,
) -> EvalReport:
    """Score ``val_texts`` (dataset items, or plain texts where every token counts) with the
    base, the adapter on the base, and (if given) the trained FP32 model; generate greedily for
    each of ``prompts`` with and without the adapter.

    ``prompts`` items are either rendered prompt strings or lists of chat messages. With a
    ``base_cache``, the base's results for items and prompts it holds are read from it (and the
    base model is not loaded when it holds them all); the rest are computed and stored.
    """
    if not val_texts:
        raise ValueError("no validation texts")
    base_model, adapter = Path(base_model), Path(adapter)
    template = ChatTemplate.from_model(BaseModelInfo.load(base_model, sha256="-"))
    kw = {"n_ctx": n_ctx, "threads": threads, "n_gpu_layers": n_gpu_layers}
    with VocabOnly(base_model) as vocab:
        token_lists = [
            c for c in (tokenize_example(vocab, template, ex) for ex in val_texts)
            if len(c.ids) >= 2 and any(c.mask[1:])
        ]
        rendered = _render_prompts(template, vocab, prompts)
    if not token_lists:
        raise ValueError("validation texts tokenized to fewer than 2 tokens each")
    base_score, base_replies = _base_results(base_model, token_lists, rendered, max_tokens=max_tokens,
                                             cache=base_cache, **kw)  # fmt: skip
    with InferenceSession(base_model, adapter=adapter, adapter_scale=adapter_scale, **kw) as ad_s:
        adapter_score = _score(ad_s, token_lists)
        ad_replies = [ad_s.generate(p, max_tokens=max_tokens) for _, p in rendered]
    samples = [Sample(prompt=shown, base=b, adapter=a) for (shown, _), b, a in zip(rendered, base_replies, ad_replies)]
    trained_score = None
    if trained is not None:
        with InferenceSession(Path(trained), **kw) as tr_s:
            trained_score = _score(tr_s, token_lists)
    return EvalReport(
        base=base_score,
        adapter=adapter_score,
        trained=trained_score,
        samples=samples,
        n_texts=len(token_lists),
        n_truncated=sum(len(t.ids) > n_ctx + 1 for t in token_lists),
        n_ctx=n_ctx,
        base_model=str(base_model),
        adapter_path=str(adapter),
    )


def _base_results(
    base_model: Path,
    convs: Sequence[TokenizedConversation],
    rendered: Sequence[tuple[str, str | list[int]]],
    *,
    max_tokens: int,
    cache: BaseCache | None,
    **kw: Any,
) -> tuple[ModelScore, list[str]]:
    """The bare base's validation score and greedy replies, from ``cache`` where it has them."""
    t0 = time.perf_counter()
    n_ctx = int(kw["n_ctx"])
    nll_reqs = [_nll_request(c, n_ctx) for c in convs]
    gen_reqs = [{"prompt": p, "max_tokens": max_tokens, "n_ctx": n_ctx} for _, p in rendered]
    parts: list[Any] = [cache.get("nll", r) if cache is not None else None for r in nll_reqs]
    replies: list[Any] = [cache.get("sample", r) if cache is not None else None for r in gen_reqs]
    cached = sum(p is not None for p in parts)
    if any(p is None for p in parts) or any(r is None for r in replies):
        with InferenceSession(base_model, **kw) as base_s:
            for i, conv in enumerate(convs):
                if parts[i] is None:
                    parts[i] = _item_nll(base_s, conv)
                    if cache is not None:
                        cache.put("nll", nll_reqs[i], list(parts[i]))
            for i, (_, p) in enumerate(rendered):
                if replies[i] is None:
                    replies[i] = base_s.generate(p, max_tokens=max_tokens)
                    if cache is not None:
                        cache.put("sample", gen_reqs[i], replies[i])
    score = _as_model_score([(float(p[0]), int(p[1])) for p in parts], time.perf_counter() - t0, cached)
    return score, [str(r) for r in replies]


def gate(
    report: EvalReport, *, margin: float, mode: str = "relative", task: Any = None, min_score: float = 0.0
) -> tuple[bool, str]:
    """Publish decision. ``relative`` (default): pass iff
    ``adapter_loss <= base_loss * (1 - margin)``; ``absolute``: pass iff
    ``adapter_loss <= base_loss - margin`` (margin in nats). A non-finite loss never passes.
    With a ``task`` score (``trainer.task_eval.TaskScore``), the adapter's share must also reach
    ``min_score``. Returns (passed, reason with the numbers)."""
    passed, reason = _loss_gate(report, margin=margin, mode=mode)
    if task is None:
        return passed, reason
    ok = task.adapter >= min_score
    verdict = ">=" if ok else "<"
    reason += (
        f"; task score {task.adapter:.0%} {verdict} {min_score:.0%} required"
        f" ({task.prompts} held-out prompts; base {task.base:.0%})"
    )
    return passed and ok, reason


def _loss_gate(report: EvalReport, *, margin: float, mode: str) -> tuple[bool, str]:
    if mode not in GATE_MODES:
        raise ValueError(f"mode must be one of {GATE_MODES}, got {mode!r}")
    base, ad = report.base.loss, report.adapter.loss
    if not (np.isfinite(base) and np.isfinite(ad)):
        return False, f"non-finite validation loss (base {base}, adapter {ad})"
    if mode == "relative":
        limit = base * (1.0 - margin)
        rule = f"base {base:.4f} x (1 - {margin:g})"
    else:
        limit = base - margin
        rule = f"base {base:.4f} - {margin:g}"
    passed = ad <= limit
    change = (ad - base) / base if base else math.nan
    verdict = "<=" if passed else ">"
    reason = (
        f"adapter val loss {ad:.4f} {verdict} {limit:.4f} = {rule} "
        f"({change:+.1%} vs base; ppl {report.adapter.perplexity:.2f} vs {report.base.perplexity:.2f})"
    )
    return passed, reason


__all__ = ["EvalReport", "ModelScore", "Sample", "evaluate", "gate"]
