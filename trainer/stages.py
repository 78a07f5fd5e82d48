"""One adapter's nightly stages, each a function returning a typed result.

    dataset  -> DatasetResult (or a skip: too little data, nothing new)
    train    -> TrainResult   (the LoRA trained directly, or a full finetune)
    extract  -> TrainResult   (full finetune only: the SVD to a LoRA; the LoRA path has its file)
    evaluate -> EvalResult    (validation loss vs the served base, the task score, the gate)
    publish  ->               (the registry's atomic publish, or why not)

This module owns what each stage does and what it hands the next. `trainer/nightly.py` owns
running them for every adapter: the lock, the run record, signals and exit codes. The stages
write their numbers into the run's `Outcome.metrics` (saved in the manifest and `trainer_runs`)
and say one line each. Heavy modules (llama.cpp, the engine) are imported by the stage that
needs them, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import AdapterConfig, TrainerConfig
from trainer.dataset import Dataset, TokenCounter, build_dataset

if TYPE_CHECKING:
    from adapter_chat.chat_template import ChatTemplate
    from adapter_chat.gguf_info import BaseModelInfo
    from trainer.evaluate import EvalReport
    from trainer.finetune import TrainedModel
    from trainer.task_eval import TaskScore

Progress = Callable[[dict[str, Any]], None]
Say = Callable[[str], None]


class Interrupted(RuntimeError):
    """A stop was requested (signal or `stop` event) between or during stages."""


@dataclass
class Outcome:
    """How one adapter's run ended (mirrors its `trainer_runs` row)."""

    adapter: str
    status: str
    run_id: int | None = None
    version: int | None = None
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    output: Path | None = None


@dataclass
class RunOptions:
    """How a single adapter run behaves beyond its config (the `train` command sets these)."""

    publish: bool = True
    """Publish to the registry when the gate passes."""
    output: Path | None = None
    """Also copy the adapter GGUF here (with a `.json` sidecar holding config and metrics)."""
    force: bool = False
    """Publish even when the gate refuses (the refusal is still recorded in the metrics)."""
    skip_unchanged: bool = True
    """Skip when the dataset is identical to the one the current version was trained on."""


@dataclass
class Stages:
    """What one adapter's run shares between its stages."""

    cfg: TrainerConfig
    adapter: AdapterConfig
    outcome: Outcome
    stop: threading.Event
    say: Say
    callbacks: Sequence[Progress]
    options: RunOptions
    run_dir: Path
    count_tokens: TokenCounter | None = None
    now: float | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.outcome.metrics

    def check(self, stage: str) -> None:
        if self.stop.is_set():
            raise Interrupted(f"stopped before {stage}")

    def skip(self, reason: str) -> None:
        self.outcome.status, self.outcome.reason = "skipped", reason


@dataclass(frozen=True)
class DatasetResult:
    data: Dataset
    base: BaseModelInfo
    template: ChatTemplate
    current: int | None  # the adapter's current version before this run


@dataclass(frozen=True)
class TrainResult:
    trained: TrainedModel
    lora_path: Path
    rank: int
    alpha: float
    hyperparameters: dict[str, Any]
    metadata: dict[str, str]  # written into the LoRA GGUF (training.*)


@dataclass(frozen=True)
class EvalResult:
    report: EvalReport
    task: TaskScore | None
    passed: bool
    why: str


def run_stages(s: Stages) -> None:
    """Every stage in order; the outcome says how the run ended (skipped, rejected, published)."""
    ds = dataset_stage(s)
    if ds is None:
        return
    tr = train_stage(s, ds)
    if s.adapter.train.method == "full":
        tr = extract_stage(s, ds, tr)
    ev = evaluate_stage(s, ds, tr)
    publish_stage(s, ds, tr, ev)


