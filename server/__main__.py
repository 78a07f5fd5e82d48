"""`python -m server`: run the chat server. CLI flags override CHAT_* environment variables."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import uvicorn

from server.app import create_app
from server.settings import Settings


def parse_args(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    p.add_argument("--host", help="address to listen on (CHAT_HOST)")
    p.add_argument("--port", type=int, help="port to listen on (CHAT_PORT)")
    p.add_argument("--model", type=Path, help="base model GGUF (CHAT_MODEL)")
    p.add_argument("--adapters-dir", type=Path, help="adapters directory (CHAT_ADAPTERS_DIR)")
    p.add_argument("--prompts-dir", type=Path, help="prompts directory (CHAT_PROMPTS_DIR)")
    p.add_argument("--routes-file", type=Path, help="routes TOML (CHAT_ROUTES_FILE)")
    p.add_argument("--db-path", type=Path, help="conversation log SQLite file (CHAT_DB_PATH)")
    p.add_argument("--db-url", help="conversation log on PostgreSQL, postgresql://... (CHAT_DB_URL)")
    p.add_argument("--parallel", type=int, help="sequences decoded together (CHAT_PARALLEL)")
    p.add_argument("--n-ctx", type=int, help="context tokens per sequence (CHAT_N_CTX)")
    p.add_argument("--n-gpu-layers", type=int, help="model layers offloaded to a GPU (CHAT_N_GPU_LAYERS)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = vars(p.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


KEEP_ALIVE_S = 75


def main(argv: list[str] | None = None) -> None:
    overrides = parse_args(argv)
    level = str(overrides.pop("log_level"))
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(**overrides)  # type: ignore[arg-type]
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal so the default
    # action would end the process with -15. A drained, clean stop is a success: exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Keep-alive above the clients' idle expiry (httpx and the OpenAI client: 5 s), so a client
    # always drops an idle connection before the server closes it. At uvicorn's default (also 5 s)
    # the two race: a request sent on a connection just as the server closes it fails with a
    # ReadError (seen twice in tests/test_adversarial.py's 10,000-request flood). 75 s is nginx's.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=level,
                timeout_graceful_shutdown=30, timeout_keep_alive=KEEP_ALIVE_S)


if __name__ == "__main__":
    main()
