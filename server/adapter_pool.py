"""The server's live view of the adapters directory: what can be served, what is loaded, who holds it.

Owns hot reload and adapter lifetimes. A request takes a `Lease` on one exact version (name@N)
before it starts and releases it when it ends; a reload swaps the pool's view atomically, so a
request in flight finishes on the version it started with, and a version is freed in llama.cpp only
when no lease holds it. Loaded versions beyond `max_loaded` are unloaded least recently used first.
Every version is validated (server.registry) before llama.cpp sees it; a refused version is logged
and reported, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from server import registry
from server.engine import Engine, LoraHandle, probe_adapter
from server.gguf_info import BaseModelInfo

log = logging.getLogger(__name__)


class PoolObserver(Protocol):
    def adapter_loaded(self, name: str) -> None: ...
    def adapter_load_failed(self, name: str) -> None: ...
    def adapters_reloaded(self) -> None: ...
    def loaded_count(self, n: int) -> None: ...


@dataclass(eq=False)
class _Loaded:
    key: str  # name@version
    handle: LoraHandle
    sha256: str
    refs: int = 0
    stale: bool = False  # removed or replaced on disk: free when the last lease goes
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class AdapterVersionInfo:
    name: str
    version: int
    manifest: registry.Manifest
    path: Path
    rank: int


class Lease:
    """Holds loaded adapter versions for one request."""

    def __init__(self, pool: AdapterPool, items: list[tuple[_Loaded, AdapterVersionInfo, float]]) -> None:
        self._pool = pool
        self._items = items
        self._released = False

    @property
    def handles(self) -> list[tuple[LoraHandle, float]]:
        return [(loaded.handle, scale) for loaded, _, scale in self._items]

    @property
    def versions(self) -> list[dict[str, Any]]:
        return [{"name": info.name, "version": info.version, "scale": scale} for _, info, scale in self._items]

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release([loaded for loaded, _, _ in self._items])


class AdapterPool:
    """Adapters on disk (scanned, validated) and in llama.cpp (loaded, leased)."""

    def __init__(
        self,
        adapters_dir: Path,
        engine: Engine,
        base: BaseModelInfo,
        *,
        max_loaded: int = 8,
        observer: PoolObserver | None = None,
    ) -> None:
        self.adapters_dir = Path(adapters_dir)
        self.engine = engine
        self.base = base
        self.max_loaded = max_loaded
        self.observer = observer
        self.available: dict[str, dict[int, AdapterVersionInfo]] = {}
        self.current: dict[str, int] = {}
        self.refused: dict[str, str] = {}  # "name@N" or path -> reason
        self._validated: dict[tuple[str, str], registry.LoraFileInfo | str] = {}  # (key, sha256) -> info/reason
        self._sha_cache: dict = {}
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._retired: list[_Loaded] = []  # stale versions replaced under the same key, still leased
        self._loading: dict[str, asyncio.Lock] = {}
        self._fingerprint: tuple | None = None
        self._reload_lock = asyncio.Lock()
        self.scanned = False

    # ------------------------------------------------------------------ scanning

    def _fingerprint_now(self) -> tuple:
        entries = []
        try:
            for top in os.scandir(self.adapters_dir):
                if top.is_dir(follow_symlinks=False):
                    for e in os.scandir(top.path):
                        st = e.stat(follow_symlinks=False)
                        entries.append((top.name, e.name, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
                else:
                    entries.append((top.name,))
        except OSError:
            pass
        return tuple(sorted(entries))

    async def reload(self) -> dict[str, Any]:
        """Rescan the directory and swap the view; returns a summary for the admin endpoint."""
        async with self._reload_lock:
            self._fingerprint = self._fingerprint_now()
            result = await asyncio.to_thread(self._scan_and_validate)
            available, current, refused = result
            before = {(n, v) for n, vs in self.available.items() for v in vs}
            after = {(n, v) for n, vs in available.items() for v in vs}
            self.available, self.current, self.refused = available, current, refused
            self.scanned = True
            # versions that disappeared (or were refused now) are freed once no lease holds them
            for key, loaded in list(self._loaded.items()):
                name, _, ver = key.partition("@")
                info = available.get(name, {}).get(int(ver))
                if info is None or info.manifest.sha256 != loaded.sha256:
                    loaded.stale = True
                    self._maybe_free(key)
            if self.observer:
                self.observer.adapters_reloaded()
            added = sorted(f"{n}@{v}" for n, v in after - before)
            removed = sorted(f"{n}@{v}" for n, v in before - after)
            for key in added:
                log.info("adapter version available: %s", key)
            for key in removed:
                log.info("adapter version gone: %s", key)
            return {
                "adapters": {n: {"current": current[n], "versions": sorted(vs)} for n, vs in available.items()},
                "added": added,
                "removed": removed,
                "refused": dict(refused),
            }

    def _scan_and_validate(self) -> tuple[dict, dict, dict]:
        scan = registry.scan(self.adapters_dir, sha_cache=self._sha_cache)
        refused: dict[str, str] = {}
        for path, reason in scan.skipped:
            refused[path] = reason
        available: dict[str, dict[int, AdapterVersionInfo]] = {}
        current: dict[str, int] = {}
        for name, entry in scan.adapters.items():
            for version, ref in entry.versions.items():
                key = f"{name}@{version}"
                problem = self._check(ref)
                if isinstance(problem, str):
                    if key not in self.refused and self.observer:
                        self.observer.adapter_load_failed(name)
                    if key not in self.refused:
                        log.warning("adapter %s refused: %s", key, problem)
                    refused[key] = problem
                    continue
                available.setdefault(name, {})[version] = AdapterVersionInfo(
                    name, version, ref.manifest, ref.path, problem.rank
                )
            if name in available:
                versions = available[name]
                current[name] = entry.current if entry.current in versions else max(versions)
        return available, current, refused

    def _check(self, ref: registry.VersionRef) -> registry.LoraFileInfo | str:
        cache_key = (f"{ref.name}@{ref.version}", ref.manifest.sha256)
        cached = self._validated.get(cache_key)
        if cached is not None:
            return cached
        if ref.manifest.base_model_sha256 != self.base.sha256:
            result: registry.LoraFileInfo | str = (
                f"trained for base model sha256 {ref.manifest.base_model_sha256[:12]}..., "
                f"served base is {self.base.sha256[:12]}..."
            )
        else:
            try:
                result = registry.validate_lora_file(ref.path, self.base)
            except registry.AdapterInvalid as e:
                result = str(e)
            else:
                # the header looks right; now let llama.cpp itself load it, in a child process
                gpu_layers = self.engine.config.n_gpu_layers  # the probe loads the base as the engine did
                result = probe_adapter(self.base.path, ref.path, n_gpu_layers=gpu_layers) or result
        self._validated[cache_key] = result
        return result

    async def watch(self, interval_s: float) -> None:
        """Poll the directory; reload when anything in it changed."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self._fingerprint_now() != self._fingerprint:
                    await self.reload()
            except Exception:
                log.exception("adapter watch failed; will retry")

    # ------------------------------------------------------------------ resolving and leasing

    def resolve(self, ref: str) -> AdapterVersionInfo:
        """`name` or `name@N` -> a servable version; registry errors otherwise."""
        name, version = registry.parse_ref(ref)
        versions = self.available.get(name)
        if version is None:
            if not versions:
                reason = self.refused.get(f"{name}@{max(self._known_versions(name), default=0)}")
                raise registry.VersionNotFound(
                    f"adapter {name!r} is not available" + (f" (refused: {reason})" if reason else "")
                )
            return versions[self.current[name]]
        if not versions or version not in versions:
            reason = self.refused.get(f"{name}@{version}")
            raise registry.VersionNotFound(
                f"adapter version {name}@{version} is not available" + (f" (refused: {reason})" if reason else "")
            )
        return versions[version]

    def _known_versions(self, name: str) -> list[int]:
        out = []
        for key in self.refused:
            n, _, v = key.partition("@")
            if n == name and v.isdigit():
                out.append(int(v))
        return out

    def availability(self, refs: list[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for ref in refs:
            try:
                self.resolve(ref)
                out[ref] = None
            except registry.RegistryError as e:
                out[ref] = str(e)
        return out

    async def acquire(self, specs: list[tuple[str, float]]) -> Lease:
        """Resolve and load each adapter, holding it until `Lease.release()`."""
        items: list[tuple[_Loaded, AdapterVersionInfo, float]] = []
        try:
            for ref, scale in specs:
                info = self.resolve(ref)
                loaded = await self._load(info)
                loaded.refs += 1
                items.append((loaded, info, scale))
        except BaseException:
            self._release([loaded for loaded, _, _ in items])
            raise
        return Lease(self, items)

    async def _load(self, info: AdapterVersionInfo) -> _Loaded:
        key = f"{info.name}@{info.version}"
        loaded = self._loaded.get(key)
        if loaded is not None and not loaded.stale:
            self._loaded.move_to_end(key)
            loaded.last_used = time.monotonic()
            return loaded
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            loaded = self._loaded.get(key)
            if loaded is not None and not loaded.stale:
                return loaded
            try:
                # the file was checksummed when it was scanned, maybe long ago: check it again now,
                # right before llama.cpp reads it (the price: hashing a few MB on an LRU miss)
                digest = await asyncio.to_thread(registry.sha256_file, info.path)
                if digest != info.manifest.sha256:
                    raise ValueError("sha256 mismatch with its manifest (file changed or corrupt)")
                handle = await self.engine.load_adapter(info.path)
            except (ValueError, OSError) as e:
                self.refused[key] = str(e)
                self.available.get(info.name, {}).pop(info.version, None)
                if self.observer:
                    self.observer.adapter_load_failed(info.name)
                raise registry.AdapterInvalid(f"adapter {key} could not be loaded: {e}") from None
            old = self._loaded.pop(key, None)
            if old is not None:  # a stale copy still leased: keep it aside until released
                self._retired.append(old)
            loaded = _Loaded(key, handle, info.manifest.sha256)
            self._loaded[key] = loaded
            if self.observer:
                self.observer.adapter_loaded(info.name)
            log.info("loaded adapter %s (rank %d)", key, info.rank)
            self._evict()
            return loaded

    def _evict(self) -> None:
        """Unload least recently used versions beyond max_loaded (only those nobody holds)."""
        excess = len(self._loaded) - self.max_loaded
        for key, loaded in list(self._loaded.items()):
            if excess <= 0:
                break
            if loaded.refs == 0:
                self._free(key)
                excess -= 1
        self._report()

    def _release(self, items: list[_Loaded]) -> None:
        for loaded in items:
            loaded.refs -= 1
            if loaded in self._retired and loaded.refs <= 0:
                self._retired.remove(loaded)
                self.engine.free_adapter(loaded.handle)
            elif loaded.stale:
                self._maybe_free(loaded.key)
        self._evict()

    def _maybe_free(self, key: str) -> None:
        loaded = self._loaded.get(key)
        if loaded is not None and loaded.refs <= 0:
            self._free(key)

    def _free(self, key: str) -> None:
        loaded = self._loaded.pop(key)
        self.engine.free_adapter(loaded.handle)
        log.info("unloaded adapter %s", key)
        self._report()

    def _report(self) -> None:
        if self.observer:
            self.observer.loaded_count(len(self._loaded))

    @property
    def loaded_keys(self) -> list[str]:
        return list(self._loaded)

    def close(self) -> None:
        for key in list(self._loaded):
            self._free(key)
        for loaded in self._retired:
            self.engine.free_adapter(loaded.handle)
        self._retired.clear()
