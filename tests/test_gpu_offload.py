"""GPU offload, tested on machines without a GPU: `CHAT_N_GPU_LAYERS` and the trainer's
`n_gpu_layers` reach llama.cpp's model params wherever a model is loaded (the server's engine, the
adapter probe, training, validation loss, the task score), and a CPU-only build says so in a
warning and still serves, with the same answers. No GPU run was possible here (README, "GPU
offload")."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import llama_cpp.llama_cpp as C
import pytest

from adapter_chat.gguf_info import BaseModelInfo
from tests.conftest import ROOT, ServerProcess, make_lora_file, publish_lora, wait_for

pytestmark = pytest.mark.skipif(
    bool(C.llama_supports_gpu_offload()), reason="this build offloads to a GPU: the CPU-only warning is not expected"
)


def warning(n: int) -> str:
    return f"n_gpu_layers={n} asked for, but this llama-cpp-python build has no GPU backend"


def test_the_server_hands_chat_n_gpu_layers_to_llama_cpp_and_serves_on_the_cpu(
    fresh_server, server: ServerProcess, base_info: BaseModelInfo, tmp_path: Path
) -> None:
    srv = fresh_server(n_gpu_layers=7)
    assert warning(7) in srv.logs()
    # the adapter probe loads the base the same way (its child process gets the setting)
    publish_lora(srv.adapters_dir, "gpu-style", base_info, seed=11, tmp=tmp_path)
    assert wait_for(lambda: "gpu-style" in {m.id for m in srv.client().models.list()}, timeout=30)
    ask = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "max_tokens": 24}
    on_cpu = server.client().chat.completions.create(model="base", **ask).choices[0].message.content
    asked_gpu = srv.client().chat.completions.create(model="base", **ask).choices[0].message.content
    assert asked_gpu == on_cpu  # the same CPU computation, whatever was asked
    assert srv.client().chat.completions.create(model="gpu-style", **ask).choices[0].message.content


def test_the_adapter_probe_loads_the_base_with_the_engines_n_gpu_layers(
    model_path: Path, base_info: BaseModelInfo, tmp_path: Path
) -> None:
    lora = make_lora_file(tmp_path / "a.gguf", base_info, seed=3)
    proc = subprocess.run(
        [sys.executable, "-m", "adapter_chat.probe", str(model_path), str(lora), "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "n_gpu_layers 5" in proc.stderr and warning(5) in proc.stderr


def test_the_trainer_hands_n_gpu_layers_to_every_model_it_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Training (TrainSession), validation loss (InferenceSession) and the task score (the
    server's engine) all load the base with the config's n_gpu_layers, and the run still
    publishes on a CPU-only build."""
    from tests.test_trainer_nightly import CONFIG, SCORER, load_generator
    from tests.tinymodel import make_tiny_llama
    from trainer.config import load_config
    from trainer.nightly import RunOptions, run_nightly

    make_tiny_llama(tmp_path / "tiny.gguf")
    load_generator().write_jsonl(tmp_path / "cto.jsonl", 16, seed=1)
    (tmp_path / "small.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "trainer.toml").write_text(CONFIG.format(strict_margin=0.0, scorer="answered") + "\n", encoding="utf-8")
    (tmp_path / "scorer.py").write_text(SCORER, encoding="utf-8")
    text = (tmp_path / "trainer.toml").read_text(encoding="utf-8")
    (tmp_path / "trainer.toml").write_text("n_gpu_layers = 9\n" + text, encoding="utf-8")
    cfg = load_config(tmp_path / "trainer.toml")
    assert cfg.n_gpu_layers == 9
    with caplog.at_level(logging.WARNING):
        [out] = run_nightly(cfg, only=["scored"], say=lambda m: None, options=RunOptions(skip_unchanged=False))
    assert out.status == "published", out.reason
    loaders = {r.name for r in caplog.records if warning(9) in r.getMessage()}
    assert loaders == {"adapter_chat.llama_model"}, loaders
    # training, validation loss (base and adapter) and the task score: one warning per model loaded
    assert sum(warning(9) in r.getMessage() for r in caplog.records) >= 4


def test_a_negative_n_gpu_layers_is_refused_with_the_setting_named(tmp_path: Path) -> None:
    import pydantic

    from server.settings import Settings
    from trainer.config import ConfigError, load_config

    (tmp_path / "t.toml").write_text('n_gpu_layers = -1\nbase_model = "m.gguf"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="n_gpu_layers must be >= 0"):
        load_config(tmp_path / "t.toml")
    with pytest.raises(pydantic.ValidationError, match="n_gpu_layers"):
        Settings(n_gpu_layers=-1)