def dataset_stage(s: Stages) -> DatasetResult | None:
    """Build the dataset; None (and the outcome says why) when there is too little or nothing new."""
    from adapter_chat import registry
    from adapter_chat.chat_template import ChatTemplate
    from adapter_chat.gguf_info import BaseModelInfo

    cfg, adapter = s.cfg, s.adapter
    s.check("the dataset")
    base = BaseModelInfo.load(cfg.base_model)
    template = ChatTemplate.from_model(base)
    data: Dataset = build_dataset(cfg, adapter, template=template, count_tokens=s.count_tokens, now=s.now)
    report = data.report
    _write_json(s.run_dir / "dataset.json", report.to_dict())
    s.metrics["dataset"] = {
        "train_items": report.train_items,
        "val_items": report.val_items,
        "tokens": report.tokens_total,
        "over_ctx": report.over_ctx,
        "dropped": sum(report.dropped.values()),
        "fingerprint": data.fingerprint,
    }
    s.say(f"[{adapter.name}] dataset: {report.train_items} train / {report.val_items} validation items, "
          f"{report.tokens_total} tokens, {report.over_ctx} over the {report.n_ctx}-token window, "
          f"{sum(report.dropped.values())} dropped")  # fmt: skip
    gate_cfg = adapter.gate
    if report.train_items < gate_cfg.min_items or report.val_items < gate_cfg.min_val_items:
        s.skip(f"too little data: {report.train_items} training items (need {gate_cfg.min_items}), "
               f"{report.val_items} validation items (need {gate_cfg.min_val_items})")  # fmt: skip
        return None
    current = registry.current_version(cfg.adapters_dir, adapter.name)
    if current is not None:
        current_manifest = next(m for m in registry.list_versions(cfg.adapters_dir, adapter.name) if m.version == current)
        same_data = current_manifest.data_window.get("dataset_sha256") == data.fingerprint
        same_base = current_manifest.base_model_sha256 == base.sha256
        if s.options.skip_unchanged and same_data and same_base:
            s.skip(f"no new data since version {current} (same dataset fingerprint)")
            return None
    return DatasetResult(data, base, template, current)


def train_stage(s: Stages, ds: DatasetResult) -> TrainResult:
    """Train (``method`` lora: the adapter file is written from the trained A/B tensors)."""
    from trainer.finetune import JsonlWriter, TrainConfig, TrainingInterrupted, train

    cfg, adapter = s.cfg, s.adapter
    s.check("training")
    t = adapter.train
    train_cfg = TrainConfig.from_settings(t, base_model=cfg.base_model, cache_dir=cfg.cache_dir,
                                          threads=cfg.threads, n_gpu_layers=cfg.n_gpu_layers)  # fmt: skip
    hyper = _hyperparameters(cfg, adapter)
    lora_meta = {
        "training.base_sha256": ds.base.sha256,
        "training.dataset_sha256": ds.data.fingerprint,
        "training.code_version": _code_version(),
        "training.hyperparameters": json.dumps(hyper, sort_keys=True),
    }
    lora_path = s.run_dir / "adapter.gguf"
    started = time.monotonic()
    try:
        with JsonlWriter(s.run_dir / "progress.jsonl") as progress_file:
            trained = train(
                train_cfg,
                ds.data.train,
                template=ds.template,
                callbacks=(*s.callbacks, progress_file),
                stop=s.stop,
                out_path=lora_path if t.method == "lora" else None,
                checkpoint_dir=cfg.cache_dir / "checkpoints" / adapter.name,
                metadata=lora_meta,
            )
    except TrainingInterrupted as exc:
        raise Interrupted(f"training stopped: {exc}") from exc
    s.metrics["train"] = {
        "method": trained.method,
        "steps": trained.steps,
        "tokens": trained.tokens,
        "tokens_per_s": trained.tokens_per_s,
        "first_loss": trained.first_loss,
        "final_loss": trained.final_loss,
        "epoch_losses": trained.epoch_losses,
        "seconds": round(time.monotonic() - started, 2),
        "packing": trained.packing,
        "resumed_from_step": trained.resumed_from_step,
    }
    resumed = f", resumed at step {trained.resumed_from_step}" if trained.resumed_from_step else ""
    frozen = trained.packing.get("frozen")
    if frozen:
        resumed += (f"; frozen blocks: {frozen['cached']} sequences from the cache, {frozen['computed']} computed "
                    f"in {frozen['compute_s']:.0f} s")  # fmt: skip
    s.say(f"[{adapter.name}] trained ({trained.method}): {trained.steps} steps, {trained.tokens} tokens, "
          f"{trained.tokens_per_s:.0f} tokens/s, loss on answers {trained.first_loss:.3f} -> {trained.final_loss:.3f}; "
          f"{trained.packing.get('items_cut', 0)} of {trained.packing.get('items', 0)} items cut by the "
          f"{t.n_ctx}-token window{resumed}")  # fmt: skip
    return TrainResult(trained, lora_path, trained.rank, trained.alpha, hyper, lora_meta)


