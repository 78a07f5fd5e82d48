"""Bring your own adapter: LoRA GGUFs laid out as llama.cpp's convert_lora_to_gguf.py writes them
(PEFT -> GGUF) are imported with `python -m trainer import`, validated like the trainer's own output,
served, and change greedy output; files for another base are refused; a stray file is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from adapter_chat import publish, registry
from tests.conftest import LORA_TARGETS, ROOT

QUESTION = "Write one sentence about the sea."


def converter_lora(path: Path, base, *, seed: int, dtype=np.float16, arch: str | None = None,
                   shape_of=None, rank: int = 8, strength: float = 0.06) -> Path:
    """A LoRA GGUF with the keys and tensor names convert_lora_to_gguf.py writes (its
    LoraTorchTensor path: general.type = adapter, adapter.type = lora, adapter.lora.alpha,
    <base tensor>.lora_a (r, n_in) / .lora_b (n_out, r)), in F16 or F32."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch=arch or base.architecture)
    w.add_name("peft-lora-test")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    for name, shape in base.tensor_shapes.items():
        if not name.startswith("blk.") or name.split(".")[2] not in LORA_TARGETS or len(shape) != 2:
            continue
        n_out, n_in = shape_of(shape) if shape_of else shape
        w.add_tensor(f"{name}.lora_a", rng.normal(0, strength, (rank, n_in)).astype(dtype))
        w.add_tensor(f"{name}.lora_b", rng.normal(0, strength, (n_out, rank)).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def trainer_import(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "import", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_imported_f16_and_f32_adapters_are_served_and_change_the_answer(tmp_path, model_path, base_info,
                                                                        fresh_server) -> None:
    adapters = tmp_path / "adapters"
    for name, dtype, seed in (("peft-f16", np.float16, 7), ("peft-f32", np.float32, 8)):
        src = converter_lora(tmp_path / f"{name}.gguf", base_info, seed=seed, dtype=dtype)
        r = trainer_import(name, str(src), "--adapters-dir", str(adapters), "--base-model", str(model_path),
                           "--note", "trained with PEFT")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"{name}: published version 1" in r.stdout
        manifest = json.loads((adapters / name / "v1.json").read_text())
        assert manifest["rank"] == 8 and manifest["alpha"] == 16.0 and manifest["architecture"] == base_info.architecture
        assert manifest["base_model_sha256"] == base_info.sha256
        assert sorted(manifest["targets"]) == sorted(LORA_TARGETS)
        assert manifest["hyperparameters"]["source"] == "import" and manifest["hyperparameters"]["note"]
    stray = adapters / "dropped" / "adapter_model.gguf"
    stray.parent.mkdir()
    converter_lora(stray, base_info, seed=9)

    srv = fresh_server(adapters_dir=adapters)
    client = srv.client()

    def greedy(model: str) -> str:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                              temperature=0, max_tokens=24).choices[0].message.content  # fmt: skip

    answers = {m: greedy(m) for m in ("base", "peft-f16", "peft-f32")}
    assert len(set(answers.values())) == 3, answers
    with srv.http() as http:
        listing = http.get("/v1/adapters").json()
    assert {a["name"] for a in listing["data"]} == {"peft-f16", "peft-f32"}
    assert "python -m trainer import dropped" in listing["refused"][str(stray)]


def test_scale_multiplies_alpha(tmp_path, base_info) -> None:
    src = converter_lora(tmp_path / "a.gguf", base_info, seed=1)
    m = publish.import_lora(tmp_path / "adapters", "half", src, base_info, scale=0.5)
    assert m.alpha == 8.0 and m.hyperparameters["scale"] == 0.5
    assert registry.validate_lora_file(tmp_path / "adapters" / "half" / "v1.gguf", base_info).alpha == 8.0


@pytest.mark.parametrize("case, expected", [
    ("not_a_lora", "general.type"),
    ("other_architecture", "architecture"),
    ("other_base", "do not fit"),
])  # fmt: skip
def test_files_for_another_base_are_refused_and_nothing_is_published(tmp_path, model_path, base_info, case,
                                                                     expected) -> None:
    if case == "not_a_lora":
        src = model_path  # the base model itself: general.type = model
    elif case == "other_architecture":
        src = converter_lora(tmp_path / "x.gguf", base_info, seed=1, arch="qwen2")
    else:  # the same architecture, a model twice as wide
        src = converter_lora(tmp_path / "x.gguf", base_info, seed=1, shape_of=lambda s: (s[0], s[1] * 2))
    adapters = tmp_path / "adapters"
    r = trainer_import("mine", str(src), "--adapters-dir", str(adapters), "--base-model", str(model_path))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "refused" in r.stderr and expected in r.stderr, r.stderr
    assert not list(adapters.glob("mine/v*.json"))
