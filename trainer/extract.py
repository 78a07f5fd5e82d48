"""Turning a full fine-tune into a LoRA adapter: truncated SVD of the weight deltas.

Owns: reading the FP32 base and trained GGUFs, factorising ``W_trained - W_base`` for every
target matrix, choosing one rank for the whole adapter, the energy report that justifies it,
and handing the factors to ``adapter_chat.registry.write_lora_gguf`` (the adapter format's only
writer).

Rank choice: "energy kept" at rank ``r`` for one matrix is ``sum(s[:r]**2) / sum(s**2)`` of the
delta's singular values ``s``, i.e. the fraction of the delta's squared Frobenius norm the
rank-``r`` approximation keeps. The adapter's rank is the smallest ``r`` whose **mean** energy
over all adapted matrices reaches ``fidelity``, clamped to ``[min_rank, max_rank]`` (and to the
smallest matrix dimension). The per-matrix energies at that rank, and the minimum, are
reported so a weak matrix is visible.

The SVD is randomized (Halko, Martinsson and Tropp 2011: a Gaussian sketch of ``max_rank + 16``
columns, two power iterations, then an exact SVD of the small projected matrix) whenever that is
smaller than the matrix. Its top singular values are approximations (tested against the exact SVD
to 1e-4), and the energy fractions divide by the delta's exact squared Frobenius norm.

Factors are split evenly, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``, and ``alpha = rank``, so
llama.cpp's scale ``alpha / rank`` is 1 and ``W_base + B @ A`` is the rank-``r`` approximation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from adapter_chat.registry import write_lora_gguf
from trainer.llama_opt import DEFAULT_TARGETS


class EnergyReport(dict[str, float]):
    """Energy kept per adapted matrix at the chosen rank; ``float(report)`` is their mean,
    the number the rank was chosen on."""

    def __float__(self) -> float:
        return float(np.mean(list(self.values()))) if self else 1.0


@dataclass
class Extraction:
    """Owns the extracted LoRA factors (base tensor name -> (A (r, n_in), B (n_out, r)), float32),
    the chosen rank and alpha, and the energy report behind the choice."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    rank: int
    alpha: float
    energy: EnergyReport
    curve: list[float] = field(default_factory=list)  # mean energy kept at rank 1..len(curve)
    fidelity: float = 0.9
    skipped: list[str] = field(default_factory=list)  # target matrices the training left unchanged

    @property
    def mean_energy(self) -> float:
        return float(np.mean(list(self.energy.values()))) if self.energy else 1.0

    @property
    def min_energy(self) -> float:
        return float(min(self.energy.values())) if self.energy else 1.0

    def report(self) -> dict[str, Any]:
        """JSON-ready summary (for the manifest / logs)."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "fidelity_target": self.fidelity,
            "energy_mean": self.mean_energy,
            "energy_min": self.min_energy,
            "energy_curve_mean": [round(e, 6) for e in self.curve],
            "n_matrices": len(self.pairs),
            "skipped": list(self.skipped),
        }


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _as_f32_matrix(t: gguf.ReaderTensor) -> np.ndarray:
    if t.tensor_type != gguf.GGMLQuantizationType.F32:
        raise ValueError(f"{t.name} is {t.tensor_type.name}; extraction needs the FP32 base and trained models")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(t.data, dtype=np.float32).reshape(shape)


def is_target(name: str, targets: Sequence[str]) -> bool:
    """True for ``blk.<N>.<target>.weight`` with ``<target>`` in ``targets``."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in targets


def energy_kept(s: np.ndarray, rank: int, total: float | None = None) -> float:
    """Fraction of the energy ``total`` (default ``sum(s**2)``: all singular values known) in the
    first ``rank`` singular values (1.0 for a zero delta)."""
    total = float(np.sum(np.square(s, dtype=np.float64))) if total is None else total
    if total == 0.0:
        return 1.0
    return float(np.sum(np.square(s[:rank], dtype=np.float64)) / total)


