"""The frozen lower blocks of a LoRA run: computed once per item and kept between runs.

Owns: ``[train] frozen_cache``. With ``top_layers = k`` a LoRA run adapts only the base's last k
blocks; the blocks below are frozen. Each packed item is its own sequence from position 0
(:mod:`trainer.packing`), so the lower blocks' output for it (the residual stream entering block
``n_layer - k``) depends on nothing but the base, the llama.cpp build and the item's tokens. A
nightly trains on the newest items, most of them the previous night's too, and its training
step spent about a third of its time in that forward pass. So:

- :func:`top_model` writes, once per base, a GGUF of the F32 base's upper k blocks renumbered
  from 0 (with the token embedding, which the tied output layer reads, and the output norm);
- :class:`FrozenBlocks` computes each sequence of a window (an item, a piece of a cut item, the
  padding) with ``trainer.llama_opt.BlockOutputs`` on the full F32 base, stores it as a ``.npy``
  file named by the sha256 of its tokens, in a folder named by the base, the build and the block,
  and hands each step its window's rows (``TrainSession.step(embd=...)``);
- the step then runs the k upper blocks only, forward and backward: the same gradient as the
  whole model's (the lower blocks hold no parameter), up to the rounding of computing a sequence
  alone rather than packed with others.

Files unused for :data:`KEEP_DAYS` days are deleted when a run opens the cache; deleting the
folder recomputes everything. File and ggml I/O; no llama.cpp here (``trainer.llama_opt`` is).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from adapter_chat.llama_model import native_build_id
from adapter_chat.registry import write_lora_gguf
from trainer.packing import Window

KEEP_DAYS = 7


def n_blocks(model: Path) -> int:
    """The model's block count (``<arch>.block_count``)."""
    reader = gguf.GGUFReader(model)
    arch = str(reader.fields["general.architecture"].contents())
    return int(reader.fields[f"{arch}.block_count"].contents())


def shift_name(name: str, offset: int) -> str:
    """``blk.<i>.rest`` -> ``blk.<i + offset>.rest``; other names unchanged."""
    parts = name.split(".", 2)
    if offset == 0 or len(parts) < 3 or parts[0] != "blk" or not parts[1].isdigit():
        return name
    return f"blk.{int(parts[1]) + offset}.{parts[2]}"


