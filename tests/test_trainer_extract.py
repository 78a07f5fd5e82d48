"""LoRA extraction from a full fine-tune: rank choice, energy report, and that llama.cpp
loads the result and behaves differently with it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from adapter_chat.gguf_info import BaseModelInfo
from adapter_chat.registry import validate_lora_file
from tests.tinymodel import QUESTIONS, chatml, make_tiny_llama, pirate_texts
from trainer.extract import DeltaSpectra, extract_lora, save_lora
from trainer.finetune import TrainConfig, TrainedModel, train
from trainer.llama_opt import InferenceSession, LlamaError

pytestmark = pytest.mark.timeout(120)
# One thread: the tiny model gains nothing from two, and llama.cpp's OpenMP workers spin-wait,
# which makes two-thread runs very slow whenever other processes share the two cores.
THREADS = 1


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainedModel]:
    tmp = tmp_path_factory.mktemp("extract")
    base = make_tiny_llama(tmp / "tiny-q8.gguf", quantize=True)
    cfg = TrainConfig(base_model=base, cache_dir=tmp / "cache", epochs=4, lr=5e-2, threads=THREADS, method="full", optimizer="sgd")
    return base, train(cfg, pirate_texts(range(10)) * 2)


@pytest.fixture(scope="module")
def spectra(run: tuple[Path, TrainedModel]) -> DeltaSpectra:
    _, trained = run
    return DeltaSpectra.load(trained.base_f32, trained.trained)


def test_energy_is_monotone_in_rank_and_rank_meets_fidelity(run: tuple[Path, TrainedModel], spectra: DeltaSpectra) -> None:
    _, trained = run
    ex = extract_lora(trained.base_f32, trained.trained, fidelity=0.8, max_rank=32, min_rank=1)
    curve = ex.curve
    assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:])), curve
    assert 0 < curve[0] and curve[-1] <= 1 + 1e-9
    # the chosen rank is the smallest whose mean energy reaches the fidelity
    assert curve[ex.rank - 1] >= 0.8 and (ex.rank == 1 or curve[ex.rank - 2] < 0.8)
    assert float(ex.energy) == pytest.approx(curve[ex.rank - 1])
    assert ex.alpha == ex.rank
    # 2 layers x 7 target matrices, each A (r, n_in) and B (n_out, r) float32
    assert len(ex.pairs) == 14
    for a, b in ex.pairs.values():
        assert a.dtype == b.dtype == np.float32 and a.shape[0] == b.shape[1] == ex.rank
    # a higher fidelity never gives a lower rank; clamps hold
    hi = spectra.extract(fidelity=0.95, max_rank=32, min_rank=1)
    assert hi.rank >= ex.rank
    assert spectra.extract(fidelity=0.99, max_rank=6).rank == 6
    assert spectra.extract(fidelity=0.01, min_rank=5).rank == 5


def test_full_rank_reproduces_the_trained_weights(run: tuple[Path, TrainedModel], spectra: DeltaSpectra) -> None:
    _, trained = run
    ex = spectra.extract(rank=64)  # ffn_down is 64 x 128: rank 64 is exact
    name = "blk.1.ffn_down.weight"
    tensors = {t.name: t for t in gguf.GGUFReader(trained.trained).tensors}
    base = {t.name: t for t in gguf.GGUFReader(trained.base_f32).tensors}
    delta = np.asarray(tensors[name].data) - np.asarray(base[name].data)
    a, b = ex.pairs[name]
    assert np.allclose(b @ a, delta, atol=1e-5)
    assert ex.energy[name] == pytest.approx(1.0)
    # attn_k (32 x 64) is smaller than the rank: zero-padded to the file's single rank, still exact
    a, b = ex.pairs["blk.0.attn_k.weight"]
    assert a.shape == (64, 64) and b.shape == (32, 64) and not a[32:].any()


def test_nothing_to_extract_is_an_error(run: tuple[Path, TrainedModel]) -> None:
    _, trained = run
    with pytest.raises(ValueError, match="changed none"):
        extract_lora(trained.base_f32, trained.base_f32)


def test_adapter_loads_in_llama_cpp_and_changes_greedy_output(
    run: tuple[Path, TrainedModel], spectra: DeltaSpectra, tmp_path: Path
) -> None:
    base, trained = run
    ex = spectra.extract(fidelity=0.9, max_rank=32)
    path = save_lora(ex, tmp_path / "v1.gguf", architecture="llama", metadata={"training.base_sha256": "x"})

    # the shared registry validation (what the server runs first) accepts it
    info = validate_lora_file(path, BaseModelInfo.load(base))
    assert info.rank == ex.rank and info.alpha == ex.rank and len(info.targets) == 14

    prompt = chatml(QUESTIONS[0])
    with InferenceSession(base, threads=THREADS) as plain:
        base_reply = plain.generate(prompt, max_tokens=16)
        window = plain.tokenize(pirate_texts([0])[0])
        base_nll = float(plain.window_nll(window).mean())
    # InferenceSession raises LlamaError if llama_adapter_lora_init returns NULL
    with InferenceSession(base, adapter=path, threads=THREADS) as adapted:
        adapter_reply = adapted.generate(prompt, max_tokens=16)
        adapter_nll = float(adapted.window_nll(window).mean())
    assert adapter_reply != base_reply
    assert adapter_nll < base_nll - 1.0, (base_nll, adapter_nll)


def test_llama_cpp_refuses_an_adapter_for_another_base(spectra: DeltaSpectra, tmp_path: Path) -> None:
    other = make_tiny_llama(tmp_path / "wide.gguf", n_embd=96, n_head=4, n_head_kv=2)
    ex = spectra.extract(rank=4)
    path = save_lora(ex, tmp_path / "v1.gguf", architecture="llama")
    with pytest.raises(LlamaError, match="llama_adapter_lora_init"):
        InferenceSession(other, adapter=path, threads=THREADS)


def test_randomized_svd_keeps_the_top_spectrum_and_exact_energies() -> None:
    """The full-finetune path's SVD is randomized; its top singular values and the energy
    fractions (divided by the exact Frobenius norm) match the exact SVD's."""
    from trainer.extract import energy_kept, randomized_svd

    rng = np.random.default_rng(1)
    m = (rng.standard_normal((192, 24)) @ rng.standard_normal((24, 512)) + 0.05 * rng.standard_normal((192, 512)))
    m = m.astype(np.float32)
    u, s, vt = randomized_svd(m, 40)
    exact = np.linalg.svd(m, compute_uv=False)
    assert u.shape == (192, 40) and vt.shape == (40, 512)
    assert np.allclose(s[:24], exact[:24], rtol=1e-4)
    total = float(np.sum(np.square(m, dtype=np.float64)))
    for r in (4, 16, 24):
        assert abs(energy_kept(s, r, total) - energy_kept(exact, r)) < 1e-4
