"""What the adapters directory holds that can be served: scanned, validated, probed, resolved.

Owns the catalog half of hot reload. `scan()` reads the directory (adapter_chat.registry), checks
every version against the served base and lets llama.cpp load it in a child process (the probe);
it runs on a worker thread and changes nothing. `apply()` swaps the result in on the event loop,
so a request sees one whole view or the other. `resolve()` turns `name` or `name@N` into a
servable version. A refused version is logged and reported in `refused`, never fatal; this module
is the only writer of `refused` (the cache reports a version llama.cpp would not load through
`mark_unloadable`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_chat import registry
from adapter_chat.probe import probe_adapter
from adapter_chat.gguf_info import BaseModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterVersionInfo:
    name: str
    version: int
    manifest: registry.Manifest
    path: Path
    rank: int

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class CatalogScan:
    """One scan's result, not yet applied."""

    available: dict[str, dict[int, AdapterVersionInfo]]
    current: dict[str, int]
    refused: dict[str, str]  # "name@N" or path -> reason
    newly_refused: list[str]  # adapter names with a version refused that was not refused before


class AdapterCatalog:
    """The servable versions of each adapter, the current one of each, and what was refused."""

    def __init__(self, adapters_dir: Path, base: BaseModelInfo, *, n_gpu_layers: int = 0) -> None:
        self.adapters_dir = Path(adapters_dir)
        self.base = base
        self.n_gpu_layers = n_gpu_layers  # the probe loads the base as the engine did
        self.available: dict[str, dict[int, AdapterVersionInfo]] = {}
        self.current: dict[str, int] = {}
        self.refused: dict[str, str] = {}
        self.scanned = False
        self._validated: dict[tuple[str, str], registry.LoraFileInfo | str] = {}  # (key, sha256) -> info/reason
        self._sha_cache: dict = {}

    # ------------------------------------------------------------------ scanning (worker thread)

    def fingerprint(self) -> tuple:
        """A cheap summary of the directory (names, sizes, times, inodes): changes when anything does."""
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

    def scan(self) -> CatalogScan:
        """Read and validate the directory; the catalog itself is unchanged until `apply`."""
        scan = registry.scan(self.adapters_dir, sha_cache=self._sha_cache)
        refused: dict[str, str] = dict(scan.skipped)
        newly_refused: list[str] = []
        available: dict[str, dict[int, AdapterVersionInfo]] = {}
        current: dict[str, int] = {}
        for name, entry in scan.adapters.items():
            for version, ref in entry.versions.items():
                key = f"{name}@{version}"
                problem = self._check(ref)
                if isinstance(problem, str):
                    if key not in self.refused:
                        newly_refused.append(name)
                        log.warning("adapter %s refused: %s", key, problem)
                    refused[key] = problem
                    continue
                available.setdefault(name, {})[version] = AdapterVersionInfo(
                    name, version, ref.manifest, ref.path, problem.rank
                )
            if name in available:
                versions = available[name]
                current[name] = entry.current if entry.current in versions else max(versions)
        return CatalogScan(available, current, refused, newly_refused)

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
                result = probe_adapter(self.base.path, ref.path, n_gpu_layers=self.n_gpu_layers) or result
        self._validated[cache_key] = result
        return result

    # ------------------------------------------------------------------ the view (event loop)

    def apply(self, scan: CatalogScan) -> dict[str, Any]:
        """Swap in a scan; returns the admin endpoint's summary (added, removed, refused)."""
        before = {(n, v) for n, vs in self.available.items() for v in vs}
        after = {(n, v) for n, vs in scan.available.items() for v in vs}
        self.available, self.current, self.refused = scan.available, scan.current, scan.refused
        self.scanned = True
        added = sorted(f"{n}@{v}" for n, v in after - before)
        removed = sorted(f"{n}@{v}" for n, v in before - after)
        for key in added:
            log.info("adapter version available: %s", key)
        for key in removed:
            log.info("adapter version gone: %s", key)
        return {
            "adapters": {n: {"current": scan.current[n], "versions": sorted(vs)} for n, vs in scan.available.items()},
            "added": added,
            "removed": removed,
            "refused": dict(scan.refused),
        }

    def serves(self, key: str, sha256: str) -> bool:
        """Whether version `key` ("name@N") is still servable with this exact file."""
        name, _, ver = key.partition("@")
        info = self.available.get(name, {}).get(int(ver))
        return info is not None and info.manifest.sha256 == sha256

    def mark_unloadable(self, info: AdapterVersionInfo, reason: str) -> None:
        """llama.cpp would not load a version the scan accepted (changed on disk since, or corrupt):
        refuse it until the next scan sees it valid again."""
        self.refused[info.key] = reason
        self.available.get(info.name, {}).pop(info.version, None)

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
        """For each ref, None when it resolves, else why not."""
        out: dict[str, str | None] = {}
        for ref in refs:
            try:
                self.resolve(ref)
                out[ref] = None
            except registry.RegistryError as e:
                out[ref] = str(e)
        return out
