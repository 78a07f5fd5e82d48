"""Adapter versions loaded in llama.cpp: loading on demand, leases, LRU eviction, freeing.

Owns adapter lifetimes, on the event loop. A request takes a `Lease` on exact versions before it
starts and releases it when it ends; a version is freed in llama.cpp only when no lease holds it.
A version the catalog no longer serves (removed, or replaced by another file under the same
name@N) turns stale: it is freed when its last lease goes, and a new request loads the new file.
Loaded versions beyond `max_loaded` are unloaded least recently used first. The file's sha256 is
checked again right before llama.cpp reads it; a mismatch or a load error goes to `on_load_failed`
(the catalog refuses the version) and raises `registry.AdapterInvalid`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from adapter_chat import registry
from adapter_chat.engine import Engine, LoraHandle
from adapter_chat.identity import AdapterUse
from server.adapter_catalog import AdapterVersionInfo

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


class Lease:
    """Holds loaded adapter versions for one request."""

    def __init__(self, cache: AdapterCache, items: list[tuple[_Loaded, AdapterVersionInfo, float]]) -> None:
        self._cache = cache
        self._items = items
        self._released = False

    @property
    def handles(self) -> list[tuple[LoraHandle, float]]:
        return [(loaded.handle, scale) for loaded, _, scale in self._items]

    @property
    def uses(self) -> list[AdapterUse]:
        """The leased versions, in request order, each with the scale it is applied at."""
        return [AdapterUse(info.name, info.version, scale, info.path, info.manifest.sha256)
                for _, info, scale in self._items]  # fmt: skip

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release([loaded for loaded, _, _ in self._items])


class AdapterCache:
    """The versions loaded in llama.cpp, who holds them, and which to unload next."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_loaded: int = 8,
        observer: PoolObserver | None = None,
        on_load_failed: Callable[[AdapterVersionInfo, str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_loaded = max_loaded
        self.observer = observer
        self._on_load_failed = on_load_failed
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._retired: list[_Loaded] = []  # stale versions replaced under the same key, still leased
        self._loading: dict[str, asyncio.Lock] = {}

    @property
    def loaded_keys(self) -> list[str]:
        return list(self._loaded)

    async def acquire(self, items: list[tuple[AdapterVersionInfo, float]]) -> Lease:
        """Load each version (if it is not loaded), holding them all until `Lease.release()`."""
        held: list[tuple[_Loaded, AdapterVersionInfo, float]] = []
        try:
            for info, scale in items:
                loaded = await self._load(info)
                loaded.refs += 1
                held.append((loaded, info, scale))
        except BaseException:
            self._release([loaded for loaded, _, _ in held])
            raise
        return Lease(self, held)

    def retire(self, still_served: Callable[[str, str], bool]) -> None:
        """After a rescan: versions the catalog no longer serves (by key and sha256) turn stale and
        are freed once no lease holds them."""
        for key, loaded in list(self._loaded.items()):
            if not still_served(key, loaded.sha256):
                loaded.stale = True
                self._maybe_free(key)

    async def _load(self, info: AdapterVersionInfo) -> _Loaded:
        key = info.key
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
                if self._on_load_failed:
                    self._on_load_failed(info, str(e))
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

    def close(self) -> None:
        for key in list(self._loaded):
            self._free(key)
        for loaded in self._retired:
            self.engine.free_adapter(loaded.handle)
        self._retired.clear()