def extract_stage(s: Stages, ds: DatasetResult, tr: TrainResult) -> TrainResult:
    """Full finetune only: the weight change as a LoRA (randomized SVD), written to the run's file."""
    from trainer.extract import extract_lora, save_lora

    s.check("extraction")
    t, e = s.adapter.train, s.adapter.extract
    started = time.monotonic()
    extraction = extract_lora(tr.trained.base_f32, tr.trained.trained, targets=tuple(t.targets),
                              fidelity=e.fidelity, max_rank=e.max_rank, min_rank=e.min_rank, rank=e.rank)  # fmt: skip
    save_lora(extraction, tr.lora_path, architecture=ds.base.architecture, metadata=tr.metadata)
    s.metrics["extract"] = extraction.report() | {"seconds": round(time.monotonic() - started, 2)}
    s.say(f"[{s.adapter.name}] extracted LoRA rank {extraction.rank} keeping {extraction.mean_energy:.1%} of the energy")
    return dataclasses.replace(tr, rank=int(extraction.rank), alpha=float(extraction.alpha))


def evaluate_stage(s: Stages, ds: DatasetResult, tr: TrainResult) -> EvalResult:
    """Validation loss of the adapter on the served base vs the bare base, the task score when the
    adapter names a scorer, and the gate's verdict."""
    from adapter_chat.llama_model import native_build_id
    from trainer.base_cache import FILENAME, BaseCache
    from trainer.evaluate import Sample, evaluate, gate

    cfg, adapter, gate_cfg, t = s.cfg, s.adapter, s.adapter.gate, s.adapter.train
    s.check("evaluation")
    started = time.monotonic()
    val_prompts = [list(i.messages[:-1]) for i in ds.data.val if i.messages]
    # with a scorer, its first answers are the samples: no second generation of the same prompts
    prompts = [] if gate_cfg.scorer else val_prompts[: gate_cfg.sample_prompts]
    task = None
    with BaseCache(cfg.cache_dir / FILENAME, base_sha256=ds.base.sha256, build=native_build_id()) as cache:
        report = evaluate(cfg.base_model, tr.lora_path, ds.data.val, trained=tr.trained.trained, prompts=prompts,
                          n_ctx=t.n_ctx, threads=cfg.threads, n_gpu_layers=cfg.n_gpu_layers,
                          max_tokens=gate_cfg.max_tokens, base_cache=cache)  # fmt: skip
        s.say(f"[{adapter.name}] validation loss: adapter {report.adapter.loss:.4f}, base {report.base.loss:.4f} "
              f"({report.base.cached} of {report.n_texts} base items from {cache.path.name})")  # fmt: skip
        if gate_cfg.scorer:
            s.check("task evaluation")
            from trainer.task_eval import read_prompts, score_task

            if gate_cfg.score_file is not None:
                held_out = read_prompts(gate_cfg.score_file)[: gate_cfg.score_prompts]
            else:
                held_out = val_prompts[: gate_cfg.score_prompts]
            task = score_task(cfg.base_model, tr.lora_path, held_out, scorer=gate_cfg.scorer, template=ds.template,
                              max_tokens=gate_cfg.score_max_tokens, threads=cfg.threads,
                              n_gpu_layers=cfg.n_gpu_layers, n_examples=gate_cfg.sample_prompts,
                              base_cache=cache)  # fmt: skip
            report.samples = [Sample(prompt=e["prompt"], base=e["base"], adapter=e["adapter"]) for e in task.examples]
            s.say(f"[{adapter.name}] task score ({gate_cfg.scorer.rsplit('/', 1)[-1]}): adapter {task.adapter:.0%}, "
                  f"base {task.base:.0%} on {task.prompts} held-out prompts ({task.base_cached} base answers "
                  f"from {cache.path.name})")  # fmt: skip
    s.metrics["eval"] = report.to_dict()
    if task is not None:
        s.metrics["eval"]["task"] = task.to_dict()
    s.metrics["eval"]["seconds"] = round(time.monotonic() - started, 2)
    _write_json(s.run_dir / "eval.json", s.metrics["eval"])
    passed, why = gate(report, margin=gate_cfg.margin, mode=gate_cfg.mode, task=task, min_score=gate_cfg.min_score)
    s.metrics["gate"] = {"passed": passed, "reason": why, "margin": gate_cfg.margin, "mode": gate_cfg.mode,
                         "min_score": gate_cfg.min_score}  # fmt: skip
    s.say(f"[{adapter.name}] gate {'passed' if passed else 'refused'}: {why}")
    return EvalResult(report, task, passed, why)


