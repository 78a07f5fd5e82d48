"""(slow) kill -9 under load, in a loop, on one database: never corrupt, never lose an acknowledged row.

An acknowledged request is one whose client received the whole answer (a JSON body, or a stream up
to `data: [DONE]`). After each kill: `PRAGMA integrity_check` is ok (SQLite), every acknowledged id
has a row, and after the restart no row is left `in_progress`. On SQLite and on a real PostgreSQL
server. `RELIABILITY_KILL_CYCLES` sets the loop count.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, chat_body, log_rows, passive_omp, publish_lora
from tests.reliability import record

pytestmark = pytest.mark.slow
URL = "/v1/chat/completions"


async def load(url: str, seconds: float, rng: random.Random) -> tuple[list[str], int, list[asyncio.Task]]:
    """Start mixed traffic; after `seconds` return the acknowledged ids so far (the list keeps
    growing until the tasks end), the number of requests sent, and the client tasks."""
    acked: list[str] = []
    sent = 0
    end = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while time.monotonic() < end:
                sent += 1
                model = rng.choice(["base", "kill-a", "kill-b"])
                body = chat_body(f"Tell me about harbours, take {sent}.", model=model,
                                 max_tokens=rng.randint(2, 24), stream=rng.random() < 0.5)
                try:
                    if body["stream"]:
                        async with http.stream("POST", URL, json=body) as r:
                            text = (await r.aread()).decode()
                        if r.status_code == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text:
                            acked.append(r.headers["x-request-id"])
                    else:
                        r = await http.post(URL, json=body)
                        if r.status_code == 200:
                            r.json()
                            acked.append(r.headers["x-request-id"])
                except (httpx.HTTPError, ValueError):
                    return  # the server died under us

    tasks = [asyncio.create_task(client(i)) for i in range(6)]
    await asyncio.sleep(seconds)
    return acked, sent, tasks


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_under_load_in_a_loop(tmp_path: Path, model_path: Path, base_info, backend: str, request) -> None:
    cycles = int(os.environ.get("RELIABILITY_KILL_CYCLES", "10"))
    rng = random.Random(7)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    publish_lora(adapters, "kill-a", base_info, seed=71, tmp=tmp_path, rank=4)
    publish_lora(adapters, "kill-b", base_info, seed=72, tmp=tmp_path, rank=4)
    db = tmp_path / "log.sqlite3"
    # the restarted server is the same replica: on a shared database it marks only its own rows
    where = {"db_path": db} if backend == "sqlite" else {"db_url": request.getfixturevalue("pg_url"), "replica": "k"}
    target = where.get("db_url", db)
    all_acked: list[str] = []
    corrupt = lost = not_completed = stuck_in_progress = 0
    for cycle in range(cycles):
        work = tmp_path / f"run{cycle}"
        work.mkdir()
        with passive_omp():
            srv = ServerProcess(work, model_path, **where, adapters_dir=adapters,
                                prompts_dir=tmp_path / "prompts", parallel=2, queue_max=8)
        # rows left by the previous kill are interrupted now, never in_progress
        stuck_in_progress += len(log_rows(target, "SELECT id FROM exchanges WHERE status = 'in_progress' AND "
                                          "created_at < ?", (time.time() - 0.5,))) if cycle else 0

        async def run(srv: ServerProcess = srv) -> list[str]:
            acked, _sent, tasks = await load(srv.url, rng.uniform(3, 8), rng)
            srv.proc.send_signal(signal.SIGKILL)  # in the middle of the traffic
            await asyncio.gather(*tasks, return_exceptions=True)
            return acked

        acked = asyncio.run(run())
        srv.proc.wait()
        srv.stop()
        if backend == "sqlite":
            conn = sqlite3.connect(db)
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            conn.close()
        else:
            ok = "ok"  # PostgreSQL's own crash safety; the server process is what is killed
        rows = {r["id"]: r["status"] for r in log_rows(target, "SELECT id, status FROM exchanges")}
        corrupt += ok != "ok"
        lost += sum(1 for i in acked if i not in rows)
        not_completed += sum(1 for i in acked if rows.get(i) not in (None, "completed"))
        all_acked += acked
    record("kill9_loop" if backend == "sqlite" else "kill9_loop_postgresql", {"cycles": cycles, "acknowledged": len(all_acked), "corrupt_dbs": corrupt,
                          "lost_rows": lost, "acknowledged_not_completed": not_completed,
                          "in_progress_after_restart": stuck_in_progress})
    assert corrupt == 0
    assert lost == 0
    assert stuck_in_progress == 0
    assert not_completed == 0, f"{not_completed} of {len(all_acked)} answered requests are not 'completed' in the log"
