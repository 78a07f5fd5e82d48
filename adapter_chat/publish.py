"""Publishing adapter versions: atomic, crash-safe, validated before the commit; rollback.

Owns the write side of docs/adapter-format.md ("Publishing protocol"): `publish_version` and
`import_lora` add a version under an exclusive lock (weights, then manifest, then `CURRENT`, each
written to a temporary file, fsynced and renamed), `set_current` and `rollback` move `CURRENT`,
and old versions are pruned to `keep`. A file that `registry.validate_lora_file` refuses is never
published, so the trainer cannot publish a version the server refuses. The read side (names,
manifests, which version is current) is `adapter_chat/registry.py`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from adapter_chat.gguf_info import BaseModelInfo, sha256_file
from adapter_chat.registry import (
    CURRENT_FILE,
    WEIGHTS_FILE_RE,
    AdapterInvalid,
    Manifest,
    VersionNotFound,
    complete_refs,
    folder_of,
    pick_current,
    read_manifest,
    validate_lora_file,
    validate_name,
    version_numbers,
    write_lora_gguf,
)

log = logging.getLogger(__name__)


# The step boundaries of `publish_version`, in order (docs/adapter-format.md, "Publishing protocol").
# A crash between any two of them leaves the folder in a state the server reads correctly; the
# crash-consistency tests (tests/test_publish_faults.py) kill a real publisher at each one.
PUBLISH_STEPS: tuple[str, ...] = (
    "locked",                # lock held, leftovers cleaned, version number chosen; nothing written
    "weights_tmp_partial",   # .v<N>.gguf.tmp half written, not synced
    "weights_tmp_synced",    # .v<N>.gguf.tmp complete and fsynced, not renamed
    "weights_renamed",       # v<N>.gguf in place without a manifest: invisible
    "manifest_tmp_synced",   # .v<N>.json.tmp fsynced, not renamed
    "manifest_renamed",      # v<N>.json in place: the version is complete (CURRENT still names the old one)
    "current_tmp_synced",    # .CURRENT.tmp fsynced, not renamed
    "current_renamed",       # CURRENT names v<N>: the new version is current
    "pruning",               # prune under way: an old version's manifest is gone, its weights not yet
    "done",                  # pruned, folder fsynced, lock about to be released
)  # fmt: skip

_fault_hook: Callable[[str], None] | None = None


def set_fault_hook(hook: Callable[[str], None] | None) -> None:
    """Call `hook(step)` at each publishing step boundary (PUBLISH_STEPS); None switches it off.

    A test seam for crash-consistency tests, which install a hook that SIGKILLs the process at
    one step. Inert unless installed: nothing in the server or trainer installs one.
    """
    global _fault_hook
    _fault_hook = hook


def _step(name: str) -> None:
    if _fault_hook is not None:
        _fault_hook(name)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def _write_synced(tmp: Path, chunks: Iterator[bytes], *, partial_step: str | None = None) -> None:
    """Write `chunks` to `tmp` and fsync it; `partial_step` marks the point after the first chunk."""
    with open(tmp, "wb") as f:
        for i, chunk in enumerate(chunks):
            f.write(chunk)
            if i == 0 and partial_step:
                f.flush()
                _step(partial_step)
        f.flush()
        os.fsync(f.fileno())


def _file_chunks(src: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(src, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def _commit(tmp: Path, target: Path, folder: Path) -> None:
    """Rename into place and fsync the folder, so each rename is durable before the next step."""
    os.replace(tmp, target)
    _fsync_dir(folder)


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    tmp = _tmp_name(target)
    _write_synced(tmp, iter([data]))
    _commit(tmp, target, target.parent)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _clean_leftovers(folder: Path) -> list[str]:
    """Under the lock: remove what a killed publisher left (temp files, weights without a manifest).

    Nobody else writes in the folder while we hold the lock, so such files can only be leftovers.
    """
    removed = []
    manifests = set(version_numbers(folder))
    for entry in os.listdir(folder):
        orphan = WEIGHTS_FILE_RE.fullmatch(entry)
        leftover_tmp = entry.startswith(".") and entry.endswith(".tmp")
        if leftover_tmp or (orphan and int(orphan.group(1)) not in manifests):
            try:
                (folder / entry).unlink()
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


def publish_version(
    adapters_dir: Path,
    name: str,
    gguf_path: Path,
    *,
    base_model_sha256: str,
    base_model_name: str | None = None,
    architecture: str | None = None,
    rank: int,
    alpha: float | None = None,
    parent_version: int | None = None,
    metrics: dict[str, Any] | None = None,
    data_window: dict[str, Any] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    targets: list[str] | None = None,
    keep: int = 5,
    trainer_run_id: int | None = None,
) -> Manifest:
    """Publish `gguf_path` as the next version of `name`, atomically, and make it current.

    On an error (a full disk, an I/O error) the folder is put back as it was and the error is
    raised: the old version stays current. A process killed at any point leaves either the old
    version current, or the new one complete (and current once CURRENT was renamed); the next
    publish removes what the killed one left.
    """
    folder = folder_of(adapters_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        _clean_leftovers(folder)
        existing = version_numbers(folder)
        version = (max(existing) if existing else 0) + 1
        if parent_version is None:
            cur = pick_current(folder, complete_refs(folder, False, None, []))
            parent_version = cur.version if cur else None
        target = folder / f"v{version}.gguf"
        manifest_path = folder / f"v{version}.json"
        _step("locked")
        committed = False  # True once CURRENT names the new version: from then on the publish stands
        try:
            _write_synced(_tmp_name(target), _file_chunks(Path(gguf_path)), partial_step="weights_tmp_partial")
            _step("weights_tmp_synced")
            _commit(_tmp_name(target), target, folder)
            _step("weights_renamed")
            manifest = Manifest(
                name=name,
                version=version,
                file=target.name,
                sha256=sha256_file(target),
                base_model_sha256=base_model_sha256,
                base_model_name=base_model_name,
                architecture=architecture,
                rank=rank,
                alpha=alpha,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                parent_version=parent_version,
                metrics=metrics or {},
                data_window=data_window or {},
                hyperparameters=hyperparameters or {},
                targets=targets or [],
                trainer_run_id=trainer_run_id,
            )
            _write_synced(_tmp_name(manifest_path), iter([manifest.model_dump_json(indent=2).encode()]))
            _step("manifest_tmp_synced")
            _commit(_tmp_name(manifest_path), manifest_path, folder)
            _step("manifest_renamed")
            current = folder / CURRENT_FILE
            _write_synced(_tmp_name(current), iter([f"{version}\n".encode()]))
            _step("current_tmp_synced")
            _commit(_tmp_name(current), current, folder)
            committed = True
            _step("current_renamed")
        except BaseException:
            if not committed:
                _undo_publish(folder, version)
            raise
        try:
            _prune(folder, keep=keep, current=version)
        except OSError as e:  # housekeeping: the new version is published and current either way
            log.warning("publish %s@%d: pruning old versions failed: %s", name, version, e)
        _step("done")
    return manifest


def import_lora(
    adapters_dir: Path,
    name: str,
    src: Path,
    base: BaseModelInfo,
    *,
    scale: float = 1.0,
    note: str | None = None,
    keep: int = 5,
) -> Manifest:
    """Publish a LoRA GGUF made elsewhere (PEFT -> llama.cpp's ``convert_lora_to_gguf.py``, or any
    tool writing that layout) as the next version of ``name``, with a manifest built from the file.

    The file is validated against ``base`` exactly as the trainer's own output is (AdapterInvalid
    says why: another architecture, tensors that do not fit the base, not a LoRA GGUF, ...). With
    ``scale`` other than 1 the file is rewritten in F32 with its alpha multiplied by ``scale``, so
    that a route's ``scale = 1.0`` serves the adapter at that strength.
    """
    validate_name(name)
    src = Path(src)
    if not src.is_file():
        raise AdapterInvalid(f"{src}: no such file")
    if not (np.isfinite(scale) and scale > 0):
        raise AdapterInvalid(f"scale must be a positive number, not {scale}")
    info = validate_lora_file(src, base)
    alpha = info.alpha if info.alpha is not None else float(info.rank)
    hyper: dict[str, Any] = {"source": "import", "imported_file": src.name, "imported_sha256": sha256_file(src)}
    if note:
        hyper["note"] = note
    targets = sorted({t.split(".")[2] if t.startswith("blk.") else t for t in info.targets})
    folder = folder_of(adapters_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(adapters_dir) / f".import-{name}-{os.getpid()}.gguf.tmp"  # not in the folder: publishing cleans it
    try:
        publish_from = src
        if scale != 1.0:
            reader = gguf.GGUFReader(src)
            tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
            pairs = {n: (tensors[f"{n}.lora_a"], tensors[f"{n}.lora_b"]) for n in info.targets}
            alpha *= scale
            write_lora_gguf(tmp, architecture=base.architecture, pairs=pairs, alpha=alpha,
                            metadata={"training.note": f"imported from {src.name}, scale {scale:g}"})
            publish_from = tmp
            hyper["scale"] = scale
        return publish_version(
            adapters_dir, name, publish_from, base_model_sha256=base.sha256, base_model_name=base.name,
            architecture=base.architecture, rank=info.rank, alpha=alpha, hyperparameters=hyper,
            targets=targets, keep=keep,
        )
    finally:
        tmp.unlink(missing_ok=True)


def _undo_publish(folder: Path, version: int) -> None:
    """A publish failed before CURRENT named the new version: remove every trace of it (manifest
    first, so the version stops being complete before its weights go)."""
    for path in (folder / f"v{version}.json", folder / f"v{version}.gguf", _tmp_name(folder / f"v{version}.json"),
                 _tmp_name(folder / f"v{version}.gguf"), _tmp_name(folder / CURRENT_FILE)):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # the next publish cleans leftovers under the lock
    try:
        _fsync_dir(folder)
    except OSError:
        pass


def _prune(folder: Path, *, keep: int, current: int) -> None:
    versions = version_numbers(folder)
    doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != current]
    for v in doomed:
        # manifest first: the version stops being complete before its weights go
        (folder / f"v{v}.json").unlink(missing_ok=True)
        _step("pruning")
        (folder / f"v{v}.gguf").unlink(missing_ok=True)
    _fsync_dir(folder)


def set_current(adapters_dir: Path, name: str, version: int) -> None:
    """Point `name` at one of its complete versions."""
    folder = folder_of(adapters_dir, name)
    with _locked(folder):
        _set_current_locked(folder, version)


def _set_current_locked(folder: Path, version: int) -> None:
    read_manifest(folder, version, verify=True, sha_cache=None)
    _atomic_write_bytes(folder / CURRENT_FILE, f"{version}\n".encode())


def rollback(adapters_dir: Path, name: str) -> int:
    """Make the complete version before the current one current; return it.

    Decided and written under the publishing lock, so a publish running at the same time cannot
    slip a new version in between.
    """
    folder = folder_of(adapters_dir, name)
    if not folder.is_dir() or folder.is_symlink():
        raise VersionNotFound(f"adapter {name!r} not found")
    with _locked(folder):
        refs = complete_refs(folder, True, None, [])
        cur = pick_current(folder, refs)
        if cur is None:
            raise VersionNotFound(f"adapter {name!r} has no complete version")
        older = [r.version for r in refs if r.version < cur.version]
        if not older:
            raise VersionNotFound(f"adapter {name!r} has no version before {cur.version} to roll back to")
        _set_current_locked(folder, older[-1])
    return older[-1]


__all__ = [
    "PUBLISH_STEPS",
    "import_lora",
    "publish_version",
    "rollback",
    "set_current",
    "set_fault_hook",
]
