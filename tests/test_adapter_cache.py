"""The adapter cache's lifetimes, without a model: leases hold versions, LRU eviction skips what is
held, a version the catalog stops serving is freed when its last lease goes, and a load failure
is reported to the catalog. (The same paths run against llama.cpp in test_hot_reload.py.)"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from adapter_chat import registry
from server.adapter_cache import AdapterCache
from server.adapter_catalog import AdapterVersionInfo


class FakeEngine:
    """Records loads and frees; a handle is the path's name."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.freed: list[str] = []

    async def load_adapter(self, path: Path) -> str:
        self.loaded.append(path.name)
        return path.name

    def free_adapter(self, handle: str) -> None:
        self.freed.append(handle)


def version(tmp_path: Path, name: str, v: int, content: bytes = b"lora") -> AdapterVersionInfo:
    path = tmp_path / f"{name}-v{v}.gguf"
    path.write_bytes(content)
    manifest = registry.Manifest.model_construct(sha256=hashlib.sha256(content).hexdigest())
    return AdapterVersionInfo(name, v, manifest, path, rank=8)


def test_eviction_skips_leased_versions_and_frees_the_least_recently_used(tmp_path: Path) -> None:
    async def run() -> None:
        engine = FakeEngine()
        cache = AdapterCache(engine, max_loaded=2)  # type: ignore[arg-type]
        a, b, c = (version(tmp_path, n, 1) for n in "abc")
        held = await cache.acquire([(a, 1.0)])
        (await cache.acquire([(b, 1.0)])).release()
        (await cache.acquire([(c, 1.0)])).release()  # over the limit: b goes (a is held)
        assert cache.loaded_keys == ["a@1", "c@1"] and engine.freed == ["b-v1.gguf"]
        held.release()
        assert (await cache.acquire([(a, 0.5)])).handles == [("a-v1.gguf", 0.5)]
        assert engine.loaded.count("a-v1.gguf") == 1  # still loaded: not read again

    asyncio.run(run())


def test_a_version_no_longer_served_is_freed_only_when_its_last_lease_goes(tmp_path: Path) -> None:
    async def run() -> None:
        engine = FakeEngine()
        cache = AdapterCache(engine)  # type: ignore[arg-type]
        a = version(tmp_path, "a", 1)
        lease = await cache.acquire([(a, 1.0)])
        cache.retire(lambda key, sha: False)  # the rescan dropped a@1
        assert engine.freed == [] and [(u.key, u.scale) for u in lease.uses] == [("a@1", 1.0)]
        lease.release()
        assert engine.freed == ["a-v1.gguf"] and cache.loaded_keys == []

    asyncio.run(run())


def test_a_file_changed_since_the_scan_is_refused_and_reported(tmp_path: Path) -> None:
    async def run() -> None:
        failed: list[tuple[str, str]] = []
        engine = FakeEngine()
        cache = AdapterCache(engine, on_load_failed=lambda info, why: failed.append((info.key, why)))  # type: ignore[arg-type]
        a = version(tmp_path, "a", 1)
        a.path.write_bytes(b"tampered")
        with pytest.raises(registry.AdapterInvalid, match="a@1 could not be loaded: sha256 mismatch"):
            await cache.acquire([(a, 1.0)])
        assert engine.loaded == [] and failed == [("a@1", "sha256 mismatch with its manifest (file changed or corrupt)")]

    asyncio.run(run())
