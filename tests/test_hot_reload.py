"""Adapters are picked up, replaced, refused and removed without a restart, atomically."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx

from adapter_chat import publish
from tests.conftest import chat_body, publish_lora, wait_for

QUESTION = "Write one sentence about the sea."


def answer(srv, model: str, **kw) -> httpx.Response:
    with srv.http() as http:
        return http.post("/v1/chat/completions", json=chat_body(QUESTION, model=model, **kw))




def model_ids(srv) -> set[str]:
    return {m["id"] for m in httpx.get(f"{srv.url}/v1/models", timeout=60).json()["data"]}


def test_new_version_is_picked_up_while_requests_run_and_none_fails(fresh_server, base_info, tmp_path) -> None:
    srv = fresh_server()
    publish_lora(srv.adapters_dir, "live", base_info, seed=11, tmp=tmp_path)
    assert wait_for(lambda: "live@1" in model_ids(srv))
    v1_text = answer(srv, "live", max_tokens=48).json()["choices"][0]["message"]["content"]

    async def run() -> tuple[list[httpx.Response], int]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:
            body = chat_body(QUESTION, model="live", max_tokens=48)
            tasks = [asyncio.create_task(http.post("/v1/chat/completions", json=body)) for _ in range(6)]
            await asyncio.sleep(0.3)  # requests are admitted and running on v1
            version = await asyncio.to_thread(publish_lora, srv.adapters_dir, "live", base_info, seed=12, tmp=tmp_path)
            return await asyncio.gather(*tasks), version

    responses, v2 = asyncio.run(run())
    assert v2 == 2
    for r in responses:
        assert r.status_code == 200, r.text
        used = r.headers["x-adapters"]
        text = r.json()["choices"][0]["message"]["content"]
        if used == "live@1:1":
            assert text == v1_text  # finished on the version it started with
    assert wait_for(lambda: answer(srv, "live", max_tokens=2).headers["x-adapters"] == "live@2:1")
    new = answer(srv, "live", max_tokens=48)
    assert new.json()["choices"][0]["message"]["content"] != v1_text
    assert answer(srv, "live@1", max_tokens=48).json()["choices"][0]["message"]["content"] == v1_text
    assert srv.metric("adapter_reloads_total") >= 2


def test_reload_endpoint_removal_and_rollback(fresh_server, base_info, tmp_path) -> None:
    srv = fresh_server(adapter_watch_interval_s=0)  # no watcher: only the endpoint reloads
    publish_lora(srv.adapters_dir, "manual", base_info, seed=21, tmp=tmp_path)
    assert answer(srv, "manual").status_code == 404
    summary = httpx.post(f"{srv.url}/v1/adapters/reload", timeout=60).json()
    assert summary["added"] == ["manual@1"]
    assert answer(srv, "manual").status_code == 200
    publish_lora(srv.adapters_dir, "manual", base_info, seed=22, tmp=tmp_path)
    httpx.post(f"{srv.url}/v1/adapters/reload", timeout=60)
    assert answer(srv, "manual", max_tokens=2).headers["x-adapters"] == "manual@2:1"
    assert publish.rollback(srv.adapters_dir, "manual") == 1
    httpx.post(f"{srv.url}/v1/adapters/reload", timeout=60)
    assert answer(srv, "manual", max_tokens=2).headers["x-adapters"] == "manual@1:1"
    shutil.rmtree(srv.adapters_dir / "manual")
    summary = httpx.post(f"{srv.url}/v1/adapters/reload", timeout=60).json()
    assert sorted(summary["removed"]) == ["manual@1", "manual@2"]
    assert answer(srv, "manual").status_code == 404
    assert answer(srv, "base", max_tokens=2).status_code == 200


def test_a_bad_routes_file_on_reload_changes_nothing_and_names_the_route(fresh_server, base_info, tmp_path) -> None:
    """Before: a bare 500 after the adapters had already been swapped."""
    from tests.conftest import write_routes
    from tests.test_errors import assert_error

    srv = fresh_server(adapter_watch_interval_s=0)
    write_routes(srv.prompts_dir, '[routes.kind]\nprompt = "kind.j2"\n', {"kind.j2": "Be kind."})
    assert httpx.post(f"{srv.url}/v1/adapters/reload", timeout=60).json()["routes"] == ["kind"]
    publish_lora(srv.adapters_dir, "later", base_info, seed=23, tmp=tmp_path)
    write_routes(srv.prompts_dir, '[routes.kind]\nprompt = "kind.j2"\n[routes.broken]\nprompt = "missing.j2"\n',
                 {"kind.j2": "Be kind."})  # fmt: skip
    r = httpx.post(f"{srv.url}/v1/adapters/reload", timeout=60)
    assert_error(r, 409, says="routes.broken")
    assert answer(srv, "later").status_code == 404  # the adapter half was not applied either
    assert answer(srv, "kind", max_tokens=2).status_code == 200  # the running routes still serve


def test_bad_adapter_files_are_refused_and_the_server_keeps_serving(fresh_server, base_info, tmp_path) -> None:
    srv = fresh_server()
    publish_lora(srv.adapters_dir, "good", base_info, seed=31, tmp=tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 100)
    publish.publish_version(srv.adapters_dir, "junk", junk, base_model_sha256=base_info.sha256, rank=8)
    wrong_base = tmp_path / "wrong.gguf"
    shutil.copy(srv.adapters_dir / "good" / "v1.gguf", wrong_base)
    publish.publish_version(srv.adapters_dir, "other-base", wrong_base, base_model_sha256="0" * 64, rank=8)
    # a version whose file was changed after publishing (checksum no longer matches)
    publish_lora(srv.adapters_dir, "tampered", base_info, seed=32, tmp=tmp_path)
    with open(srv.adapters_dir / "tampered" / "v1.gguf", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\x7f" * 10)
    # a half-written version: weights without a manifest
    (srv.adapters_dir / "good" / "v2.gguf").write_bytes(b"partial")

    def refused() -> dict:
        return httpx.get(f"{srv.url}/v1/adapters", timeout=60).json()["refused"]

    def all_refused() -> bool:
        reasons = refused()
        return {"junk@1", "other-base@1"} <= set(reasons) and any(
            "sha256" in v for k, v in reasons.items() if "tampered" in k)

    assert wait_for(all_refused)
    reasons = refused()
    assert "header" in reasons["junk@1"] or "general.type" in reasons["junk@1"]
    assert "base model" in reasons["other-base@1"]
    assert any("sha256" in v for k, v in reasons.items() if "tampered" in k)
    for model in ("junk", "other-base", "tampered"):
        r = answer(srv, model)
        assert r.status_code == 404, r.text
    assert answer(srv, "good", max_tokens=2).headers["x-adapters"] == "good@1:1"
    assert srv.metric("adapter_load_failures_total") >= 2
    assert srv.proc.poll() is None


def test_loaded_adapters_are_bounded_lru(fresh_server, base_info, tmp_path) -> None:
    srv = fresh_server(max_loaded_adapters=2)
    for i in range(4):
        publish_lora(srv.adapters_dir, f"a{i}", base_info, seed=40 + i, tmp=tmp_path, rank=4)
    assert wait_for(lambda: "a3" in model_ids(srv))
    first = answer(srv, "a0", max_tokens=8).json()["choices"][0]["message"]["content"]
    for i in range(1, 4):
        assert answer(srv, f"a{i}", max_tokens=2).status_code == 200
    assert srv.metric("adapters_loaded") == 2
    adapters = httpx.get(f"{srv.url}/v1/adapters", timeout=60).json()["data"]
    assert sum(len(a["loaded"]) for a in adapters) == 2
    # an unloaded adapter comes back, with the same output
    assert answer(srv, "a0", max_tokens=8).json()["choices"][0]["message"]["content"] == first
    assert srv.metric("adapter_loads_total", adapter="a0") == 2


def test_manifest_is_served_in_adapter_listing(fresh_server, base_info, tmp_path) -> None:
    srv = fresh_server()
    publish_lora(srv.adapters_dir, "listed", base_info, seed=50, tmp=tmp_path)
    assert wait_for(lambda: "listed" in model_ids(srv))
    data = httpx.get(f"{srv.url}/v1/adapters", timeout=60).json()["data"]
    entry = next(a for a in data if a["name"] == "listed")
    manifest = entry["versions"][0]
    assert manifest["base_model_sha256"] == base_info.sha256
    assert manifest["sha256"] == json.loads((srv.adapters_dir / "listed" / "v1.json").read_text())["sha256"]
