"""Which adapter is meant, as one type at each stage, and which path a request takes.

Owns three small types and nothing else:

- `AdapterRef`: an adapter as a request or the routes file names it, not yet resolved:
  ``name`` (the current version) or ``name@N`` (a pinned one), and a scale;
- `AdapterUse`: that reference resolved against the catalog to one exact version on disk (name,
  version, scale, file, sha256). It travels from the lease to the ``X-Adapters`` header, the log
  row and the metrics labels; the engine gets the lease's loaded handles with the same scales;
- `PathKind`: the prompt path, the finetuned path, or the bare base.

vLLM's `LoRARequest` is the model: one object per adapter use, end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PathKind(StrEnum):
    """Which path serves a request (the log's ``path_kind`` column and the metrics' ``path`` label)."""

    PROMPT = "prompt"
    FINETUNED = "finetuned"
    BASE = "base"


class AdapterRef(BaseModel):
    """``{"name": "support-style", "scale": 1.0}`` in a request's ``adapters`` or a route's
    ``adapters``; ``name`` may pin a version (``support-style@3``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=200)
    scale: float = Field(1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


@dataclass(frozen=True)
class AdapterUse:
    """One adapter version applied to one request, resolved and checksummed."""

    name: str
    version: int
    scale: float
    path: Path
    sha256: str

    @property
    def key(self) -> str:
        """``name@N``: the version's identity in the catalog, the cache and the logs."""
        return f"{self.name}@{self.version}"

    def header(self) -> str:
        """The ``X-Adapters`` entry: ``name@N:scale``."""
        return f"{self.key}:{self.scale:g}"

    def to_log(self) -> dict[str, Any]:
        """The entry in the log row's ``adapters`` column (docs/conversation-log.md)."""
        return {"name": self.name, "version": self.version, "scale": self.scale}


def metrics_labels(uses: list[AdapterUse]) -> tuple[str, str]:
    """(adapter, version) label values for a request's adapters: '' when none, '+'-joined when many."""
    if not uses:
        return "", ""
    return "+".join(u.name for u in uses), "+".join(str(u.version) for u in uses)
