"""Routes: what a request's `model` field selects, and which path (prompt or finetuned) it takes.

Owns the routes file (TOML, docs in prompts/README.md) and the pure decision logic:

    [routes.support]
    prompt = "support.j2"                      # prompt path: system prompt template from prompts/
    variables = { company = "Acme" }           # template variables
    adapters = [{ name = "support-style", scale = 1.0 }]   # finetuned path
    adapter_prompt = "support-short.j2"        # optional system prompt on the finetuned path
    split = 50                                 # % of conversations on the finetuned path
    log = true                                 # log exchanges of this route
    [routes.support.params]                    # default sampling parameters
    temperature = 0.7

No I/O beyond reading the routes file and templates at load time.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapter_chat.chat_template import ChatTemplateError, render_system_prompt, sandbox
from adapter_chat.identity import AdapterRef, PathKind
from adapter_chat.registry import InvalidAdapterName, parse_ref

PARAM_KEYS = {
    "temperature", "top_p", "top_k", "min_p", "max_tokens", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "seed", "stop",
}  # fmt: skip


class RoutesFileError(ValueError):
    """The routes file or one of its templates is invalid; the message lists every problem."""


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    variables: dict[str, Any] = {}
    adapters: list[AdapterRef] = []
    adapter_prompt: str | None = None
    split: float | None = Field(None, ge=0, le=100)
    log: bool = True
    params: dict[str, Any] = {}
    description: str | None = None


@dataclass(frozen=True)
class Route:
    """A configured route with its system prompts rendered."""

    name: str
    prompt_system: str | None  # rendered system prompt of the prompt path
    adapters: tuple[AdapterRef, ...]  # the finetuned path's adapters
    adapter_system: str | None
    split: float  # percent of conversations sent to the finetuned path
    log: bool
    params: dict[str, Any]
    description: str | None = None

    @property
    def has_prompt_path(self) -> bool:
        return self.prompt_system is not None or not self.adapters

    @property
    def has_finetuned_path(self) -> bool:
        return bool(self.adapters)


@dataclass(frozen=True)
class Plan:
    """What one request will run: route, path, adapters, system prompt, defaults."""

    route: str
    path_kind: PathKind
    adapters: tuple[AdapterRef, ...] = ()
    system_prompt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    log: bool = True
    fallback_reason: str | None = None


def bucket(key: str) -> float:
    """A stable number in [0, 100) for a conversation key (sticky traffic split)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % 10000 / 100.0


class RouteTable:
    """All routes from the routes file."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes

    @classmethod
    def empty(cls) -> RouteTable:
        return cls({})

    @classmethod
    def load(cls, path: Path, prompts_dir: Path) -> RouteTable:
        if not path.exists():
            return cls.empty()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise RoutesFileError(f"{path}: {e}") from None
        problems: list[str] = []
        routes: dict[str, Route] = {}
        raw_routes = data.get("routes", {})
        if not isinstance(raw_routes, dict):
            raise RoutesFileError(f"{path}: [routes] must be a table of route tables")
        for name, raw in raw_routes.items():
            try:
                spec = RouteSpec.model_validate(raw)
                routes[name] = _build(name, spec, prompts_dir)
            except ValidationError as e:
                problems.extend(f"routes.{name}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            except (RoutesFileError, ChatTemplateError, InvalidAdapterName) as e:
                problems.append(f"routes.{name}: {e}")
        if problems:
            raise RoutesFileError(f"{path}: " + "; ".join(problems))
        return cls(routes)

    def get(self, name: str) -> Route | None:
        return self.routes.get(name)

    def plan(self, route: Route, *, sticky_key: str, available: dict[str, str | None]) -> Plan:
        """Choose the path for one request.

        `available` maps each of the route's adapter refs to None when it can be served, or to the
        reason it cannot (missing, refused). A finetuned path with a missing adapter falls back to
        the prompt path when there is one, and the plan says why.
        """
        base = dict(route.params)
        if route.has_finetuned_path:
            to_finetuned = not route.has_prompt_path or bucket(f"{route.name}:{sticky_key}") < route.split
            if to_finetuned:
                missing = [f"{a.name}: {available.get(a.name) or 'unknown'}" for a in route.adapters
                           if available.get(a.name, "not found") is not None]
                if not missing:
                    return Plan(route.name, PathKind.FINETUNED, route.adapters, route.adapter_system, base, route.log)
                if route.prompt_system is None:
                    return Plan(route.name, PathKind.FINETUNED, route.adapters, route.adapter_system, base, route.log,
                                fallback_reason="; ".join(missing))
                return Plan(route.name, PathKind.PROMPT, (), route.prompt_system, base, route.log,
                            fallback_reason="adapter unavailable: " + "; ".join(missing))
        return Plan(route.name, PathKind.PROMPT, (), route.prompt_system, base, route.log)


def _template(prompts_dir: Path, name: str, variables: dict[str, Any]) -> str:
    if "/" in name or "\\" in name or name.startswith(".") or not name.endswith((".j2", ".jinja", ".txt", ".md")):
        raise RoutesFileError(f"template {name!r} must be a file name in the prompts directory ending in .j2")
    path = prompts_dir / name
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RoutesFileError(f"template {name!r}: {e.strerror}") from None
    sandbox().parse(source)  # syntax errors surface at load time
    return render_system_prompt(source, variables)


def _build(name: str, spec: RouteSpec, prompts_dir: Path) -> Route:
    for ref in spec.adapters:
        parse_ref(ref.name)
    unknown = set(spec.params) - PARAM_KEYS
    if unknown:
        raise RoutesFileError(f"unknown params {sorted(unknown)}; allowed: {sorted(PARAM_KEYS)}")
    prompt = _template(prompts_dir, spec.prompt, spec.variables) if spec.prompt else None
    adapter_prompt = _template(prompts_dir, spec.adapter_prompt, spec.variables) if spec.adapter_prompt else None
    split = spec.split if spec.split is not None else (100.0 if spec.adapters else 0.0)
    return Route(
        name=name,
        prompt_system=prompt,
        adapters=tuple(spec.adapters),
        adapter_system=adapter_prompt,
        split=split,
        log=spec.log,
        params=dict(spec.params),
        description=spec.description,
    )
