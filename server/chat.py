"""The chat service: turns one validated request into a running generation, and logs it.

Owns the request lifecycle between HTTP and the engine: route and path choice, system prompt,
sampling defaults, prompt rendering and the context check, adapter leases, engine submission,
the conversation-log row and the request metrics. Handlers only format what it yields.

Over the ~400-line guide on purpose: one request's lifecycle, read in order from plan to log row;
splitting it would scatter one sequence of steps across files.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from adapter_chat import registry
from adapter_chat.chat_template import ChatTemplate
from adapter_chat.engine import Engine
from adapter_chat.stream import GenerationStream
from adapter_chat.identity import AdapterRef, AdapterUse, PathKind, metrics_labels
from adapter_chat.records import ExchangeEnd, ExchangeStart
from adapter_chat.sampling import (
    JSON_OBJECT_GRAMMAR,
    SamplingParams,
    TokenLogprob,
    check_grammar,
    json_schema_grammar,
)  # fmt: skip
from adapter_chat.store import ConversationLog
from server import tools
from server.adapter_pool import AdapterPool, Lease
from server.errors import ContextOverflow, EngineFailure, InvalidRequest, NotFound, mapped
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from server.routes import Plan, RouteTable
from server.settings import Settings

log = logging.getLogger(__name__)

BASE_ALIASES = ("base",)


@dataclass
class Choice:
    """One of a request's ``n`` generations of the same prompt."""

    index: int
    stream: GenerationStream
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    """Every generated token's logprob, when the request asked for them."""
    done: bool = False
    prompt_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    """Prompt tokens 1.. (text completions with ``echo`` and ``logprobs``)."""
    tool_calls: list[tools.ToolCall] | None = None
    """The calls the answer made (then ``finish_reason`` is ``tool_calls``)."""


