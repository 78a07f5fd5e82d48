"""The server's adapters: the catalog of what can be served, and the cache of what is loaded.

Owns how the two halves meet, and nothing else: hot reload (rescan on a worker thread, swap the
catalog's view on the event loop, then let the cache retire what the new view no longer serves)
and acquiring a lease (resolve in the catalog, load in the cache). A request in flight finishes on
the version it started with; `server/adapter_catalog.py` and `server/adapter_cache.py` say how.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from adapter_chat.engine import Engine
from adapter_chat.gguf_info import BaseModelInfo
from adapter_chat.identity import AdapterRef
from server.adapter_cache import AdapterCache, Lease, PoolObserver
from server.adapter_catalog import AdapterCatalog, AdapterVersionInfo

log = logging.getLogger(__name__)

__all__ = ["AdapterPool", "AdapterVersionInfo", "Lease", "PoolObserver"]


class AdapterPool:
    """Adapters on disk (the catalog: scanned, validated) and in llama.cpp (the cache: loaded, leased)."""

    def __init__(
        self,
        adapters_dir: Path,
        engine: Engine,
        base: BaseModelInfo,
        *,
        max_loaded: int = 8,
        observer: PoolObserver | None = None,
    ) -> None:
        self.observer = observer
        self.catalog = AdapterCatalog(adapters_dir, base, n_gpu_layers=engine.config.n_gpu_layers)
        self.cache = AdapterCache(engine, max_loaded=max_loaded, observer=observer,
                                  on_load_failed=self.catalog.mark_unloadable)  # fmt: skip
        self._fingerprint: tuple | None = None
        self._reload_lock = asyncio.Lock()

    # the catalog's view, read by the handlers
    @property
    def available(self) -> dict[str, dict[int, AdapterVersionInfo]]:
        return self.catalog.available

    @property
    def current(self) -> dict[str, int]:
        return self.catalog.current

    @property
    def refused(self) -> dict[str, str]:
        return self.catalog.refused

    @property
    def scanned(self) -> bool:
        return self.catalog.scanned

    @property
    def loaded_keys(self) -> list[str]:
        return self.cache.loaded_keys

    def resolve(self, ref: str) -> AdapterVersionInfo:
        return self.catalog.resolve(ref)

    def availability(self, refs: list[str]) -> dict[str, str | None]:
        return self.catalog.availability(refs)

    async def reload(self) -> dict[str, Any]:
        """Rescan the directory and swap the view; returns a summary for the admin endpoint."""
        async with self._reload_lock:
            self._fingerprint = self.catalog.fingerprint()
            scan = await asyncio.to_thread(self.catalog.scan)
            summary = self.catalog.apply(scan)
            self.cache.retire(self.catalog.serves)
            if self.observer:
                for name in scan.newly_refused:
                    self.observer.adapter_load_failed(name)
                self.observer.adapters_reloaded()
            return summary

    async def watch(self, interval_s: float) -> None:
        """Poll the directory; reload when anything in it changed."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self.catalog.fingerprint() != self._fingerprint:
                    await self.reload()
            except Exception:
                log.exception("adapter watch failed; will retry")

    async def acquire(self, refs: list[AdapterRef]) -> Lease:
        """Resolve each reference (name or name@N, scale) and load it, holding all until `Lease.release()`."""
        return await self.cache.acquire([(self.catalog.resolve(r.name), r.scale) for r in refs])

    def close(self) -> None:
        self.cache.close()
