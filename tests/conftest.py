"""Shared fixtures: the real default model, real LoRA adapters made here, and real servers.

`ServerProcess` runs `python -m server` in a subprocess on a free loopback port, exactly as a user
would, and the tests talk to it with httpx and the official `openai` client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.fetch_model import fetch  # noqa: E402
from adapter_chat import publish, registry  # noqa: E402
from adapter_chat.gguf_info import BaseModelInfo  # noqa: E402

LORA_TARGETS = registry.DEFAULT_LORA_TARGETS


@pytest.fixture(scope="session")
def model_path() -> Path:
    return fetch()


@pytest.fixture(scope="session")
def base_info(model_path: Path) -> BaseModelInfo:
    return BaseModelInfo.load(model_path)


def make_lora_file(
    path: Path, base: BaseModelInfo, *, seed: int, rank: int = 8, strength: float = 0.06,
    targets: tuple[str, ...] = LORA_TARGETS,
) -> Path:
    """A real llama.cpp LoRA GGUF with random low-rank A/B, strong enough to change greedy output."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for name, shape in base.tensor_shapes.items():
        if not name.startswith("blk.") or name.split(".")[2] not in targets or len(shape) != 2:
            continue
        n_out, n_in = shape
        a = rng.normal(0, strength, (rank, n_in)).astype(np.float32)
        b = rng.normal(0, strength, (n_out, rank)).astype(np.float32)
        pairs[name] = (a, b)
    registry.write_lora_gguf(path, architecture=base.architecture, pairs=pairs, alpha=float(rank),
                             metadata={"training.note": f"random test adapter seed={seed}"})
    return path