def publish_stage(s: Stages, ds: DatasetResult, tr: TrainResult, ev: EvalResult) -> None:
    """Copy to ``--output`` if asked, then publish atomically when the gate passed (or ``--force``)."""
    from adapter_chat import publish

    cfg, adapter, options, outcome = s.cfg, s.adapter, s.options, s.outcome
    if options.output is not None:
        s.check("writing the output")
        _copy_with_sidecar(tr.lora_path, options.output, {"config": tr.hyperparameters, "metrics": s.metrics})
        outcome.output = options.output
    s.check("publishing")
    if not options.publish:
        where = f"written to {options.output}" if options.output is not None else f"kept in {s.run_dir}"
        outcome.status = "skipped" if ev.passed else "rejected"
        outcome.reason = f"not published (--no-publish), {where}; gate: {ev.why}"
        return
    if not ev.passed and not options.force:
        keep = f"version {ds.current} stays current" if ds.current is not None else "no version published"
        outcome.status, outcome.reason = "rejected", f"{ev.why}; {keep}"
        return
    report = ds.data.report
    manifest = publish.publish_version(
        cfg.adapters_dir,
        adapter.name,
        tr.lora_path,
        base_model_sha256=ds.base.sha256,
        base_model_name=ds.base.name,
        architecture=ds.base.architecture,
        rank=tr.rank,
        alpha=tr.alpha,
        metrics=_flat_metrics(s.metrics),
        data_window={
            "since": report.since,
            "until": report.until,
            "items": report.train_items + report.val_items,
            "train_items": report.train_items,
            "val_items": report.val_items,
            "dataset_sha256": ds.data.fingerprint,
        },
        hyperparameters=tr.hyperparameters,
        targets=list(adapter.train.targets),
        keep=adapter.keep,
        trainer_run_id=outcome.run_id,
    )
    outcome.status, outcome.version = "published", manifest.version
    outcome.reason = ev.why if ev.passed else f"published with --force although the gate refused: {ev.why}"


# ---------------------------------------------------------------------------------------------
# Helpers the stages and the nightly share


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)



def _hyperparameters(cfg: TrainerConfig, adapter: AdapterConfig) -> dict[str, Any]:
    """The resolved config for this adapter, as saved in the manifest and the GGUF."""
    resolved = full_adapter(adapter)
    return {
        "base_model": cfg.to_dict()["base_model"],
        "threads": cfg.threads,
        **{k: resolved[k] for k in ("train", "extract", "gate", "source")},
        "keep": adapter.keep,
    }


def full_adapter(adapter: AdapterConfig) -> dict[str, Any]:
    from trainer.config import _jsonable

    return _jsonable(dataclasses.asdict(adapter))


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest's metrics: the evaluation numbers at the top, the rest nested."""
    out: dict[str, Any] = {}
    ev = metrics.get("eval") or {}
    for k, v in ev.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    task = ev.get("task")
    if isinstance(task, dict):  # the task score sits beside the validation loss
        out["task_score"] = task.get("adapter")
        out["task_score_base"] = task.get("base")
        out["task_prompts"] = task.get("prompts")
        out["task_scorer"] = task.get("scorer")
    out.update({k: v for k, v in metrics.items() if k != "eval"})
    return out


def _unflat_metrics(flat: dict[str, Any]) -> dict[str, Any]:
    """A run row's metrics back from a manifest's (`_flat_metrics`): the top-level numbers are the
    evaluation's."""
    scalar = {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {**{k: v for k, v in flat.items() if k not in scalar}, "eval": scalar}


def _copy_with_sidecar(src: Path, dest: Path, sidecar: dict[str, Any]) -> None:
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    _write_json(dest.with_suffix(".json"), sidecar)


def _code_version() -> str:
    try:
        from importlib.metadata import version

        return version("adapter-chat")
    except Exception:
        return "unknown"


