"""The adapter format on disk: names, versions, manifests, validation, reading the catalog.

Owns the contract in docs/adapter-format.md, read side: what a name, a version and a manifest are,
which versions of an adapter are complete and current, and whether a LoRA file fits a base
(`validate_lora_file`, also what a publish checks before it commits), plus writing a LoRA GGUF.
The server reads with this module and the trainer publishes through `adapter_chat/publish.py`,
which builds on it, so both always agree. No llama.cpp here: validation reads GGUF headers with
the `gguf` package before llama.cpp ever sees a file.

Error tree::

    RegistryError (ValueError)
    ├── InvalidAdapterName      a name that could escape the directory or is malformed
    ├── VersionNotFound         name or name@N has no complete version
    └── AdapterInvalid          a version exists but must not be loaded (reason says why)
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Mapping
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
    "complete_refs",
    "current_version",
    "folder_of",
    "list_versions",
    "parse_ref",
    "pick_current",
    "read_manifest",
    "resolve",
    "scan",
    "sha256_file",
    "validate_lora_file",
    "validate_name",
    "version_numbers",
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


def folder_of(adapters_dir: Path, name: str) -> Path:
    return Path(adapters_dir) / validate_name(name)


def read_manifest(folder: Path, version: int, *, verify: bool, sha_cache: dict | None) -> VersionRef:
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


def version_numbers(folder: Path) -> list[int]:
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
    return [ref.manifest for ref in complete_refs(folder_of(adapters_dir, name), verify, sha_cache, [])]


def complete_refs(folder: Path, verify: bool, sha_cache: dict | None, problems: list) -> list[VersionRef]:
    refs = []
    if not folder.is_dir() or folder.is_symlink():
        return refs
    for v in version_numbers(folder):
        try:
            refs.append(read_manifest(folder, v, verify=verify, sha_cache=sha_cache))
        except RegistryError as e:
            problems.append((folder / f"v{v}.json", str(e)))
    return refs


def pick_current(folder: Path, refs: list[VersionRef]) -> VersionRef | None:
    if not refs:
        return None
    pointer = _read_current(folder)
    by_version = {r.version: r for r in refs}
    if pointer is not None and pointer in by_version:
        return by_version[pointer]
    return refs[-1]


def current_version(adapters_dir: Path, name: str) -> int | None:
    """The version `name` resolves to, or None when it has no complete version."""
    folder = folder_of(adapters_dir, name)
    ref = pick_current(folder, complete_refs(folder, True, None, []))
    return ref.version if ref else None


def resolve(adapters_dir: Path, ref: str, *, sha_cache: dict | None = None) -> VersionRef:
    """`name` or `name@N` -> the complete version on disk, or VersionNotFound / AdapterInvalid."""
    name, version = parse_ref(ref)
    folder = folder_of(adapters_dir, name)
    if not folder.is_dir() or folder.is_symlink():
        raise VersionNotFound(f"adapter {name!r} not found")
    if version is not None:
        return read_manifest(folder, version, verify=True, sha_cache=sha_cache)
    cur = pick_current(folder, complete_refs(folder, True, sha_cache, []))
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
        refs = complete_refs(folder, True, sha_cache, problems)
        result.skipped.extend((str(p), r) for p, r in problems)
        cur = pick_current(folder, refs)
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
