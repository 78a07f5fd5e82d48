"""Prometheus metrics, one registry per app (so tests can build several apps in one process).

Label values come only from configured routes, known adapters and fixed enums, never from raw
request fields: a junk `model` name is counted under route="unknown", so it cannot grow the series.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from adapter_chat import db, store

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TRAINER_STATUSES = ("running", "published", "rejected", "skipped", "failed", "interrupted")


class _TrainerRuns(Collector):
    """The last nightly run per adapter, read from the conversation log database at scrape time."""

    def __init__(self, target: db.Target) -> None:
        self.target = target

    def collect(self) -> Iterable[GaugeMetricFamily]:
        ts = GaugeMetricFamily("trainer_last_run_timestamp_seconds", "Start of the last trainer run", labels=["adapter"])
        status = GaugeMetricFamily(
            "trainer_last_run_status", "1 for the status of the last trainer run", labels=["adapter", "status"]
        )
        version = GaugeMetricFamily(
            "trainer_last_run_version", "Version published by the last run (0 when none)", labels=["adapter"]
        )
        try:
            runs = store.read_trainer_runs(self.target, latest=True)
        except Exception:  # noqa: BLE001 - a scrape never fails for the trainer's records
            log.warning("cannot read the trainer's runs from %s", db.describe(self.target), exc_info=True)
            runs = []
        for run in runs:
            ts.add_metric([run.adapter], run.started_at)
            for s in TRAINER_STATUSES:
                status.add_metric([run.adapter, s], 1.0 if run.status == s else 0.0)
            version.add_metric([run.adapter], float(run.version or 0))
        yield ts
        yield status
        yield version


class _ConversationLogState(Collector):
    """The conversation log writer's state (adapter_chat.store.ConversationLog.stats), read at scrape time."""

    def __init__(self, clog: store.ConversationLog) -> None:
        self.clog = clog

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        st = self.clog.stats()
        yield GaugeMetricFamily("conversation_log_writable", "1 when the last write to the log succeeded",
                                value=1.0 if st["writable"] else 0.0)
        yield GaugeMetricFamily("conversation_log_pending_rows", "Rows held in memory, not yet written",
                                value=st["pending_rows"])
        yield CounterMetricFamily("conversation_log_dropped_rows", "Rows dropped: held rows at their bound",
                                  value=st["dropped_rows"])
        yield CounterMetricFamily("conversation_log_write_failures", "Failed writes (each retried)",
                                  value=st["write_failures"])


class Metrics:
    """Every metric the server exports; the engine and the adapter pool report through it."""

    def __init__(self, runs_db: db.Target | None = None) -> None:
        r = self.registry = CollectorRegistry()
        route_labels = ["route", "path", "adapter", "version"]
        self.requests = Counter("chat_requests", "Chat completion requests", route_labels + ["status"], registry=r)
        self.in_flight = Gauge("chat_requests_in_flight", "Requests being generated or queued", registry=r)
        self.queued = Gauge("chat_requests_queued", "Requests waiting for a slot", registry=r)
        self.ttft = Histogram("chat_time_to_first_token_seconds", "Time to first token", ["route", "path"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("chat_request_duration_seconds", "End-to-end request latency", ["route", "path"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("chat_prompt_tokens", "Prompt tokens", ["route", "path"], registry=r)
        self.completion_tokens = Counter("chat_completion_tokens", "Completion tokens", ["route", "path"], registry=r)
        self.feedback = Counter("chat_feedback", "Feedback ratings", ["route", "path", "rating"], registry=r)
        self.fallbacks = Counter("chat_route_fallbacks", "Finetuned path fell back to the prompt path", ["route"],
                                 registry=r)
        self.adapter_loads = Counter("adapter_loads", "Adapter versions loaded into llama.cpp", ["adapter"], registry=r)
        self.adapter_load_failures = Counter("adapter_load_failures", "Adapter versions refused", ["adapter"],
                                             registry=r)
        self.adapter_reloads = Counter("adapter_reloads", "Adapter directory rescans", registry=r)
        self.adapters_loaded = Gauge("adapters_loaded", "Adapter versions loaded in llama.cpp", registry=r)
        self.batch_tokens = Histogram("engine_batch_tokens", "Tokens per llama_decode step",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_seqs = Histogram("engine_batch_decode_sequences", "Generating sequences per step",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.queue_wait = Histogram("engine_queue_wait_seconds", "Wait for a slot", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.cached_tokens = Counter("engine_prefix_cache_hit_tokens", "Prompt tokens reused from KV", registry=r)
        self.prefix_copies = Counter("engine_prefix_copies", "Prompt prefixes copied from another slot's KV",
                                     registry=r)
        self.switches = Counter("engine_adapter_set_switches", "Adapter-set changes between steps", registry=r)
        self.steps = Counter("engine_steps", "llama_decode steps", registry=r)
        self.group_turns = Histogram("engine_adapter_group_turn_steps", "Steps an adapter set kept the context",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        if runs_db is not None:
            r.register(_TrainerRuns(runs_db))

    # engine observer
    def on_step(self, batch_tokens: int, decode_seqs: int, switched: bool) -> None:
        self.steps.inc()
        self.batch_tokens.observe(batch_tokens)
        if decode_seqs:
            self.batch_seqs.observe(decode_seqs)
        if switched:
            self.switches.inc()

    def on_admit(self, queue_wait_s: float, cached_tokens: int) -> None:
        self.queue_wait.observe(queue_wait_s)
        if cached_tokens:
            self.cached_tokens.inc(cached_tokens)

    def on_turn_end(self, steps: int) -> None:
        self.group_turns.observe(steps)

    def on_prefix_copy(self, tokens: int) -> None:
        self.prefix_copies.inc()

    # adapter pool observer
    def adapter_loaded(self, name: str) -> None:
        self.adapter_loads.labels(name).inc()

    def adapter_load_failed(self, name: str) -> None:
        self.adapter_load_failures.labels(name).inc()

    def adapters_reloaded(self) -> None:
        self.adapter_reloads.inc()

    def loaded_count(self, n: int) -> None:
        self.adapters_loaded.set(n)

    def bind_queue(self, fn: Callable[[], int]) -> None:
        self.queued.set_function(fn)

    def bind_conversation_log(self, clog: store.ConversationLog) -> None:
        """Export the log writer's state: conversation_log_{writable,pending_rows,dropped_rows_total,...}."""
        self.registry.register(_ConversationLogState(clog))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# a request's (adapter, version) label values: adapter_chat.identity.metrics_labels