@dataclass
class Exchange:
    """One admitted request: what it runs, and its live generations (``choices``; one unless the
    request set ``n``). The log row and the headers describe the request; the row's response is
    choice 0's."""

    id: str
    created: int
    model: str
    plan: Plan
    lease: Lease | None
    choices: list[Choice]
    prompt_tokens: int
    headers: dict[str, str]
    adapters: list[AdapterUse]
    logged: bool
    started: float = field(default_factory=time.monotonic)
    ttft: float | None = None
    status: str = "in_progress"
    tools: list[tools.Tool] = field(default_factory=list)
    """The tools offered to the model (none when tool_choice is 'none')."""
    tool_mode: str = "none"
    one_call: bool = False  # parallel_tool_calls: false

    @property
    def stream(self) -> GenerationStream:
        return self.choices[0].stream

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.choices[0].logprobs

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        return self.choices[0].cached_tokens

    def cancel(self) -> None:
        for c in self.choices:
            c.stream.cancel()


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of one choice's answer as the client receives it: text, and its tokens' logprobs."""

    text: str
    logprobs: list[TokenLogprob] | None = None
    index: int = 0


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

    def plan_for(self, req: GenerationRequest, sticky_key: str) -> Plan:
        model = req.model
        route = self.routes.get(model)
        if route is not None:
            refs = [a.name for a in route.adapters]
            plan = self.routes.plan(route, sticky_key=sticky_key, available=self.pool.availability(refs))
            if plan.path_kind == PathKind.FINETUNED and plan.fallback_reason:
                raise NotFound(f"route {model!r} cannot be served: {plan.fallback_reason}", param="model")
        elif model == self.base_name or model in BASE_ALIASES:
            plan = Plan("base", PathKind.BASE)
        else:
            try:
                info = self.pool.resolve(model)
            except registry.InvalidAdapterName:
                raise NotFound(self._unknown_model(model), param="model") from None
            except registry.RegistryError as e:
                if "@" in model or model.partition("@")[0] in self.pool.available:
                    raise NotFound(str(e), param="model") from None
                raise NotFound(self._unknown_model(model), param="model") from None
            plan = Plan(f"adapter:{info.name}", PathKind.FINETUNED, (AdapterRef(name=model),))
        if req.adapters is not None:  # per-request override, as llama-server's `lora` field
            specs = tuple(req.adapters)
            for a in specs:
                with mapped("adapters"):
                    self.pool.resolve(a.name)
            kind = PathKind.FINETUNED if specs else (PathKind.BASE if plan.path_kind == PathKind.BASE else PathKind.PROMPT)
            plan = Plan(plan.route, kind, specs, plan.system_prompt if kind != PathKind.FINETUNED else None,
                        plan.params, plan.log)
        return plan

    def _unknown_model(self, model: str) -> str:
        shown = model[:80] + ("..." if len(model) > 80 else "")
        return f"The model {shown!r} does not exist: use a route, an adapter (name or name@N) or {self.base_name!r}; see GET /v1/models"

    def _sampling(self, req: GenerationRequest, plan: Plan, prompt_tokens: int) -> SamplingParams:
        d = plan.params

        def pick(name: str, default: Any) -> Any:
            v = getattr(req, name)
            return v if v is not None else d.get(name, default)

        room = self.engine.n_ctx_seq - prompt_tokens
        requested = req.requested_max_tokens()
        limit = self.settings.max_tokens_limit
        if requested is not None and requested > limit:
            field_name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
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
        bias = req.bias()
        for token, _ in bias:
            if not 0 <= token < self.engine.n_vocab:
                raise InvalidRequest(
                    f"logit_bias: token id {token} is not in the model's vocabulary (0 to {self.engine.n_vocab - 1})",
                    param="logit_bias",
                )
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
            logit_bias=bias,
            grammar=self._grammar(req),
            logprobs=req.logprobs_count(),
        )

    def _grammar(self, req: GenerationRequest) -> str | None:
        """The GBNF the answer must follow (``grammar``, or a JSON ``response_format``), compiled
        once here so a bad one is a 400 before any token."""
        rf = req.response_format
        if req.grammar is not None:
            text, param = req.grammar, "grammar"
        elif rf is None or rf.type == "text":
            return None
        elif rf.type == "json_object":
            text, param = JSON_OBJECT_GRAMMAR, "response_format"
        else:
            assert rf.json_schema is not None
            param = "response_format.json_schema.schema"
            schema = rf.json_schema.schema_
            with mapped(param):
                text = JSON_OBJECT_GRAMMAR if schema is None else json_schema_grammar(schema)
        with mapped(param, context=param):
            check_grammar(self.engine.vocab, text)
        return text

    # ------------------------------------------------------------------ running

    async def start(self, req: ChatCompletionRequest, *, conversation_id: str | None = None) -> Exchange:
        """Validate, plan and submit; raises APIError subclasses for every client-visible problem."""
        messages: list[dict[str, Any]] = []
        for i, m in enumerate(req.messages):
            msg: dict[str, Any] = {"role": m.role if m.role != "developer" else "system", "content": m.text(i)}
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        with mapped():  # a ToolError names its own field
            tool_list = tools.parse_tools(req.tools) if req.tools is not None else []
            tool_choice = tools.parse_tool_choice(req.tool_choice, tool_list)
        offered = tool_list if tool_choice.mode != "none" else []
        forced = tool_choice.mode in ("required", "function")
        if forced and (req.grammar is not None or (req.response_format and req.response_format.type != "text")):
            raise InvalidRequest("a forced tool call (tool_choice 'required' or a function) cannot be combined with "
                                 "grammar or a JSON response_format", param="tool_choice")  # fmt: skip
        sticky = conversation_id or req.user or next((m["content"] for m in messages if m["role"] == "user"), "")
        plan = self._plan(req, sticky)
        prompt_messages = messages
        if plan.system_prompt:
            prompt_messages = [{"role": "system", "content": plan.system_prompt}, *messages]
        native = self.template.supports_tools
        prompt_messages = tools.render_messages(prompt_messages, offered, native=native)
        with mapped("messages", context="the messages cannot be rendered with the model's chat template"):
            segments = self.template.render_segments(
                prompt_messages, add_generation_prompt=True,
                tools=[t.to_openai() for t in offered] if native and offered else None,
            )  # fmt: skip
        tokens = self.engine.tokenize(segments)
        params = self._sampling(req, plan, len(tokens))
        if forced:
            with mapped("tools", context="tools: a function's parameters cannot be enforced"):
                grammar = json_schema_grammar(tools.call_schema(tool_list, tool_choice))
                check_grammar(self.engine.vocab, grammar)
            params = replace(params, grammar=grammar)
        ex = await self._open(
            "chatcmpl", req, plan, [(tokens, params, "")], conversation_id=conversation_id,
            log_fields={"system_prompt": plan.system_prompt, "messages": messages, "params": _logged_params(params)},
        )  # fmt: skip
        ex.tools, ex.tool_mode = offered, tool_choice.mode
        ex.one_call = req.parallel_tool_calls is False
        return ex

    async def start_text(self, req: CompletionRequest) -> Exchange:
        """A text completion (``/v1/completions``): each prompt as raw text (special tokens parsed,
        BOS added when the vocabulary asks, as llama-server does) or token ids, ``n`` choices
        each. A route gives its adapters and sampling defaults; its system prompt is a chat message
        and is not applied. Logged with empty ``messages`` and the prompt in ``params``, so the
        trainer, which learns from chats, leaves it out."""
        prompts = req.prompts()
        sticky = req.user or (prompts[0] if isinstance(prompts[0], str) else "")
        plan = self._plan(req, sticky)
        if plan.system_prompt:
            plan = replace(plan, system_prompt=None, path_kind=PathKind.BASE if plan.path_kind == PathKind.PROMPT else plan.path_kind)
        work: list[tuple[list[int], SamplingParams, str]] = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                tokens = self.engine.tokenize_raw(prompt)
                text = prompt
            else:
                bad = next((t for t in prompt if not 0 <= t < self.engine.n_vocab), None)
                if bad is not None:
                    raise InvalidRequest(f"prompt[{i}]: token id {bad} is not in the model's vocabulary", param="prompt")
                tokens, text = list(prompt), self.engine.detokenize(prompt)
            if not tokens:
                raise InvalidRequest(f"prompt[{i}] has no tokens", param="prompt")
            params = self._sampling(req, plan, len(tokens))
            if req.echo and req.logprobs is not None:
                params = replace(params, prompt_logprobs=req.logprobs)
            work.append((tokens, params, text))
        first = work[0][1]
        logged = _logged_params(first) | {"endpoint": "completions", "prompt": work[0][2], "echo": req.echo}
        return await self._open("cmpl", req, plan, work, log_fields={"system_prompt": None, "messages": [],
                                                                     "params": logged})  # fmt: skip

    def _plan(self, req: GenerationRequest, sticky: str) -> Plan:
        try:
            return self.plan_for(req, sticky)
        except NotFound:
            self.metrics.requests.labels("unknown", "none", "", "", "404").inc()
            raise

    async def _open(
        self,
        prefix: str,
        req: GenerationRequest,
        plan: Plan,
        work: list[tuple[list[int], SamplingParams, str]],
        *,
        log_fields: dict[str, Any],
        conversation_id: str | None = None,
    ) -> Exchange:
        """Lease the adapters, submit every (prompt, params) with ``n`` choices each, and open the
        exchange: headers, metrics, the log row."""
        n = req.n or 1
        lease = await self.pool.acquire(list(plan.adapters)) if plan.adapters else None
        choices: list[Choice] = []
        try:
            for tokens, params, text in work:
                for st in self.engine.submit_choices(tokens, params, lease.handles if lease else (), n=n):
                    choices.append(Choice(
                        len(choices), st, logprobs=[] if params.logprobs is not None else None,
                        prompt_text=text, prompt_ids=tokens,
                    ))  # fmt: skip
        except BaseException:
            for c in choices:
                c.stream.cancel()
            if lease:
                lease.release()
            raise
        adapters = lease.uses if lease else []
        ex = Exchange(
            id=f"{prefix}-{secrets.token_hex(12)}",
            created=int(time.time()),
            model=req.model,
            plan=plan,
            lease=lease,
            choices=choices,
            prompt_tokens=sum(len(tokens) for tokens, _, _ in work),
            headers={},
            adapters=adapters,
            logged=bool(self.log) and self.settings.log_conversations and plan.log,
        )
        ex.headers = {
            "X-Request-Id": ex.id,
            "X-Route": plan.route,
            "X-Route-Path": str(plan.path_kind),
            "X-Adapters": ",".join(a.header() for a in adapters),
        }
        if plan.fallback_reason:
            ex.headers["X-Route-Fallback"] = plan.fallback_reason[:200].encode("ascii", "replace").decode()
            self.metrics.fallbacks.labels(plan.route).inc()
            log.warning("route %s fell back to its prompt path: %s", plan.route, plan.fallback_reason)
        self.metrics.in_flight.inc()
        if ex.logged:
            first = adapters[0] if adapters else None
            self.log.begin(ExchangeStart(
                id=ex.id, created_at=time.time(), model=req.model, route=plan.route,
                path_kind=str(plan.path_kind), fallback_reason=plan.fallback_reason,
                adapters=[a.to_log() for a in adapters],
                adapter_name=first.name if first else None, adapter_version=first.version if first else None,
                user=req.user, conversation_id=conversation_id, **log_fields,
            ))  # fmt: skip
        return ex

    async def run(self, ex: Exchange) -> AsyncIterator[Delta]:
        """Yield deltas (of every choice, as they come) until every generation ends; always
        finishes the log row and metrics."""
        status, error = "client_disconnected", None
        try:
            if len(ex.choices) == 1:
                events = self._events(ex.choices[0])
            else:
                events = self._merged(ex)
            async for choice, event in events:
                if event.prompt_logprobs is not None:
                    choice.prompt_logprobs = event.prompt_logprobs
                if event.logprobs and choice.logprobs is not None:
                    choice.logprobs.extend(event.logprobs)
                if event.text or event.logprobs:
                    if ex.ttft is None:
                        ex.ttft = time.monotonic() - ex.started
                    choice.text += event.text
                    yield Delta(event.text, event.logprobs, choice.index)
                if event.final:
                    choice.done = True
                    choice.completion_tokens = event.completion_tokens
                    choice.cached_tokens = event.cached_tokens
                    if event.error:
                        status, error = "error", event.error
                        raise EngineFailure("generation failed; the request can be retried")
                    if event.finish_reason == "cancelled":
                        status = "client_disconnected"
                        break
                    choice.finish_reason = "length" if event.finish_reason == "timeout" else event.finish_reason
                    if event.finish_reason == "timeout":
                        error = "generation time cap reached"
                    if ex.tools and choice.finish_reason == "stop":
                        calls = tools.parse_calls(choice.text, ex.tools)
                        if calls:
                            choice.tool_calls = calls[:1] if ex.one_call else calls
                            choice.finish_reason = "tool_calls"
            else:
                status = "completed"
        finally:
            if status != "completed":
                ex.cancel()
            self._finish(ex, status, error)

    @staticmethod
    async def _events(choice: Choice) -> AsyncIterator[tuple[Choice, Any]]:
        async for event in choice.stream:
            yield choice, event

    @staticmethod
    async def _merged(ex: Exchange) -> AsyncIterator[tuple[Choice, Any]]:
        """The events of every choice, in arrival order."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for event in choice.stream:
                await queue.put((choice, event))

        tasks = [asyncio.create_task(pump(c)) for c in ex.choices]
        try:
            remaining = len(tasks)
            while remaining:
                choice, event = await queue.get()
                if event.final:
                    remaining -= 1
                yield choice, event
        finally:
            for t in tasks:
                t.cancel()

    def _finish(self, ex: Exchange, status: str, error: str | None) -> None:
        ex.status = status
        if ex.lease:
            ex.lease.release()
        elapsed = time.monotonic() - ex.started
        plan = ex.plan
        adapter, version = metrics_labels(ex.adapters)
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
            self.log.finish(ex.id, ExchangeEnd(
                status=status, response=ex.text, finish_reason=ex.finish_reason,
                prompt_tokens=ex.prompt_tokens, completion_tokens=ex.completion_tokens,
                cached_tokens=ex.cached_tokens, ttft_ms=None if ex.ttft is None else ex.ttft * 1000,
                duration_ms=elapsed * 1000, error=error,
            ))  # fmt: skip

    def route_label_known(self, route: str) -> bool:
        return route in self.routes.routes or route == "base" or route.startswith("adapter:")


def _logged_params(params: SamplingParams) -> dict[str, Any]:
    """The sampling settings as the log row's ``params`` (JSON): a grammar is logged as text."""
    out = {k: v for k, v in vars(params).items() if k not in ("stop", "logit_bias")}
    out["stop"] = list(params.stop)
    if params.logit_bias:
        out["logit_bias"] = {str(t): b for t, b in params.logit_bias}
    return out
