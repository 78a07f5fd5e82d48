"""POST /v1/adapters/{name}/versions: a LoRA made elsewhere, uploaded over HTTP by an admin, is
checked (size limit while it streams, the client's sha256, the base it was made for, llama.cpp's
own loader) and published atomically as the next version, served at once; a refused upload
publishes nothing, leaves no file behind, and the server keeps serving."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from adapter_chat import registry
from adapter_chat.gguf_info import BaseModelInfo
from tests.conftest import make_lora_file
from tests.test_errors import assert_error
from tests.smallfs import small_filesystem
from tests.test_import_adapter import converter_lora

ADMIN = {"Authorization": "Bearer sk-admin"}


def leftovers(adapters_dir: Path) -> list[str]:
    return sorted(p.name for p in adapters_dir.rglob("*") if p.name.endswith(".tmp"))


def test_an_uploaded_lora_is_published_and_served(fresh_server, base_info: BaseModelInfo, tmp_path: Path) -> None:
    srv = fresh_server(admin_keys=["sk-admin"], api_keys=["sk-user"])
    lora = converter_lora(tmp_path / "peft-house.gguf", base_info, seed=5)  # as convert_lora_to_gguf.py writes it
    data = lora.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    ask = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "max_tokens": 24}
    with srv.http(headers=ADMIN) as http:
        r = http.post("/v1/adapters/house/versions", params={"sha256": sha, "note": "from PEFT"}, content=data,
                      headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["id"] == "house@1" and body["served"] is True and body["sha256"] == sha
        assert body["manifest"]["hyperparameters"]["note"] == "from PEFT"
        assert body["manifest"]["base_model_sha256"] == base_info.sha256
        # a second upload is the next version, and becomes current
        r = http.post("/v1/adapters/house/versions", content=data, params={"scale": "0.5"})
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        listed = http.get("/v1/adapters").json()["data"]
        assert [(a["name"], a["current"]) for a in listed] == [("house", 2)]
    assert registry.current_version(srv.adapters_dir, "house") == 2
    client = srv.client(api_key="sk-user")
    base = client.chat.completions.create(model="base", **ask).choices[0].message.content
    house = client.chat.completions.create(model="house@1", **ask).choices[0].message.content
    assert house and house != base  # the uploaded weights change the answer
    assert leftovers(srv.adapters_dir) == []


def test_a_refused_upload_publishes_nothing_and_says_why(fresh_server, base_info: BaseModelInfo,
                                                        model_path: Path, tmp_path: Path) -> None:  # fmt: skip
    srv = fresh_server(admin_keys=["sk-admin"], max_adapter_upload_bytes=2_000_000)
    small = make_lora_file(tmp_path / "small.gguf", base_info, seed=2, rank=1, targets=("attn_q",))
    assert small.stat().st_size < 2_000_000
    big = make_lora_file(tmp_path / "big.gguf", base_info, seed=2, rank=8)
    assert big.stat().st_size > 2_000_000
    with srv.http(headers=ADMIN) as http:
        # not an admin: refused before a byte is stored
        r = http.post("/v1/adapters/x/versions", content=small.read_bytes(), headers={"Authorization": "Bearer no"})
        assert_error(r, 401, says="admin key")
        # over the limit
        assert_error(http.post("/v1/adapters/x/versions", content=big.read_bytes()), 413,
                     says="CHAT_MAX_ADAPTER_UPLOAD_BYTES")  # fmt: skip
        # the wrong checksum: the file changed on the way
        r = http.post("/v1/adapters/x/versions", content=small.read_bytes(), params={"sha256": "0" * 64})
        assert_error(r, 400, says="the request said " + "0" * 64, param="sha256")
        # not a LoRA at all, and a GGUF that is not a LoRA for this base
        assert_error(http.post("/v1/adapters/x/versions", content=b"GGUF" + b"\0" * 5000), 400, param="file")
        other = converter_lora(tmp_path / "other.gguf", base_info, seed=1, rank=1, arch="qwen2")
        assert_error(http.post("/v1/adapters/x/versions", content=other.read_bytes()), 400, says="architecture",
                     param="file")  # fmt: skip
        wider = converter_lora(tmp_path / "wide.gguf", base_info, seed=1, rank=1, shape_of=lambda s: (s[0], s[1] * 2))
        assert_error(http.post("/v1/adapters/x/versions", content=wider.read_bytes()), 400, says="do not fit",
                     param="file")  # fmt: skip
        # a bad name, an empty body, an unknown parameter
        assert_error(http.post("/v1/adapters/..evil/versions", content=small.read_bytes()), 400, param="name")
        assert_error(http.post("/v1/adapters/x/versions", content=b""), 400, says="body is empty")
        assert_error(http.post("/v1/adapters/x/versions", content=b"x", params={"force": "1"}), 400, param="force")
        assert http.get("/v1/adapters").json()["data"] == []
        # the small, valid one still goes through
        assert http.post("/v1/adapters/x/versions", content=small.read_bytes()).status_code == 201
    assert [m.version for m in registry.list_versions(srv.adapters_dir, "x")] == [1]
    assert leftovers(srv.adapters_dir) == []


def test_a_read_only_adapters_directory_is_a_409_naming_the_cli(fresh_server, base_info: BaseModelInfo,
                                                               tmp_path: Path) -> None:  # fmt: skip
    """As in the compose and Kubernetes setups, where the servers mount the adapters read-only."""
    small = make_lora_file(tmp_path / "small.gguf", base_info, seed=2, rank=1, targets=("attn_q",))
    with small_filesystem(tmp_path / "ro-adapters", 1 << 20) as adapters:
        srv = fresh_server(admin_keys=["sk-admin"], adapters_dir=adapters)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(adapters)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        with srv.http(headers=ADMIN) as http:
            r = http.post("/v1/adapters/x/versions", content=small.read_bytes())
            assert_error(r, 409, says="python -m trainer import")
            assert http.get("/ready").status_code == 200  # still serving
        srv.stop()