def randomized_svd(m: np.ndarray, k: int, *, power_iters: int = 2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The top ``k`` singular triplets of ``m`` (u (n, k), s (k,), vt (k, d)), randomized."""
    rng = np.random.default_rng(seed)
    sketch = m @ rng.standard_normal((m.shape[1], k), dtype=np.float32)
    q, _ = np.linalg.qr(sketch)
    for _ in range(power_iters):  # sharpen the spectrum's decay before projecting
        q, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ q)
    u_small, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return q @ u_small, s, vt


def choose_rank(
    spectra: Mapping[str, np.ndarray], *, fidelity: float, min_rank: int, max_rank: int,
    totals: Mapping[str, float] | None = None,
) -> int:
    """Smallest rank whose mean energy over ``spectra`` reaches ``fidelity``, clamped to
    ``[min_rank, max_rank]`` and to the largest rank any matrix has."""
    totals = totals or {}
    cap = min(max_rank, max(len(s) for s in spectra.values()))
    for r in range(1, cap + 1):
        if np.mean([energy_kept(s, r, totals.get(n)) for n, s in spectra.items()]) >= fidelity:
            return max(r, min(min_rank, cap))
    return cap


class DeltaSpectra:
    """Owns the SVD of ``W_trained - W_base`` for every target matrix of one training run, so
    several ranks can be tried without re-reading the models."""

    def __init__(
        self, svds: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], skipped: list[str],
        totals: dict[str, float] | None = None,
    ) -> None:
        if not svds:
            raise ValueError("training changed none of the target matrices; nothing to extract")
        self.svds = svds
        self.skipped = skipped
        self.totals = totals or {}
        """Exact squared Frobenius norm of each delta (the energy the fractions divide by)."""

    @classmethod
    def load(
        cls, base_f32: Path, trained: Path, *, targets: Sequence[str] = DEFAULT_TARGETS, max_rank: int | None = None
    ) -> DeltaSpectra:
        """Read both FP32 GGUFs and factorise every target delta (exactly-zero deltas are skipped).
        With ``max_rank``, only the top ``max_rank + 16`` singular values are computed, by a
        randomized SVD, where that is smaller than the matrix."""
        base_t, trained_t = _tensors(base_f32), _tensors(trained)
        names = sorted(n for n in base_t if is_target(n, targets))
        if not names:
            raise ValueError(f"{base_f32} has no tensors matching targets {tuple(targets)}")
        missing = [n for n in names if n not in trained_t]
        if missing:
            raise ValueError(f"{trained} lacks {len(missing)} target tensors, e.g. {missing[0]}")
        svds: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        totals: dict[str, float] = {}
        skipped: list[str] = []
        for name in names:
            w0, w1 = _as_f32_matrix(base_t[name]), _as_f32_matrix(trained_t[name])
            if w0.shape != w1.shape:
                raise ValueError(f"{name}: base shape {w0.shape} != trained shape {w1.shape}")
            delta = w1 - w0
            if not np.any(delta):
                skipped.append(name)
                continue
            if not np.all(np.isfinite(delta)):
                raise ValueError(f"{name}: trained weights hold NaN/Inf")
            totals[name] = float(np.sum(np.square(delta, dtype=np.float64)))
            k = None if max_rank is None else max_rank + 16
            if k is not None and k < min(delta.shape) // 2:
                svds[name] = randomized_svd(delta, k)
            else:
                svds[name] = np.linalg.svd(delta, full_matrices=False)
        return cls(svds, skipped, totals)

    @property
    def spectra(self) -> dict[str, np.ndarray]:
        return {n: s for n, (_, s, _) in self.svds.items()}

    @property
    def max_rank(self) -> int:
        """The largest rank any delta has (min(n_out, n_in) of the widest matrix)."""
        return max(len(s) for _, s, _ in self.svds.values())

    def extract(
        self, *, fidelity: float = 0.9, max_rank: int = 64, min_rank: int = 4, rank: int | None = None
    ) -> Extraction:
        """LoRA factors at a fixed ``rank`` or at the rank chosen from ``fidelity``. Matrices
        smaller than the rank get zero-padded factors (same product, one rank for the file)."""
        if not 0 < fidelity <= 1:
            raise ValueError(f"fidelity must be in (0, 1], got {fidelity}")
        if not 1 <= min_rank <= max_rank:
            raise ValueError(f"need 1 <= min_rank <= max_rank, got {min_rank}, {max_rank}")
        spectra = self.spectra
        if rank is not None:
            if not 1 <= rank <= self.max_rank:
                raise ValueError(f"rank must be in [1, {self.max_rank}], got {rank}")
            r = rank
        else:
            r = choose_rank(spectra, fidelity=fidelity, min_rank=min_rank, max_rank=max_rank, totals=self.totals)
        cap = min(max(max_rank, r), self.max_rank)
        curve = [float(np.mean([energy_kept(s, k, self.totals.get(n)) for n, s in spectra.items()]))
                 for k in range(1, cap + 1)]  # fmt: skip

        pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        energy = EnergyReport()
        for name, (u, s, vt) in self.svds.items():
            k = min(r, len(s))
            root = np.sqrt(s[:k])
            a = np.zeros((r, vt.shape[1]), dtype=np.float32)
            b = np.zeros((u.shape[0], r), dtype=np.float32)
            a[:k] = root[:, None] * vt[:k, :]
            b[:, :k] = u[:, :k] * root[None, :]
            pairs[name] = (a, b)
            energy[name] = energy_kept(s, r, self.totals.get(name))
        return Extraction(
            pairs=pairs, rank=r, alpha=float(r), energy=energy, curve=curve, fidelity=fidelity, skipped=list(self.skipped)
        )


def extract_lora(
    base_f32: Path,
    trained: Path,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    fidelity: float = 0.9,
    max_rank: int = 64,
    min_rank: int = 4,
    rank: int | None = None,
) -> Extraction:
    """Factorise ``trained - base_f32`` for every target matrix into LoRA pairs of one rank.

    ``rank`` fixes the rank; otherwise it is chosen from ``fidelity`` (see module docstring).
    Target matrices whose delta is exactly zero are left out of the adapter (``skipped``).
    """
    if not 0 < fidelity <= 1:
        raise ValueError(f"fidelity must be in (0, 1], got {fidelity}")
    if not 1 <= min_rank <= max_rank:
        raise ValueError(f"need 1 <= min_rank <= max_rank, got {min_rank}, {max_rank}")
    spectra = DeltaSpectra.load(base_f32, trained, targets=targets, max_rank=max(max_rank, rank or 0))
    return spectra.extract(fidelity=fidelity, max_rank=max_rank, min_rank=min_rank, rank=rank)


def save_lora(
    extraction: Extraction,
    path: Path,
    *,
    architecture: str,
    metadata: Mapping[str, str | int | float] | None = None,
) -> Path:
    """Write the adapter GGUF through ``adapter_chat.registry.write_lora_gguf``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_lora_gguf(
        path, architecture=architecture, pairs=extraction.pairs, alpha=extraction.alpha, metadata=metadata or {}
    )
    return path


__all__ = ["DeltaSpectra", "EnergyReport", "Extraction", "choose_rank", "energy_kept", "extract_lora", "is_target", "save_lora"]
