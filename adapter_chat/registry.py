"""The adapter format on disk: names, versions, manifests, validation, atomic publishing.

Owns the contract in docs/adapter-format.md. The trainer publishes with this module and the
server reads with it, so both always agree. No llama.cpp here: validation reads GGUF headers
with the `gguf` package before llama.cpp ever sees a file.

Error tree::

    RegistryError (ValueError)
    ├── InvalidAdapterName      a name that could escape the directory or is malformed
    ├── VersionNotFound         name or name@N has no complete version
    └── AdapterInvalid          a version exists but must not be loaded (reason says why)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from adapter_chat.gguf_info import BaseModelInfo, field_value, numpy_shape, sha256_file

__all__ = [
    "AdapterInvalid",
    "InvalidAdapterName",
    "LoraFileInfo",
    "Manifest",
    "RegistryError",
    "ScanResult",
    "VersionNotFound",
    "VersionRef",
    "current_version",
    "import_lora",
    "list_versions",
    "parse_ref",
    "publish_version",
    "resolve",
    "rollback",
    "scan",
    "set_current",
    "set_fault_hook",
    "sha256_file",
    "validate_lora_file",
    "validate_name",
    "write_lora_gguf",
]

FORMAT_VERSION = 1
# The 2-D matrices of a llama-architecture block that adapters carry by default (trainer and tests).
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_FILE_RE = re.compile(r"^v([1-9][0-9]{0,8})\.json$")
WEIGHTS_FILE_RE = re.compile(r"^v([1-9][0-9]{0,8})\.gguf$")
CURRENT_FILE = "CURRENT"

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """Base of the adapter registry errors."""


class InvalidAdapterName(RegistryError):
    pass


class VersionNotFound(RegistryError):
    pass


class AdapterInvalid(RegistryError):
    pass


def validate_name(name: str) -> str:
    """Return `name` if it is a safe adapter name, else raise InvalidAdapterName."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        shown = name[:80] + ("..." if isinstance(name, str) and len(name) > 80 else "")
        raise InvalidAdapterName(
            f"invalid adapter name {shown!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` -> (name, None); `name@3` -> (name, 3). Validates the name."""
    name, sep, ver = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not (ver.isascii() and ver.isdigit()) or ver[0] == "0" or not int(ver) < 10**9:  # one spelling per version
        raise InvalidAdapterName(f"invalid adapter version in {ref[:80]!r}: use name@N with N >= 1")
    return name, int(ver)


class Manifest(BaseModel):
    """One published adapter version (`v<N>.json`). Unknown keys are kept."""

    model_config = ConfigDict(extra="allow")

    format: int = FORMAT_VERSION
    name: str
    version: int
    file: str
    sha256: str
    base_model_sha256: str
    base_model_name: str | None = None
    architecture: str | None = None
    rank: int
    alpha: float | None = None
    created: str
    parent_version: int | None = None
    metrics: dict[str, Any] = {}
    data_window: dict[str, Any] = {}
    hyperparameters: dict[str, Any] = {}
    targets: list[str] = []
    trainer_run_id: int | None = None  # the trainer_runs row that published it (None: published by hand)


@dataclass(frozen=True)
class VersionRef:
    """A complete, checksummed version on disk."""

    manifest: Manifest
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version


def _folder(adapters_dir: Path, name: str) -> Path:
    return Path(adapters_dir) / validate_name(name)


def _read_manifest(folder: Path, version: int, *, verify: bool, sha_cache: dict | None) -> VersionRef:
    mpath = folder / f"v{version}.json"
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
        manifest = Manifest.model_validate(raw)
    except FileNotFoundError:
        raise VersionNotFound(f"{folder.name}@{version} has no manifest") from None
    except (OSError, ValueError, ValidationError) as e:
        raise AdapterInvalid(f"{folder.name}@{version}: unreadable manifest: {str(e)[:200]}") from None
    if manifest.version != version or manifest.name != folder.name or manifest.file != f"v{version}.gguf":
        raise AdapterInvalid(
            f"{folder.name}@{version}: manifest names {manifest.name}@{manifest.version} file {manifest.file!r}"
        )
    path = folder / manifest.file
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise AdapterInvalid(f"{folder.name}@{version}: {manifest.file} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise AdapterInvalid(f"{folder.name}@{version}: {manifest.file} is not a regular file")
    if verify:
        # ctime too: a write that restores the mtime (os.utime) still moves the ctime
        key = (str(path), st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        digest = sha_cache.get(key) if sha_cache is not None else None
        if digest is None:
            digest = sha256_file(path)
            if sha_cache is not None:
                sha_cache[key] = digest
        if digest != manifest.sha256:
            raise AdapterInvalid(f"{folder.name}@{version}: sha256 mismatch (file changed or corrupt)")
    return VersionRef(manifest=manifest, path=path)


def _version_numbers(folder: Path) -> list[int]:
    nums = []
    for entry in os.listdir(folder):
        m = VERSION_FILE_RE.fullmatch(entry)
        if m:
            nums.append(int(m.group(1)))
    return sorted(nums)


def _read_current(folder: Path) -> int | None:
    try:
        text = (folder / CURRENT_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def list_versions(
    adapters_dir: Path, name: str, *, verify: bool = True, sha_cache: dict | None = None
) -> list[Manifest]:
    """Complete versions of an adapter, oldest first."""
    return [ref.manifest for ref in _complete_refs(_folder(adapters_dir, name), verify, sha_cache, [])]


def _complete_refs(folder: Path, verify: bool, sha_cache: dict | None, problems: list) -> list[VersionRef]:
    refs = []
    if not folder.is_dir() or folder.is_symlink():
        return refs
    for v in _version_numbers(folder):
        try:
            refs.append(_read_manifest(folder, v, verify=verify, sha_cache=sha_cache))
        except RegistryError as e:
            problems.append((folder / f"v{v}.json", str(e)))
    return refs


def _pick_current(folder: Path, refs: list[VersionRef]) -> VersionRef | None:
    if not refs:
        return None
    pointer = _read_current(folder)
    by_version = {r.version: r for r in refs}
    if pointer is not None and pointer in by_version:
        return by_version[pointer]
    return refs[-1]


def current_version(adapters_dir: Path, name: str) -> int | None:
    """The version `name` resolves to, or None when it has no complete version."""
    folder = _folder(adapters_dir, name)
    ref = _pick_current(folder, _complete_refs(folder, True, None, []))
    return ref.version if ref else None


def resolve(adapters_dir: Path, ref: str, *, sha_cache: dict | None = None) -> VersionRef:
    """`name` or `name@N` -> the complete version on disk, or VersionNotFound / AdapterInvalid."""
    name, version = parse_ref(ref)
    folder = _folder(adapters_dir, name)
    if not folder.is_dir() or folder.is_symlink():
        raise VersionNotFound(f"adapter {name!r} not found")
    if version is not None:
        return _read_manifest(folder, version, verify=True, sha_cache=sha_cache)
    cur = _pick_current(folder, _complete_refs(folder, True, sha_cache, []))
    if cur is None:
        raise VersionNotFound(f"adapter {name!r} has no complete version")
    return cur


@dataclass
class AdapterEntry:
    """All complete versions of one adapter folder, and which one is current."""

    name: str
    versions: dict[int, VersionRef]
    current: int


@dataclass
class ScanResult:
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def scan(adapters_dir: Path, *, sha_cache: dict | None = None) -> ScanResult:
    """Every adapter folder with at least one complete version; everything else with a reason."""
    result = ScanResult()
    root = Path(adapters_dir)
    if not root.is_dir():
        result.skipped.append((str(root), "adapters directory does not exist"))
        return result
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=False) and not entry.is_symlink():
            continue  # README.md and friends
        if entry.is_symlink():
            result.skipped.append((entry.path, "symlinks are not followed"))
            continue
        if not entry.is_dir(follow_symlinks=False):
            result.skipped.append((entry.path, "not a regular folder"))
            continue
        if entry.name.startswith("."):
            continue
        try:
            validate_name(entry.name)
        except InvalidAdapterName as e:
            result.skipped.append((entry.path, str(e)))
            continue
        folder = Path(entry.path)
        for f in sorted(os.listdir(folder)):
            if f.endswith(".gguf") and not f.startswith(".") and not WEIGHTS_FILE_RE.fullmatch(f):
                result.skipped.append((str(folder / f), "a LoRA file without a manifest is not served; import it: "
                                       f"python -m trainer import {entry.name} {folder / f}"))
        problems: list[tuple[Path, str]] = []
        refs = _complete_refs(folder, True, sha_cache, problems)
        result.skipped.extend((str(p), r) for p, r in problems)
        cur = _pick_current(folder, refs)
        if cur is not None:
            result.adapters[entry.name] = AdapterEntry(entry.name, {r.version: r for r in refs}, cur.version)
    return result


# ---------------------------------------------------------------------------------------------
# GGUF LoRA files


@dataclass(frozen=True)
class LoraFileInfo:
    """What validation learnt about a LoRA GGUF file."""

    rank: int
    alpha: float | None
    targets: tuple[str, ...]  # base tensor names
    metadata: dict[str, Any]


def validate_lora_file(path: Path, base: BaseModelInfo) -> LoraFileInfo:
    """Check a LoRA GGUF against the base model without llama.cpp; AdapterInvalid says why."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf parser raises many kinds on crafted files
        raise AdapterInvalid(f"GGUF header unreadable: {type(e).__name__}: {str(e)[:160]}") from None
    try:
        gtype = field_value(reader, "general.type")
        atype = field_value(reader, "adapter.type")
        arch = field_value(reader, "general.architecture")
        alpha = field_value(reader, "adapter.lora.alpha")
    except Exception as e:
        raise AdapterInvalid(f"GGUF metadata unreadable: {type(e).__name__}") from None
    if gtype != "adapter":
        raise AdapterInvalid(f"general.type is {gtype!r}, expected 'adapter'")
    if atype != "lora":
        raise AdapterInvalid(f"adapter.type is {atype!r}, expected 'lora'")
    if arch != base.architecture:
        raise AdapterInvalid(f"architecture {arch!r} does not match the base model's {base.architecture!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not np.isfinite(alpha)):
        raise AdapterInvalid("adapter.lora.alpha is not a finite number")

    pairs: dict[str, dict[str, gguf.ReaderTensor]] = {}
    for t in reader.tensors:
        base_name, dot, kind = t.name.rpartition(".")
        if not dot or kind not in ("lora_a", "lora_b"):
            raise AdapterInvalid(f"unexpected tensor {t.name!r}: expected <base>.lora_a / <base>.lora_b")
        pairs.setdefault(base_name, {})[kind] = t
    if not pairs:
        raise AdapterInvalid("adapter has no lora_a/lora_b tensors")
    ranks = set()
    for base_name, pair in pairs.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise AdapterInvalid(f"{base_name}: lora_a and lora_b must come in pairs")
        if base_name not in base.tensor_shapes:
            raise AdapterInvalid(f"{base_name}: the base model has no such tensor")
        bshape = base.tensor_shapes[base_name]
        a, b = pair["lora_a"], pair["lora_b"]
        ashape, b_shape = numpy_shape(a), numpy_shape(b)
        if len(bshape) != 2 or len(ashape) != 2 or len(b_shape) != 2:
            raise AdapterInvalid(f"{base_name}: LoRA tensors must be 2-D")
        n_out, n_in = bshape
        r = ashape[0]
        if ashape != (r, n_in) or b_shape != (n_out, r):
            raise AdapterInvalid(
                f"{base_name}: shapes A{ashape} B{b_shape} do not fit base {bshape} "
                "(expected A (r, n_in), B (n_out, r))"
            )
        ranks.add(r)
        for t in (a, b):
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise AdapterInvalid(f"{t.name}: tensor type {t.tensor_type.name} not supported (F32/F16)")
            try:
                finite = bool(np.isfinite(t.data).all())
            except Exception:
                raise AdapterInvalid(f"{t.name}: tensor data unreadable (truncated file?)") from None
            if not finite:
                raise AdapterInvalid(f"{t.name}: holds NaN or Inf")
    if len(ranks) != 1:
        raise AdapterInvalid(f"LoRA ranks disagree across tensors: {sorted(ranks)}")
    meta = {}
    for key in reader.fields:
        if key.startswith(("general.", "adapter.", "training.")):
            try:
                meta[key] = reader.fields[key].contents()
            except Exception:
                pass
    return LoraFileInfo(
        rank=ranks.pop(),
        alpha=float(alpha) if alpha is not None else None,
        targets=tuple(sorted(pairs)),
        metadata=meta,
    )


def write_lora_gguf(
    path: Path,
    *,
    architecture: str,
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    alpha: float,
    metadata: Mapping[str, str | int | float] | None = None,
) -> None:
    """Write a llama.cpp LoRA GGUF: for each base tensor name, A (r, n_in) and B (n_out, r)."""
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for key, value in (metadata or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            writer.add_string(key, str(value))
        elif isinstance(value, int):
            writer.add_int64(key, value)
        else:
            writer.add_float32(key, value)
    for name, (a, b) in pairs.items():
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# Publishing (the trainer's side)

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
    manifests = set(_version_numbers(folder))
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
    folder = _folder(adapters_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        _clean_leftovers(folder)
        existing = _version_numbers(folder)
        version = (max(existing) if existing else 0) + 1
        if parent_version is None:
            cur = _pick_current(folder, _complete_refs(folder, False, None, []))
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
    folder = _folder(adapters_dir, name)
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
    versions = _version_numbers(folder)
    doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != current]
    for v in doomed:
        # manifest first: the version stops being complete before its weights go
        (folder / f"v{v}.json").unlink(missing_ok=True)
        _step("pruning")
        (folder / f"v{v}.gguf").unlink(missing_ok=True)
    _fsync_dir(folder)


def set_current(adapters_dir: Path, name: str, version: int) -> None:
    """Point `name` at one of its complete versions."""
    folder = _folder(adapters_dir, name)
    with _locked(folder):
        _set_current_locked(folder, version)


def _set_current_locked(folder: Path, version: int) -> None:
    _read_manifest(folder, version, verify=True, sha_cache=None)
    _atomic_write_bytes(folder / CURRENT_FILE, f"{version}\n".encode())


def rollback(adapters_dir: Path, name: str) -> int:
    """Make the complete version before the current one current; return it.

    Decided and written under the publishing lock, so a publish running at the same time cannot
    slip a new version in between.
    """
    folder = _folder(adapters_dir, name)
    if not folder.is_dir() or folder.is_symlink():
        raise VersionNotFound(f"adapter {name!r} not found")
    with _locked(folder):
        refs = _complete_refs(folder, True, None, [])
        cur = _pick_current(folder, refs)
        if cur is None:
            raise VersionNotFound(f"adapter {name!r} has no complete version")
        older = [r.version for r in refs if r.version < cur.version]
        if not older:
            raise VersionNotFound(f"adapter {name!r} has no version before {cur.version} to roll back to")
        _set_current_locked(folder, older[-1])
    return older[-1]
