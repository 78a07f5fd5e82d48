"""Server settings: one class, read from `CHAT_*` environment variables, an optional `.env`, and
CLI flags of `python -m server` (which win). Built once at the entry point and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapter_chat import db

DEFAULT_MODEL = Path("models/SmolLM2-135M-Instruct.Q4_1.gguf")

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Everything the server can be told. The README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(env_prefix="CHAT_", env_file=".env", extra="ignore", protected_namespaces=())

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, description="Port to listen on.")
    model: Path = Field(DEFAULT_MODEL, description="Base model GGUF file.")
    model_name: str | None = Field(None, description="Model id shown in /v1/models (default: the file's stem).")
    n_ctx: int = Field(2048, ge=64, description="Context tokens per sequence (prompt + answer).")
    n_threads: int = Field(2, ge=1, description="CPU threads for decoding.")
    parallel: int = Field(4, ge=1, le=64, description="Sequences decoded together (slots).")
    lanes: int = Field(0, ge=0, le=64, description="llama.cpp contexts decoded side by side, sharing the threads and slots (0 = min(2, threads, slots)).")
    n_batch: int = Field(512, ge=32, description="Max tokens per llama_decode call (prefill chunk budget).")
    n_gpu_layers: int = Field(0, ge=0, description="Model layers offloaded to a GPU (999 = all); needs a GPU build (`make setup GPU=cuda`), a CPU-only build warns and runs on the CPU.")
    adapters_dir: Path = Field(Path("adapters"), description="Adapters directory (one folder per adapter).")
    prompts_dir: Path = Field(Path("prompts"), description="System prompt templates directory.")
    routes_file: Path | None = Field(None, description="Routes TOML (default: <prompts_dir>/routes.toml).")
    db_path: Path = Field(Path("data/conversations.sqlite3"), description="Conversation log SQLite file (when db_url is not set).")
    db_url: str | None = Field(None, description="PostgreSQL URL of a conversation log shared by every replica (`postgresql://user:password@host:5432/db`); replaces db_path.")
    trainer_runs_db: str | None = Field(None, description="SQLite file or PostgreSQL URL the trainer records its runs in, for /metrics and /v1/runs (default: the conversation log; set it when replicas log to separate SQLite files).")
    log_conversations: bool = Field(True, description="Log exchanges (routes can opt out with log = false).")
    retention_days: float = Field(0, ge=0, description="Delete logged exchanges older than this (0 = keep).")
    replica: str | None = Field(None, description="Replica name written to each log row.")
    api_keys: CommaList = Field([], description="Comma-separated API keys; empty = no auth.")
    admin_keys: CommaList = Field([], description="Comma-separated admin keys (reload, adapter changes).")
    metrics_public: bool = Field(True, description="Serve /metrics without a key.")
    cors_origins: CommaList = Field([], description="Comma-separated CORS origins (none = CORS off).")
    allowed_hosts: CommaList = Field([], description="Comma-separated allowed Host headers (empty = any).")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted request body.")
    max_adapter_upload_bytes: int = Field(1 << 30, ge=1024, description="Largest LoRA file accepted by POST /v1/adapters/{name}/versions.")
    max_tokens_limit: int = Field(2048, ge=1, description="Upper bound for a request's max_tokens.")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when the request gives none.")
    queue_max: int = Field(64, ge=0, description="Requests waiting for a slot before 429.")
    request_timeout_s: float = Field(300, gt=0, description="Generation time cap per request.")
    stuck_after_s: float = Field(30, gt=0, description="/ready turns 503 when the generation worker makes no progress this long.")
    max_loaded_adapters: int = Field(8, ge=1, description="Adapter versions kept loaded (LRU beyond).")
    adapter_watch_interval_s: float = Field(2.0, ge=0, description="Adapters dir poll interval (0 = off).")
    sse_ping_s: float = Field(15.0, gt=0, description="SSE keep-alive ping interval.")

    @field_validator("api_keys", "admin_keys", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @property
    def routes_path(self) -> Path:
        return self.routes_file or self.prompts_dir / "routes.toml"

    @field_validator("db_url")
    @classmethod
    def _postgresql_url(cls, v: str | None) -> str | None:
        if v is not None and not db.is_url(v):
            raise ValueError("CHAT_DB_URL must be a postgresql:// URL (postgresql://user:password@host:5432/db); "
                             "for a SQLite file set CHAT_DB_PATH instead")
        return v or None

    @property
    def log_target(self) -> db.Target:
        """Where the conversation log lives: db_url, else db_path."""
        return self.db_url or self.db_path

    @property
    def runs_target(self) -> db.Target:
        """Where the trainer's runs are read from: trainer_runs_db, else the conversation log."""
        if self.trainer_runs_db:
            return self.trainer_runs_db if db.is_url(self.trainer_runs_db) else Path(self.trainer_runs_db)
        return self.log_target

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model.stem
