"""The chat service: turns one validated request into a running generation, and logs it.

Owns the request lifecycle between HTTP and the engine: route and path choice, system prompt,
sampling defaults, prompt rendering and the context check, adapter leases, engine submission,
the conversation-log row and the request metrics. Handlers only format what it yields.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server import registry
from server.adapter_pool import AdapterPool, Lease
from server.chat_template import ChatTemplate, ChatTemplateError
from server.engine import Engine, GenerationStream, SamplingParams
from server.errors import ContextOverflow, EngineFailure, InvalidRequest, NotFound
from server.metrics import Metrics, adapters_label
from server.protocol import ChatCompletionRequest
from server.routes import Plan, RouteTable
from server.settings import Settings
from server.store import ConversationLog

log = logging.getLogger(__name__)

BASE_ALIASES = ("base",)


@dataclass
class Exchange:
    """One admitted request: what it runs, and its live generation."""

    id: str
    created: int
    model: str
    plan: Plan
    lease: Lease | None
    stream: GenerationStream
    prompt_tokens: int
    headers: dict[str, str]
    adapters: list[dict[str, Any]]
    logged: bool
    started: float = field(default_factory=time.monotonic)
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft: float | None = None
    status: str = "in_progress"


class ChatService:
    """Runs chat completions over the engine, the adapter pool and the routes."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        pool: AdapterPool,
        routes: RouteTable,
        template: ChatTemplate,
        conversation_log: ConversationLog | None,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.pool = pool
        self.routes = routes
        self.template = template
        self.log = conversation_log
        self.metrics = metrics
        self.base_name = settings.served_model_name

    # ------------------------------------------------------------------ planning

    def plan_for(self, req: ChatCompletionRequest, sticky_key: str) -> Plan:
        model = req.model
        route = self.routes.get(model)
        if route is not None:
            refs = [ref for ref, _ in route.adapters]
            plan = self.routes.plan(route, sticky_key=sticky_key, available=self.pool.availability(refs))
            if plan.path_kind == "finetuned" and plan.fallback_reason:
                raise NotFound(f"route {model!r} cannot be served: {plan.fallback_reason}", param="model")
        elif model == self.base_name or model in BASE_ALIASES:
            plan = Plan("base", "base")
        else:
            try:
                info = self.pool.resolve(model)
            except registry.InvalidAdapterName:
                raise NotFound(self._unknown_model(model), param="model") from None
            except registry.RegistryError as e:
                if "@" in model or model.partition("@")[0] in self.pool.available:
                    raise NotFound(str(e), param="model") from None
                raise NotFound(self._unknown_model(model), param="model") from None
            plan = Plan(f"adapter:{info.name}", "finetuned", ((model, 1.0),))
        if req.adapters is not None:  # per-request override, as llama-server's `lora` field
            specs = tuple((a.name, a.scale) for a in req.adapters)
            for ref, _ in specs:
                try:
                    self.pool.resolve(ref)
                except registry.RegistryError as e:
                    raise NotFound(str(e), param="adapters") from None
            kind = "finetuned" if specs else ("base" if plan.path_kind == "base" else "prompt")
            plan = Plan(plan.route, kind, specs, plan.system_prompt if kind != "finetuned" else None,
                        plan.params, plan.log)
        return plan

    def _unknown_model(self, model: str) -> str:
        shown = model[:80] + ("..." if len(model) > 80 else "")
        return f"The model {shown!r} does not exist: use a route, an adapter (name or name@N) or {self.base_name!r}; see GET /v1/models"

    def _sampling(self, req: ChatCompletionRequest, plan: Plan, prompt_tokens: int) -> SamplingParams:
        d = plan.params

        def pick(name: str, default: Any) -> Any:
            v = getattr(req, name)
            return v if v is not None else d.get(name, default)

        room = self.engine.n_ctx_seq - prompt_tokens
        requested = req.requested_max_tokens()
        limit = self.settings.max_tokens_limit
        if requested is not None and requested > limit:
            field_name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise InvalidRequest(f"{field_name} is {requested}, above this server's limit of {limit}", param=field_name)
        if requested is None:
            if room < 1:
                raise ContextOverflow(prompt_tokens, 1, self.engine.n_ctx_seq)
            max_tokens = min(int(d.get("max_tokens", self.settings.default_max_tokens)), limit, room)
        else:
            if requested > room:
                raise ContextOverflow(prompt_tokens, requested, self.engine.n_ctx_seq)
            max_tokens = requested
        stop = req.stop if req.stop is not None else d.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", 0)),
            min_p=float(pick("min_p", 0.0)),
            seed=pick("seed", None),
            presence_penalty=float(pick("presence_penalty", 0.0)),
            frequency_penalty=float(pick("frequency_penalty", 0.0)),
            repeat_penalty=float(pick("repeat_penalty", 1.0)),
            stop=tuple(stop),
        )

    # ------------------------------------------------------------------ running

    async def start(self, req: ChatCompletionRequest, *, conversation_id: str | None = None) -> Exchange:
        """Validate, plan and submit; raises APIError subclasses for every client-visible problem."""
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text(i)}
                    for i, m in enumerate(req.messages)]
        sticky = conversation_id or req.user or next((m["content"] for m in messages if m["role"] == "user"), "")
        try:
            plan = self.plan_for(req, sticky)
        except NotFound:
            self.metrics.requests.labels("unknown", "none", "", "", "404").inc()
            raise
        prompt_messages = messages
        if plan.system_prompt:
            prompt_messages = [{"role": "system", "content": plan.system_prompt}, *messages]
        try:
            segments = self.template.render_segments(prompt_messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise InvalidRequest(f"the messages cannot be rendered with the model's chat template: {e}",
                                 param="messages") from None
        tokens = self.engine.tokenize(segments)
        params = self._sampling(req, plan, len(tokens))

        lease = await self.pool.acquire(list(plan.adapters)) if plan.adapters else None
        try:
            stream = self.engine.submit(tokens, params, lease.handles if lease else ())
        except BaseException:
            if lease:
                lease.release()
            raise
        adapters = lease.versions if lease else []
        ex = Exchange(
            id=f"chatcmpl-{secrets.token_hex(12)}",
            created=int(time.time()),
            model=req.model,
            plan=plan,
            lease=lease,
            stream=stream,
            prompt_tokens=len(tokens),
            headers={},
            adapters=adapters,
            logged=bool(self.log) and self.settings.log_conversations and plan.log,
        )
        ex.headers = {
            "X-Request-Id": ex.id,
            "X-Route": plan.route,
            "X-Route-Path": plan.path_kind,
            "X-Adapters": ",".join(f"{a['name']}@{a['version']}:{a['scale']:g}" for a in adapters),
        }
        if plan.fallback_reason:
            ex.headers["X-Route-Fallback"] = plan.fallback_reason[:200].encode("ascii", "replace").decode()
            self.metrics.fallbacks.labels(plan.route).inc()
            log.warning("route %s fell back to its prompt path: %s", plan.route, plan.fallback_reason)
        self.metrics.in_flight.inc()
        if ex.logged:
            first = adapters[0] if adapters else {}
            self.log.begin({
                "id": ex.id, "created_at": time.time(), "model": req.model, "route": plan.route,
                "path_kind": plan.path_kind, "fallback_reason": plan.fallback_reason, "adapters": adapters,
                "adapter_name": first.get("name"), "adapter_version": first.get("version"),
                "system_prompt": plan.system_prompt, "messages": messages,
                "params": {k: v for k, v in vars(params).items() if k != "stop"} | {"stop": list(params.stop)},
                "user": req.user, "conversation_id": conversation_id,
            })  # fmt: skip
        return ex

    async def run(self, ex: Exchange) -> AsyncIterator[str]:
        """Yield text deltas until the generation ends; always finishes the log row and metrics."""
        status, error = "client_disconnected", None
        try:
            async for event in ex.stream:
                if event.text:
                    if ex.ttft is None:
                        ex.ttft = time.monotonic() - ex.started
                    ex.text += event.text
                    yield event.text
                if event.final:
                    ex.completion_tokens = event.completion_tokens
                    ex.cached_tokens = event.cached_tokens
                    if event.error:
                        status, error = "error", event.error
                        raise EngineFailure("generation failed; the request can be retried")
                    if event.finish_reason == "cancelled":
                        status = "client_disconnected"
                    else:
                        ex.finish_reason = "length" if event.finish_reason == "timeout" else event.finish_reason
                        status = "completed"
                        if event.finish_reason == "timeout":
                            error = "generation time cap reached"
        finally:
            if status != "completed":
                ex.stream.cancel()
            self._finish(ex, status, error)

    def _finish(self, ex: Exchange, status: str, error: str | None) -> None:
        ex.status = status
        if ex.lease:
            ex.lease.release()
        elapsed = time.monotonic() - ex.started
        plan = ex.plan
        adapter, version = adapters_label(ex.adapters)
        m = self.metrics
        m.in_flight.dec()
        code = {"completed": "200", "client_disconnected": "499", "error": "500"}.get(status, status)
        m.requests.labels(plan.route, plan.path_kind, adapter, version, code).inc()
        m.prompt_tokens.labels(plan.route, plan.path_kind).inc(ex.prompt_tokens)
        m.completion_tokens.labels(plan.route, plan.path_kind).inc(ex.completion_tokens)
        m.latency.labels(plan.route, plan.path_kind).observe(elapsed)
        if ex.ttft is not None:
            m.ttft.labels(plan.route, plan.path_kind).observe(ex.ttft)
        if ex.logged:
            self.log.finish(ex.id, {
                "status": status, "response": ex.text, "finish_reason": ex.finish_reason,
                "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
                "cached_tokens": ex.cached_tokens, "ttft_ms": None if ex.ttft is None else ex.ttft * 1000,
                "duration_ms": elapsed * 1000, "error": error,
            })  # fmt: skip

    def route_label_known(self, route: str) -> bool:
        return route in self.routes.routes or route == "base" or route.startswith("adapter:")
