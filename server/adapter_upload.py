"""Admin upload of a LoRA made elsewhere: ``POST /v1/adapters/{name}/versions``, the HTTP twin of
``python -m trainer import NAME FILE.gguf`` for teams without shell access.

Owns: streaming the request body into a temporary file in the adapters directory (the same
filesystem as the versions, so publishing is a rename), with the size limit enforced on the bytes
as they arrive and their sha256 computed on the way; checking the checksum the client sent; letting
llama.cpp load the file in a probe process, as the pool does before serving a version; and then
publishing it with ``adapter_chat.publish.import_lora`` (validated against the served base exactly like the
trainer's output, written atomically). Nothing is published unless every check passed, and the
temporary file is removed whatever happens. Raises the typed errors of ``server.errors``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from adapter_chat import registry
from adapter_chat.publish import import_lora
from adapter_chat.probe import probe_adapter
from adapter_chat.gguf_info import BaseModelInfo
from server.errors import Conflict, InvalidRequest, PayloadTooLarge

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class UploadRequest:
    """What the client asked for, from the path and the query string."""

    name: str
    sha256: str | None = None
    scale: float = 1.0
    note: str | None = None

    @classmethod
    def parse(cls, name: str, query: dict[str, str]) -> UploadRequest:
        unknown = sorted(set(query) - {"sha256", "scale", "note"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter(s) {', '.join(unknown)}: the upload takes sha256, "
                                 "scale and note", param=unknown[0])  # fmt: skip
        try:
            registry.validate_name(name)
        except registry.InvalidAdapterName as e:
            raise InvalidRequest(str(e), param="name") from None
        sha = query.get("sha256")
        if sha is not None and not SHA256_RE.fullmatch(sha.lower()):
            raise InvalidRequest("sha256 must be 64 hex digits (`sha256sum FILE`)", param="sha256")
        try:
            scale = float(query.get("scale", "1"))
        except ValueError:
            raise InvalidRequest(f"scale must be a number, not {query['scale'][:40]!r}", param="scale") from None
        if not (scale > 0 and scale != float("inf")):
            raise InvalidRequest("scale must be a positive number", param="scale")
        return cls(name=name, sha256=sha.lower() if sha else None, scale=scale, note=query.get("note") or None)


async def receive(chunks: AsyncIterator[bytes], folder: Path, *, limit: int, announced: int | None) -> tuple[Path, str]:
    """Write the body to a new hidden file in ``folder``; returns (path, sha256). Over ``limit``
    bytes (announced or streamed) raises PayloadTooLarge and leaves no file behind."""
    too_large = PayloadTooLarge(
        f"the adapter file is larger than the upload limit of {limit} bytes (CHAT_MAX_ADAPTER_UPLOAD_BYTES)"
    )
    if announced is not None and announced > limit:
        raise too_large
    path = folder / f".upload-{uuid.uuid4().hex}.gguf.tmp"
    digest, size = hashlib.sha256(), 0
    f = await asyncio.to_thread(open, path, "wb")
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            size += len(chunk)
            if size > limit:
                raise too_large
            digest.update(chunk)
            await asyncio.to_thread(f.write, chunk)
        await asyncio.to_thread(_sync_close, f)
    except BaseException:
        f.close()
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise InvalidRequest("the request body is empty: send the LoRA GGUF file as the body "
                             "(curl --data-binary @FILE.gguf)")  # fmt: skip
    return path, digest.hexdigest()


def _sync_close(f) -> None:  # noqa: ANN001
    f.flush()
    os.fsync(f.fileno())
    f.close()


def publish(
    adapters_dir: Path, upload: Path, sha256: str, req: UploadRequest, base: BaseModelInfo, *, n_gpu_layers: int,
    keep: int = 5,
) -> registry.Manifest:
    """Check and publish a received file (blocking: run off the event loop). The file is removed."""
    try:
        if req.sha256 is not None and req.sha256 != sha256:
            raise InvalidRequest(
                f"the uploaded file's sha256 is {sha256}, the request said {req.sha256}: the file changed on "
                "the way (or the wrong file was sent); nothing was published", param="sha256",
            )  # fmt: skip
        try:
            registry.validate_lora_file(upload, base)
        except registry.AdapterInvalid as e:
            raise InvalidRequest(f"not a LoRA for the served base: {e}", param="file") from None
        problem = probe_adapter(base.path, upload, n_gpu_layers=n_gpu_layers)
        if problem is not None:
            raise InvalidRequest(problem, param="file")
        try:
            return import_lora(adapters_dir, req.name, upload, base, scale=req.scale, note=req.note, keep=keep)
        except registry.AdapterInvalid as e:
            raise InvalidRequest(str(e), param="file") from None
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise Conflict(
                f"this server cannot write {adapters_dir} ({e.strerror}): its adapters directory is read-only, as "
                "in the compose and Kubernetes setups; publish where it is writable with "
                f"`python -m trainer import {req.name} FILE.gguf`",
            ) from None
    finally:
        upload.unlink(missing_ok=True)


def writable_folder(adapters_dir: Path) -> Path:
    """The folder uploads are received in (the adapters directory itself), or Conflict when this
    server may not write there."""
    adapters_dir = Path(adapters_dir)
    if not os.access(adapters_dir, os.W_OK):
        raise Conflict(
            f"this server cannot write {adapters_dir}: its adapters directory is read-only, as in the compose and "
            "Kubernetes setups; publish where it is writable with `python -m trainer import NAME FILE.gguf`"
        )
    return adapters_dir
