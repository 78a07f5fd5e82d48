"""The playground at /playground, driven for real: Debian's chromium under Playwright against a real
server with an API key, a real adapter and a real conversation log.

Chromium comes from scripts/test-tools.d/chromium.sh (run by `make test`); when it is missing these
tests fail, they never skip. Playwright is only the driver here: `playwright install` is never run.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright

from adapter_chat import publish, store
from adapter_chat.gguf_info import BaseModelInfo
from tests.conftest import (
    PIRATE,
    SHARED_ROUTES,
    ServerProcess,
    make_lora_file,
    publish_lora,
    write_routes,
)
from tests.reliability import raw_http
from trainer.config import SourceConfig
from trainer.dataset import load_template, read_log

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
KEY = "sk-playground-T4k"
ADAPTER = "house-style"
# What a nightly run writes into a manifest (trainer/stages.py _flat_metrics) and into trainer_runs.
GATE = {"passed": True, "reason": "adapter val loss 1.702 < base 2.104 by 19.1% (margin 1%)", "margin": 0.01,
        "mode": "relative"}
MANIFEST_METRICS = {"val_loss_base": 2.104, "val_loss_adapter": 1.702, "n_texts": 24, "gate": GATE,
                    "dataset": {"train_items": 96, "val_items": 24}}
SECRET_SAMPLE = "held-out prompt from a user's conversation"
RUNS = [
    ("published", 1, GATE["reason"], {"dataset": {"train_items": 96, "val_items": 24},
                                      "eval": {"val_loss_base": 2.104, "val_loss_adapter": 1.702,
                                               "samples": [{"prompt": SECRET_SAMPLE, "base": "b", "adapter": "a"}]},
                                      "gate": GATE}),
    ("rejected", None, "adapter val loss 2.140 is not below base 2.104 by 1%", {
        "dataset": {"train_items": 97, "val_items": 24},
        "eval": {"val_loss_base": 2.104, "val_loss_adapter": 2.140}, "gate": {**GATE, "passed": False}}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_path: Path, base_info: BaseModelInfo) -> Iterator[ServerProcess]:
    """A server with an API key, the shared routes, adapter style-a and a nightly-published
    house-style v1, and two trainer runs recorded in its database."""
    work = tmp_path_factory.mktemp("playground")
    adapters = work / "adapters"
    adapters.mkdir()
    publish_lora(adapters, "style-a", base_info, seed=1, tmp=work)
    publish.publish_version(
        adapters, ADAPTER, make_lora_file(work / "house.gguf", base_info, seed=3), base_model_sha256=base_info.sha256,
        base_model_name=base_info.name, architecture=base_info.architecture, rank=8, alpha=8.0,
        metrics=MANIFEST_METRICS, data_window={"items": 120, "train_items": 96, "val_items": 24},
    )
    (work / "prompts").mkdir()
    write_routes(work / "prompts", SHARED_ROUTES, {"pirate.j2": PIRATE})
    # a browser shares the two cores with the server: llama.cpp's OpenMP threads must not spin
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        srv = ServerProcess(work, model_path, adapters_dir=adapters, api_keys=[KEY])
    conn = store.open_db(srv.db_path)  # the trainer writes its runs into the server's log file
    for status, version, reason, metrics in RUNS:
        run_id = store.start_trainer_run(conn, ADAPTER)
        store.finish_trainer_run(conn, run_id, status=status, version=version, reason=reason, metrics=metrics)
    conn.dispose()
    yield srv
    srv.stop()


def db(srv: ServerProcess, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{srv.db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wait_rows(srv: ServerProcess, sql: str, args: tuple, n: int, timeout: float = 20) -> list[sqlite3.Row]:
    """The log is written by a background thread: wait (bounded) until `n` rows are there."""
    deadline = time.monotonic() + timeout
    while True:
        rows = db(srv, sql, args)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# the page is public, the data is not


def test_page_is_public_and_every_data_call_needs_the_key(server: ServerProcess) -> None:
    key = {"Authorization": f"Bearer {KEY}"}
    with server.http() as http:
        for path in ("/playground", "/playground/"):
            page = http.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert 'id="pane-template"' in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]
        assets = {name: http.get(f"/playground/{name}") for name in ("app.js", "style.css")}
        assert assets["app.js"].status_code == 200 and "javascript" in assets["app.js"].headers["content-type"]
        assert assets["style.css"].status_code == 200 and assets["style.css"].headers["content-type"].startswith("text/css")
        # nothing is fetched from elsewhere: the page works offline, with no CDN
        for text in (page.text, *(r.text for r in assets.values())):
            assert not re.search(r"(src|href)=[\"']?(https?:)?//|url\(\s*[\"']?(https?:)?//|import\s", text)
        assert http.get("/playground/missing.js").status_code == 404

        data_calls = [("GET", "/v1/models", None), ("GET", "/v1/adapters", None), ("GET", "/v1/runs", None),
                      ("POST", "/v1/feedback", {"response_id": "chatcmpl-x", "rating": 1}),
                      ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 1})]
        for method, path, body in data_calls:
            assert http.request(method, path, json=body).status_code == 401, path
            assert http.request(method, path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models", headers=key).status_code == 200

    # the public file route serves its own folder and nothing else, however the path is spelled
    for path in ("/playground/../app.py", "/playground/..%2fapp.py", "/playground/%2e%2e/app.py",
                 "/playground/..%2F..%2Fpyproject.toml", "/playground//etc/passwd", "/playground/%2e%2e%2f%2e%2e%2fpyproject.toml",
                 "/playground/....//app.py", "/playground/index.html%00.js", "/playground/../v1/models"):
        status, _, body = raw_http(server.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        assert status in (400, 401, 404), (path, status)
        assert b"litestar" not in body.lower() and b"[project]" not in body and b"root:" not in body, path


def test_runs_endpoint_lists_the_newest_runs_without_conversation_text(server: ServerProcess) -> None:
    key = {"Authorization": f"Bearer {KEY}"}
    with server.http(headers=key) as http:
        runs = http.get("/v1/runs").json()
        one = http.get("/v1/runs", params={"limit": 1, "adapter": ADAPTER}).json()
        other = http.get("/v1/runs", params={"adapter": "nobody"}).json()
        bad = http.get("/v1/runs", params={"limit": 0})
    assert [(r["adapter"], r["status"], r["version"]) for r in runs["data"]] == [
        (ADAPTER, "rejected", None), (ADAPTER, "published", 1)]  # newest first
    assert runs["data"][1]["metrics"]["gate"]["passed"] is True
    assert runs["data"][1]["metrics"]["eval"]["val_loss_adapter"] == 1.702
    assert SECRET_SAMPLE not in json.dumps(runs)  # held-out user prompts stay in the trainer's files
    assert runs["data"][1]["metrics"]["eval"]["n_samples"] == 1
    assert [r["status"] for r in one["data"]] == ["rejected"]
    assert other["data"] == []
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


# ---------------------------------------------------------------------------------------------
# the browser


@pytest.fixture
def page() -> Iterator[Page]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run `bash scripts/test-tools.d/chromium.sh` (make test does)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            yield context.new_page()
        finally:
            browser.close()


def pane_answers(page: Page, pane: str) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        f"#pane-{pane} .msg.assistant",
        """nodes => nodes.map(n => ({
            id: n.dataset.responseId, text: n.querySelector('.text').textContent,
            served: n.querySelector('.served').textContent, state: n.className,
            prompt_tokens: n.querySelector('.prompt-tokens b')?.textContent,
            completion_tokens: n.querySelector('.completion-tokens b')?.textContent,
            ttft: n.querySelector('.ttft b')?.textContent, total: n.querySelector('.total b')?.textContent,
        }))""",
    )


def send(page: Page, text: str, turn: int) -> None:
    page.fill("#prompt", text)
    page.click("#send")
    for pane in "ab":
        answer = page.locator(f"#pane-{pane} .msg.assistant").nth(turn - 1)
        answer.and_(page.locator(".msg:not(.streaming)")).wait_for(timeout=120_000)
        assert "done" in (answer.get_attribute("class") or ""), answer.inner_text()


@pytest.mark.timeout(300)
def test_compare_two_paths_rate_them_and_the_rating_reaches_the_trainer(
    server: ServerProcess, page: Page, model_path: Path
) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/playground")

    # without a key the page says what to do; with it, both panes list the models
    page.wait_for_selector("#status.error")
    assert "needs an API key" in page.inner_text("#status")
    page.fill("#api-key", KEY)
    page.click("#connect")
    page.wait_for_selector("#status.ok")
    assert page.evaluate("sessionStorage.getItem('adapter-chat.api-key')") == KEY
    assert page.evaluate("localStorage.getItem('adapter-chat.api-key')") is None  # not remembered unless asked
    base_id = server.client().models.list().data[0].id
    page.select_option("#pane-a select.model", base_id)
    page.select_option("#pane-b select.model", ADAPTER)
    page.click(".options summary")
    page.fill("#opt-max-tokens", "24")
    page.fill("#opt-temperature", "0")

    # one message, two streamed answers, each with what served it, timings and token counts
    send(page, "What does a fractional CTO do?", turn=1)
    a, b = pane_answers(page, "a")[0], pane_answers(page, "b")[0]
    assert "path base" in a["served"]
    assert "path finetuned" in b["served"] and f"{ADAPTER}@1" in b["served"]
    logged = {r["id"]: r for r in wait_rows(server, "SELECT * FROM exchanges WHERE status = 'completed'", (), 2)}
    for answer in (a, b):
        assert answer["text"].strip(), answer
        row = logged[answer["id"]]  # the pane shows exactly what the server generated and logged
        assert answer["text"] == row["response"]
        assert int(answer["completion_tokens"]) == row["completion_tokens"] > 0
        assert int(answer["prompt_tokens"]) == row["prompt_tokens"] > 0
        assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", answer["ttft"]) and re.fullmatch(r"\d+ ms|\d+\.\d\d s", answer["total"])
    assert a["text"] != b["text"]  # the adapter changes the greedy answer
    assert logged[b["id"]]["adapter_name"] == ADAPTER and logged[b["id"]]["adapter_version"] == 1

    # the conversation goes on: each pane sends its own previous answer back
    send(page, "Say it in one sentence.", turn=2)
    for pane, first in (("a", a), ("b", b)):
        second = pane_answers(page, pane)[1]
        row = wait_rows(server, "SELECT * FROM exchanges WHERE id = ? AND status = 'completed'", (second["id"],), 1)[0]
        assert [m["role"] for m in json.loads(row["messages"])] == ["user", "assistant", "user"]
        assert json.loads(row["messages"])[1]["content"] == first["text"]
        assert row["conversation_id"] == logged[first["id"]]["conversation_id"]  # one conversation per pane
    assert logged[a["id"]]["conversation_id"] != logged[b["id"]]["conversation_id"]

    # ratings: thumbs up with a correction on the adapter's first answer, thumbs down on the base's
    correction = "A fractional CTO leads a company's technology part-time, for several clients at once."
    pane_b_first = page.locator("#pane-b .msg.assistant").nth(0)
    pane_b_first.locator(".correct summary").click()
    pane_b_first.locator(".corrected").fill(correction)
    pane_b_first.locator(".thumb.up").click()
    page.locator("#pane-a .msg.assistant").nth(0).locator(".thumb.down").click()
    for pane in "ba":
        page.locator(f"#pane-{pane} .msg.assistant").nth(0).locator(".rating-status.ok").wait_for()
    assert "with your correction" in pane_b_first.locator(".rating-status").inner_text()

    feedback = wait_rows(server, "SELECT * FROM feedback ORDER BY id", (), 2)
    assert {(f["response_id"], f["rating"], f["corrected"]) for f in feedback} == {
        (b["id"], 1, correction), (a["id"], -1, None)}
    assert server.metric("chat_feedback_total", route=f"adapter:{ADAPTER}", path="finetuned", rating="up") == 1

    # ... and the next nightly dataset trains on the correction, not on the original answer
    template = load_template(model_path)
    adapter_items = read_log([server.db_path], SourceConfig(routes=(f"adapter:{ADAPTER}",)), template)
    first_turns = [i for i in adapter_items.items if i.origin.endswith(b["id"])]
    assert len(first_turns) == 1 and first_turns[0].answer.strip() == correction
    base_items = read_log([server.db_path], SourceConfig(routes=("base",)), template)
    assert not [i for i in base_items.items if i.origin.endswith(a["id"])]  # thumbs down: dropped
    assert base_items.dropped["rating below 0"] == 1

    # the third view: adapters with versions, training metrics and gate results, and the runs
    page.click("#tab-adapters")
    page.wait_for_selector(f".adapter[data-adapter='{ADAPTER}'] tr[data-version='1']")
    row = page.inner_text(f".adapter[data-adapter='{ADAPTER}'] tr[data-version='1']")
    assert "current" in row and "2.104 → 1.702" in row and "passed" in row and "120" in row
    assert page.locator(".adapter[data-adapter='style-a']").count() == 1
    page.wait_for_selector("table.runs tbody tr")
    runs = page.locator("table.runs tbody tr").all_inner_texts()
    assert len(runs) == 2
    assert "rejected" in runs[0] and "not below base" in runs[0]
    assert "published" in runs[1] and "v1" in runs[1] and "96 / 24" in runs[1]
    assert SECRET_SAMPLE not in page.content()
    assert not errors, errors