def top_model(base_f32: Path, first: int, dest: Path) -> Path:
    """Write ``dest`` (once; an existing file is kept): the F32 model ``base_f32`` with only its
    blocks ``first..n_layer-1``, renumbered from 0, every other tensor (token embedding, output
    norm, output) and all metadata kept, ``<arch>.block_count`` set to the blocks kept."""
    if dest.exists():
        return dest
    reader = gguf.GGUFReader(base_f32)
    arch = str(reader.fields["general.architecture"].contents())
    n_layer = int(reader.fields[f"{arch}.block_count"].contents())
    if not 0 < first < n_layer:
        raise ValueError(f"first block must be in 1..{n_layer - 1}, got {first}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        if f.name == f"{arch}.block_count":
            writer.add_uint32(f.name, n_layer - first)
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if sub is not None and f.name.startswith(f"{arch}.") and len(value) == n_layer:
            value = value[first:]  # a per-block array (e.g. head counts per layer)
        writer.add_key_value(f.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"{base_f32} is not an F32 model ({t.name} is {t.tensor_type.name})")
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) < first:
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        writer.add_tensor(shift_name(t.name, -first), np.asarray(t.data, dtype=np.float32).reshape(shape))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def shift_lora(src: Path, dest: Path, offset: int, *, architecture: str) -> Path:
    """Write ``dest``: the LoRA GGUF ``src`` with every block index moved by ``offset`` (alpha and
    tensors kept): a base's adapter for its upper-blocks model (``-first``)."""
    reader = gguf.GGUFReader(src)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    arrays = {t.name: np.asarray(t.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
              for t in reader.tensors}  # fmt: skip
    pairs = {shift_name(n[: -len(".lora_a")], offset): (a, arrays[n[: -len(".lora_a")] + ".lora_b"])
             for n, a in arrays.items() if n.endswith(".lora_a")}  # fmt: skip
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    write_lora_gguf(tmp, architecture=architecture, pairs=pairs, alpha=alpha)
    os.replace(tmp, dest)
    return dest


def runs(seq_ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """The [start, end) spans of equal consecutive ids: the sequences of a packed window."""
    start = 0
    for i in range(1, len(seq_ids) + 1):
        if i == len(seq_ids) or seq_ids[i] != seq_ids[start]:
            yield start, i
            start = i


@dataclass
class FrozenStats:
    """What a run's frozen-blocks cache did: sequences read from it and computed (with the time)."""

    cached: int = 0
    computed: int = 0
    compute_s: float = 0.0

    def report(self) -> dict[str, float | int]:
        return {"cached": self.cached, "computed": self.computed, "compute_s": round(self.compute_s, 1)}


class FrozenBlocks:
    """The lower blocks' output for a run's windows, from ``<cache_dir>/frozen/<base>-<build>-b<block>/``.

    ``base_f32``: the F32 base; the upper ``top_layers`` blocks train, ``first = n_layer -
    top_layers``. :meth:`prepare` computes the sequences not yet stored (one
    ``BlockOutputs`` decode each); :meth:`window` gives a window's ``(n_ctx, n_embd)`` rows."""

    def __init__(self, base_f32: Path, *, base_sha256: str, cache_dir: Path, top_layers: int, n_ctx: int,
                 threads: int) -> None:  # fmt: skip
        n_layer = n_blocks(base_f32)
        if not 0 < top_layers < n_layer:
            raise ValueError(f"frozen_cache needs 0 < top_layers < {n_layer} (the base's blocks), got {top_layers}")
        self.base_f32 = base_f32
        self.first = n_layer - top_layers
        self.n_ctx = n_ctx
        self.threads = threads
        build = native_build_id()
        self.dir = cache_dir / "frozen" / f"{base_sha256[:16]}-{build[:12]}-b{self.first - 1}"
        _expire(cache_dir / "frozen", KEEP_DAYS * 86400)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.top_model = top_model(base_f32, self.first, cache_dir / f"{base_sha256}.f32.top{top_layers}.gguf")
        self.stats = FrozenStats()

    def _path(self, tokens: Sequence[int]) -> Path:
        key = hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()
        return self.dir / f"{key}.npy"

    def prepare(self, windows: Sequence[Window]) -> FrozenStats:
        """Store every sequence of ``windows`` not stored yet; touch the ones that are."""
        missing: dict[Path, list[int]] = {}
        for w in windows:
            for a, b in self._runs(w):
                toks = list(w.inputs[a:b])
                path = self._path(toks)
                if path in missing:
                    continue
                if path.exists():
                    os.utime(path)
                    self.stats.cached += 1
                else:
                    missing[path] = toks
        if missing:
            from trainer.llama_opt import BlockOutputs

            t0 = time.perf_counter()
            with BlockOutputs(self.base_f32, block=self.first - 1, n_ctx=self.n_ctx, threads=self.threads) as blocks:
                for path, toks in missing.items():
                    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
                    np.save(tmp, blocks(toks))
                    os.replace(tmp, path)
            self.stats.computed += len(missing)
            self.stats.compute_s += time.perf_counter() - t0
        return self.stats

    @staticmethod
    def _runs(w: Window) -> Iterator[tuple[int, int]]:
        """The sequences of ``w`` a step computes: up to ``w.n_tokens`` (the padding after is not)."""
        n = w.n_tokens or len(w.seq_ids)
        return runs(w.seq_ids[:n])

    def window(self, w: Window) -> np.ndarray:
        """The ``(n_ctx, n_embd)`` input rows of window ``w`` (after :meth:`prepare`); zeros
        past ``w.n_tokens``, where the step computes nothing."""
        parts = [np.load(self._path(w.inputs[a:b])) for a, b in self._runs(w)]
        out = np.zeros((len(w.seq_ids), parts[0].shape[1]), dtype=np.float32)
        n = sum(len(p) for p in parts)
        out[:n] = np.concatenate(parts, axis=0)
        return out


def _expire(root: Path, max_age_s: float) -> None:
    if not root.is_dir():
        return
    cutoff = time.time() - max_age_s
    for p in root.glob("*/*.npy"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:
            pass
    for d in root.iterdir():
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


__all__ = ["FrozenBlocks", "FrozenStats", "KEEP_DAYS", "n_blocks", "runs", "shift_lora", "shift_name", "top_model"]
