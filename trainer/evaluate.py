"""Validation of an extracted adapter against the served base, and the publish gate.

Owns: scoring validation texts with llama.cpp logits for (a) the served (quantized) base,
(b) the trained FP32 model when given, (c) the adapter applied to the served base through
llama.cpp's adapter API — exactly how the server will run it; greedy samples with and without
the adapter; the :class:`EvalReport`; and :func:`gate`, the publish decision.

Scoring: each validation text is scored on its own (special tokens parsed, nothing added),
truncated to ``n_ctx + 1`` tokens; the loss is the mean negative log-likelihood (nats) over all
predicted tokens of all texts (token-weighted), perplexity is ``exp(loss)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.chat_template import ChatTemplate
from server.gguf_info import BaseModelInfo
from trainer.llama_opt import InferenceSession, perplexity

GATE_MODES = ("relative", "absolute")


@dataclass
class ModelScore:
    """Validation loss of one model configuration."""

    loss: float
    perplexity: float
    tokens: int
    seconds: float


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


def _score(session: InferenceSession, token_lists: Sequence[list[int]]) -> ModelScore:
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for toks in token_lists:
        nll = session.window_nll(toks[: session.n_ctx + 1])
        total += float(nll.sum())
        count += len(nll)
    loss = total / count if count else math.nan
    return ModelScore(loss=loss, perplexity=perplexity(loss), tokens=count, seconds=time.perf_counter() - t0)


def _render_prompts(base_model: Path, prompts: Sequence[str | list[dict[str, str]]]) -> list[str]:
    """Strings are already-rendered prompts; message lists are rendered with the base model's
    chat template (with the generation prompt)."""
    template: ChatTemplate | None = None
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(p)
            continue
        if template is None:
            template = ChatTemplate.from_model(BaseModelInfo.load(base_model, sha256="-"))
        out.append(template.render(list(p), add_generation_prompt=True))
    return out


def evaluate(
    base_model: Path,
    adapter: Path,
    val_texts: list[str],
    *,
    trained: Path | None = None,
    prompts: Sequence[str | list[dict[str, str]]] = (),
    n_ctx: int = 256,
    threads: int = 2,
    max_tokens: int = 64,
    adapter_scale: float = 1.0,
) -> EvalReport:
    """Score ``val_texts`` with the base, the adapter on the base, and (if given) the trained
    FP32 model; generate greedily for each of ``prompts`` with and without the adapter.

    ``prompts`` items are either rendered prompt strings or lists of chat messages.
    """
    if not val_texts:
        raise ValueError("no validation texts")
    base_model, adapter = Path(base_model), Path(adapter)
    rendered = _render_prompts(base_model, prompts)
    samples: list[Sample] = []
    with InferenceSession(base_model, n_ctx=n_ctx, threads=threads) as base_s:
        token_lists = [t for t in (base_s.tokenize(x) for x in val_texts) if len(t) >= 2]
        if not token_lists:
            raise ValueError("validation texts tokenized to fewer than 2 tokens each")
        base_score = _score(base_s, token_lists)
        base_replies = [base_s.generate(p, max_tokens=max_tokens) for p in rendered]
    with InferenceSession(
        base_model, n_ctx=n_ctx, threads=threads, adapter=adapter, adapter_scale=adapter_scale
    ) as ad_s:
        adapter_score = _score(ad_s, token_lists)
        ad_replies = [ad_s.generate(p, max_tokens=max_tokens) for p in rendered]
    samples = [Sample(prompt=p, base=b, adapter=a) for p, b, a in zip(rendered, base_replies, ad_replies)]
    trained_score = None
    if trained is not None:
        with InferenceSession(Path(trained), n_ctx=n_ctx, threads=threads) as tr_s:
            trained_score = _score(tr_s, token_lists)
    return EvalReport(
        base=base_score,
        adapter=adapter_score,
        trained=trained_score,
        samples=samples,
        n_texts=len(token_lists),
        n_truncated=sum(len(t) > n_ctx + 1 for t in token_lists),
        n_ctx=n_ctx,
        base_model=str(base_model),
        adapter_path=str(adapter),
    )


def gate(report: EvalReport, *, margin: float, mode: str = "relative") -> tuple[bool, str]:
    """Publish decision. ``relative`` (default): pass iff
    ``adapter_loss <= base_loss * (1 - margin)``; ``absolute``: pass iff
    ``adapter_loss <= base_loss - margin`` (margin in nats). A non-finite loss never passes.
    Returns (passed, reason with the numbers)."""
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
