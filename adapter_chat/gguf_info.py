"""Reading GGUF headers with the `gguf` package (no llama.cpp involved).

Owns: what we need to know about a base model file before and beside llama.cpp — its sha256,
architecture, tensor shapes (to validate adapters), chat template and special tokens (to render
prompts the same way in the server and the trainer).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    """A scalar or string metadata value, or None when the key is absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def numpy_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """GGUF stores ggml `ne` order (fastest dimension first); numpy order is the reverse."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


@dataclass(frozen=True)
class BaseModelInfo:
    """What the server and the trainer know about a base GGUF model, read once at start-up."""

    path: Path
    sha256: str
    architecture: str
    name: str
    context_length: int | None
    chat_template: str | None
    bos_token: str
    eos_token: str
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | str, *, sha256: str | None = None) -> BaseModelInfo:
        path = Path(path)
        reader = gguf.GGUFReader(path)
        arch = str(field_value(reader, "general.architecture") or "")
        tokens = reader.fields.get("tokenizer.ggml.tokens")

        def token_text(key: str) -> str:
            idx = field_value(reader, key)
            if tokens is None or idx is None:
                return ""
            return str(tokens.contents(int(idx)))

        ctx = field_value(reader, f"{arch}.context_length")
        return cls(
            path=path,
            sha256=sha256 or sha256_file(path),
            architecture=arch,
            name=path.name,
            context_length=int(ctx) if ctx is not None else None,
            chat_template=field_value(reader, "tokenizer.chat_template"),
            bos_token=token_text("tokenizer.ggml.bos_token_id"),
            eos_token=token_text("tokenizer.ggml.eos_token_id"),
            tensor_shapes={t.name: numpy_shape(t) for t in reader.tensors},
        )
