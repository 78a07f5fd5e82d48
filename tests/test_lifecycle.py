"""Readiness follows the generation worker: a blocked scheduler thread turns /ready to 503.

The app runs in-process here (Litestar's TestClient, the real model and engine), because only
in-process can a test block the scheduler thread itself, which is what a hung llama.cpp call or a
deadlock would do. The block is a real one: a command that the scheduler thread runs between steps
and that waits on an event, while a chat request is in flight.
"""

from __future__ import annotations

import threading
from pathlib import Path

from litestar.testing import TestClient

from server.app import create_app
from server.settings import Settings
from tests.conftest import wait_for


def test_ready_turns_503_while_the_generation_worker_is_stuck_and_recovers(tmp_path: Path, model_path: Path) -> None:
    settings = Settings(
        model=model_path, adapters_dir=tmp_path / "adapters", prompts_dir=tmp_path / "prompts",
        db_path=tmp_path / "log.sqlite3", parallel=2, n_ctx=512, stuck_after_s=1.0,
        adapter_watch_interval_s=0,
    )  # fmt: skip
    (tmp_path / "adapters").mkdir()
    (tmp_path / "prompts").mkdir()
    app = create_app(settings)
    with TestClient(app, timeout=60) as client:
        assert wait_for(lambda: client.get("/ready").status_code == 200), client.get("/ready").text
        engine = app.state["app"].engine

        release = threading.Event()
        blocked = threading.Event()

        def hang() -> None:  # runs on the scheduler thread
            blocked.set()
            release.wait(60)

        engine._call(hang)
        assert blocked.wait(10), "the scheduler never picked up the command"

        answer: dict = {}

        def chat() -> None:
            r = client.post("/v1/chat/completions", json={
                "model": "base", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hello."}]})
            answer["status"], answer["body"] = r.status_code, r.json()

        t = threading.Thread(target=chat)
        t.start()
        assert wait_for(lambda: client.get("/ready").status_code == 503, timeout=10)
        r = client.get("/ready")
        assert r.status_code == 503
        assert "generation worker stuck" in r.json()["problems"]
        assert client.get("/health").status_code == 200  # liveness is a different question

        release.set()
        t.join(60)
        assert answer["status"] == 200, answer
        assert answer["body"]["choices"][0]["message"]["content"]
        assert wait_for(lambda: client.get("/ready").status_code == 200, timeout=10)