def publish_lora(adapters_dir: Path, name: str, base: BaseModelInfo, *, seed: int, tmp: Path, **kw: Any) -> int:
    """Publish a random adapter as the next version of `name` through the shared registry code."""
    src = make_lora_file(tmp / f"{name}-{seed}.gguf", base, seed=seed, **kw)
    manifest = publish.publish_version(
        adapters_dir, name, src, base_model_sha256=base.sha256, base_model_name=base.name,
        architecture=base.architecture, rank=kw.get("rank", 8), alpha=float(kw.get("rank", 8)),
        metrics={"note": "test"},
    )
    return manifest.version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server` on 127.0.0.1 with settings passed as CHAT_* environment variables."""

    def __init__(self, workdir: Path, model: Path, **settings: Any) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.adapters_dir = Path(settings.pop("adapters_dir", workdir / "adapters"))
        self.prompts_dir = Path(settings.pop("prompts_dir", workdir / "prompts"))
        self.db_path = Path(settings.pop("db_path", workdir / "log.sqlite3"))
        self.db = settings.get("db_url") or self.db_path
        """The conversation log: a SQLite path, or the PostgreSQL URL given as db_url."""
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.prompts_dir.mkdir(parents=True, exist_ok=True)
        defaults = {"n_ctx": 1024, "parallel": 4, "n_threads": 2, "adapter_watch_interval_s": 0.3}
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        for key, value in {**defaults, **settings}.items():
            env[f"CHAT_{key.upper()}"] = ",".join(value) if isinstance(value, (list, tuple)) else str(value)
        env.update({
            "CHAT_MODEL": str(model), "CHAT_ADAPTERS_DIR": str(self.adapters_dir),
            "CHAT_PROMPTS_DIR": str(self.prompts_dir), "CHAT_DB_PATH": str(self.db_path),
        })  # fmt: skip
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(self.port), "--log-level", "info"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.api_key = (settings.get("api_keys") or [None])[0] if isinstance(settings.get("api_keys"), list) else None
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def client(self, api_key: str | None = None, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "none", max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def async_client(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "none",
                                  max_retries=0, timeout=120)

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of a metric whose labels include `labels`."""
        text = httpx.get(f"{self.url}/metrics", timeout=10,
                         headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric_name, _, label_text = head.partition("{")
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def write_routes(prompts_dir: Path, routes_toml: str, templates: dict[str, str]) -> None:
    for name, text in templates.items():
        (prompts_dir / name).write_text(text)
    (prompts_dir / "routes.toml").write_text(routes_toml)


SHARED_ROUTES = """
[routes.pirate]
prompt = "pirate.j2"
variables = { ship = "Black Pearl" }
[routes.pirate.params]
temperature = 0.0

[routes.styled]
adapters = [{ name = "style-a", scale = 1.0 }]
[routes.styled.params]
temperature = 0.0

[routes.ab]
prompt = "pirate.j2"
variables = { ship = "Black Pearl" }
adapters = [{ name = "style-a" }]
split = 50

[routes.fallback]
prompt = "pirate.j2"
variables = { ship = "Black Pearl" }
adapters = [{ name = "missing-adapter" }]

[routes.quiet]
prompt = "pirate.j2"
variables = { ship = "Black Pearl" }
log = false
"""
PIRATE = "You are a pirate captain of the {{ ship }}. Always answer like a pirate, starting with 'Arr!'."


def start_shared_server(work: Path, model_path: Path, base_info: BaseModelInfo, **settings: Any) -> ServerProcess:
    """A server with adapters style-a (v1) and style-b (v1) and the SHARED_ROUTES, in `work`."""
    adapters = work / "adapters"
    adapters.mkdir()
    publish_lora(adapters, "style-a", base_info, seed=1, tmp=work)
    publish_lora(adapters, "style-b", base_info, seed=2, tmp=work)
    (work / "prompts").mkdir()
    write_routes(work / "prompts", SHARED_ROUTES, {"pirate.j2": PIRATE})
    return ServerProcess(work, model_path, adapters_dir=adapters, **settings)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, model_path: Path, base_info: BaseModelInfo) -> Iterator[ServerProcess]:
    """One server shared by read-only tests (see start_shared_server)."""
    proc = start_shared_server(tmp_path_factory.mktemp("shared-server"), model_path, base_info)
    yield proc
    proc.stop()


@pytest.fixture
def fresh_server(tmp_path: Path, model_path: Path) -> Iterator[Any]:
    """Factory for a server with its own directories and settings; stopped after the test."""
    started: list[ServerProcess] = []

    def start(**settings: Any) -> ServerProcess:
        work = tmp_path / f"srv{len(started)}"
        work.mkdir()
        proc = ServerProcess(work, model_path, **settings)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One real PostgreSQL server for the session (tests/postgres.py); tests take databases of it."""
    from tests.postgres import PostgresServer

    pg = PostgresServer()
    yield pg
    pg.close()


@pytest.fixture
def pg_url(postgres: Any, request: pytest.FixtureRequest) -> str:
    """A new empty database on the session's PostgreSQL server, for one test."""
    import re

    return postgres.create_database(re.sub(r"\W", "_", request.node.name)[:30] + f"_{os.getpid()}_{time.monotonic_ns()}")


def log_rows(target: Any, sql: str, args: tuple = ()) -> list[Any]:
    """Rows (as mappings) of a query on a conversation log, a SQLite path or a PostgreSQL URL,
    read through the server's own database layer; `?` placeholders, quote `"user"`."""
    import sqlalchemy as sa

    from adapter_chat import db

    parts = sql.split("?")
    text = parts[0] + "".join(f":p{i}{part}" for i, part in enumerate(parts[1:]))
    engine = db.open_engine(target, readonly=True)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text(text), {f"p{i}": v for i, v in enumerate(args)}).mappings())
    finally:
        engine.dispose()


@contextmanager
def passive_omp() -> Iterator[None]:
    """Start servers whose llama.cpp threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE):
    for tests that run a server next to other busy processes (a browser, a killer, a filler) on
    the same two cores, where spinning threads would slow everything down tenfold."""
    old = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = old


@pytest.fixture
def fresh_passive_server(fresh_server) -> Any:
    """`fresh_server`, with passive OpenMP threads (see passive_omp)."""

    def start(**settings: Any) -> ServerProcess:
        with passive_omp():
            return fresh_server(**settings)

    return start


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def chat_body(content: str = "Say hello.", model: str = "base", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": kw.pop("max_tokens", 24), **kw}
