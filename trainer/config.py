"""Typed trainer configuration: one file (`trainer.toml`), CLI > file > defaults.

This module owns the shape of the trainer's configuration and nothing else. `load_config`
reads a TOML file and reports *every* problem it finds in one `ConfigError` (each naming the
file and the key); `with_overrides` applies CLI values on top; `TrainerConfig.to_dict` is what
gets saved beside the output (in the manifest's `hyperparameters` and the run folder).

Layout of `trainer.toml` (see `trainer.toml.example` and docs/trainer.md)::

    base_model = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    logs = ["data/conversations*.sqlite3"]      # paths or globs; de-duplicated by request id
    adapters_dir = "adapters"

    [adapters.house-style]
    routes = ["house-style"]
    jsonl = ["examples/fractional-cto/data/conversations.jsonl"]

    [adapters.house-style.train]
    epochs = 1
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from adapter_chat import db
from adapter_chat.registry import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS
from adapter_chat.registry import validate_name

OPTIMIZERS = ("sgd", "adamw")  # the names trainer.llama_opt.OPTIMIZERS maps to ggml's enum
METHODS = ("lora", "full")
WINDOWS = ("packed", "stream")
SCHEDULES = ("constant", "cosine")
GATE_MODES = ("relative", "absolute")


class ConfigError(ValueError):
    """A configuration file or CLI value is invalid. The message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid trainer configuration:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class SourceConfig:
    """Which logged exchanges and files become training items for one adapter."""

    routes: tuple[str, ...] = ()
    """Only exchanges whose resolved route is one of these (empty: any route)."""
    adapter_names: tuple[str, ...] = ()
    """Only exchanges served with one of these adapters first (empty: any)."""
    path_kinds: tuple[str, ...] = ()
    """Only these path kinds: `prompt`, `finetuned`, `base` (empty: any)."""
    window_days: float | None = None
    """Only exchanges created in the last N days (None: everything retained)."""
    since: float | None = None
    """Absolute lower bound (unix time); combined with `window_days` by taking the later one."""
    until: float | None = None
    """Absolute upper bound (unix time)."""
    min_rating: int = 0
    """Drop exchanges whose latest feedback rating is below this (unrated counts as 0)."""
    drop_length_finish: bool = True
    """Drop replies cut off by max_tokens (`finish_reason = 'length'`) unless corrected."""
    include_system_prompt: bool = True
    """Render the route's logged system prompt before the messages, as the server did. False
    learns the behaviour without it (distilling a prompt path into a finetuned path)."""
    jsonl: tuple[Path, ...] = ()
    """Extra JSONL files (completion, pairs or chat shape), globs allowed."""
    use_logs: bool = True
    """Read the conversation log(s) at all (False: JSONL files only)."""


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters handed to `trainer.finetune.TrainConfig`."""

    n_ctx: int = 256
    """Training window in tokens: a multiple of 256 (llama.cpp pads contexts to 256)."""
    epochs: int = 1
    method: str = "lora"
    """`lora`: train the adapter's A/B tensors directly, base frozen. `full`: train the target
    matrices in full on an FP32 copy, then extract a LoRA by SVD (see `[extract]`)."""
    rank: int = 16
    """LoRA rank (method `lora`)."""
    alpha: float = 32.0
    """LoRA alpha: the update is scaled by alpha / rank (method `lora`)."""
    quantized_base: bool = False
    """Method `lora`: train over the served quantized base file (True) or its FP32 copy (False:
    faster on CPU, where backward through quantized matrices is 2.3x slower)."""
    top_layers: int = 0
    """Method `lora`: adapt only the last N blocks (0: all); backward stops below them."""
    checkpoint_every: int = 50
    """Method `lora`: steps between checkpoints; a killed run resumes from the last one. 0: none."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many steps."""
    windows: str = "packed"
    """`packed`: items packed whole, one sequence each, loss on assistant tokens only. `stream`:
    the trainer before session 4, kept to benchmark against: every item's tokens concatenated and
    cut into windows across item boundaries, every token a target."""
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    schedule: str = "constant"
    """Learning-rate schedule: `constant` or `cosine` (from `lr` down to `lr_min`)."""
    lr_min: float = 0.0
    val_fraction: float = 0.1
    """Share of conversations (by hash) held out for validation."""
    max_items: int | None = None
    """Cap on training items (the newest are kept); None: no cap."""
    max_val_items: int | None = 100
    """Cap on validation items (evaluation time grows with them); None: no cap."""


@dataclass(frozen=True)
class ExtractSettings:
    """How the trained weights are turned into a LoRA (`trainer.extract.extract_lora`)."""

    fidelity: float = 0.9
    max_rank: int = 64
    min_rank: int = 4
    rank: int | None = None
    """Fixed rank; None picks the smallest rank keeping `fidelity` of the delta's energy."""


@dataclass(frozen=True)
class GateSettings:
    """When a new version is good enough to publish."""

    margin: float = 0.0
    """Required validation-loss improvement over the base model: with `mode = "relative"` a
    fraction (0.02: the adapter's loss must be at least 2% lower), with `"absolute"` in nats.
    0.0: publish when the adapter is no worse than the base (see trainer.evaluate.gate)."""
    mode: str = "relative"
    min_items: int = 50
    """Fewer training items than this: the run is `skipped`."""
    min_val_items: int = 5
    """Fewer validation items than this: the run is `skipped`."""
    max_tokens: int = 64
    """Tokens generated per sample prompt in the evaluation report."""
    sample_prompts: int = 3
    """How many validation prompts to generate answers for (shown in the report)."""
    scorer: str | None = None
    """A task scorer, `file.py:function` (relative to the config file) or `module:function`,
    taking an answer and returning a bool or a number in [0, 1]: greedy answers to held-out
    prompts are scored with it, through the server's engine (e.g.
    `style_check.py:is_house_style`)."""
    min_score: float = 0.0
    """The adapter's mean score must reach this share to publish (with `scorer`)."""
    score_prompts: int = 30
    """How many held-out prompts the scorer judges: validation items' prompts, or `score_file`'s."""
    score_file: Path | None = None
    """Held-out prompts for the scorer (JSONL, one `{"messages": [...]}` or `{"prompt": "..."}`
    per line), never trained on. None: the validation items' prompts."""
    score_max_tokens: int = 200
    """Tokens generated per scored answer."""


@dataclass(frozen=True)
class AdapterConfig:
    """One adapter the nightly job keeps fresh."""

    name: str
    source: SourceConfig = field(default_factory=SourceConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    keep: int = 5
    """Complete versions kept on disk (plus the current one)."""


@dataclass(frozen=True)
class TrainerConfig:
    """Everything the trainer needs; built once at the entry point and passed down."""

    base_model: Path = Path("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    logs: tuple[str, ...] = ("data/conversations.sqlite3",)
    """Conversation logs: SQLite files (paths or globs) or PostgreSQL URLs (`$VAR` is expanded)."""
    runs_db: str | Path | None = None
    """Where `trainer_runs` rows go (a SQLite path or a PostgreSQL URL); None: the first log."""
    adapters_dir: Path = Path("adapters")
    cache_dir: Path = Path("data/trainer-cache")
    lock_file: Path | None = None
    """None: `<cache_dir>/nightly.lock`."""
    threads: int = 2
    n_gpu_layers: int = 0
    """Model layers offloaded to a GPU in training and evaluation (needs a GPU build)."""
    snapshot: bool = False
    """Read logs from a `VACUUM INTO` snapshot instead of a read-only connection."""
    adapters: tuple[AdapterConfig, ...] = ()
    source_file: Path | None = None
    """The TOML file this came from (for messages), if any."""

    @property
    def lock_path(self) -> Path:
        return self.lock_file if self.lock_file is not None else self.cache_dir / "nightly.lock"

    def adapter(self, name: str) -> AdapterConfig:
        for a in self.adapters:
            if a.name == name:
                return a
        where = f" in {self.source_file}" if self.source_file else ""
        known = ", ".join(a.name for a in self.adapters) or "none"
        raise ConfigError([f"no adapter named {name!r}{where} (configured: {known})"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, saved beside every output (paths as strings)."""
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------
# Loading


_SECTIONS: dict[str, type] = {
    "train": TrainSettings,
    "extract": ExtractSettings,
    "gate": GateSettings,
}
_SOURCE_KEYS = {f.name for f in dataclasses.fields(SourceConfig)}
_TOP_KEYS = {f.name for f in dataclasses.fields(TrainerConfig)} - {"adapters", "source_file"}


def _expect(value: Any, kind: type | tuple[type, ...], where: str, problems: list[str]) -> bool:
    # bool is an int in Python; never accept it where a number is meant.
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        problems.append(f"{where}: expected {_kind_name(kind)}, got {value!r}")
        return False
    if not isinstance(value, kind):
        problems.append(f"{where}: expected {_kind_name(kind)}, got {type(value).__name__} {value!r}")
        return False
    return True


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _coerce_field(cls: type, name: str, value: Any, where: str, problems: list[str]) -> Any:
    """Check one TOML value against the dataclass field's annotation and convert it."""
    ann = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    ann = str(ann)
    optional = "None" in ann
    if value is None and optional:
        return None
    if ann.startswith("tuple[Path"):
        if isinstance(value, str):
            value = [value]
        if _expect(value, list, where, problems) and all(_expect(v, str, where, problems) for v in value):
            return tuple(Path(v) for v in value)
        return None
    if ann.startswith("tuple[str"):
        if isinstance(value, str):
            value = [value]
        if _expect(value, list, where, problems) and all(_expect(v, str, where, problems) for v in value):
            return tuple(value)
        return None
    if ann.startswith("Path"):
        return Path(value) if _expect(value, str, where, problems) else None
    if ann.startswith("bool"):
        return value if _expect(value, bool, where, problems) else None
    if ann.startswith("int"):
        return value if _expect(value, int, where, problems) else None
    if ann.startswith("float"):
        return float(value) if _expect(value, (int, float), where, problems) else None
    if ann.startswith("str"):
        return value if _expect(value, str, where, problems) else None
    raise AssertionError(f"unhandled annotation {ann} for {cls.__name__}.{name}")


def _build(cls: type, table: Mapping[str, Any], where: str, problems: list[str], *, base: Any = None) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
            continue
        converted = _coerce_field(cls, key, value, f"{where}.{key}", problems)
        if converted is not None or value is None:
            values[key] = converted
    obj = base if base is not None else cls()
    return dataclasses.replace(obj, **values)


def _resolve(path: Path, root: Path) -> Path:
    return path if path.is_absolute() else root / path


def _log_target(value: str, root: Path) -> str | Path:
    """A log named in the config: `$VAR`s expanded (a URL with its password can come from the
    environment, e.g. `logs = ["$CHAT_DB_URL"]`); a PostgreSQL URL as is, a path resolved."""
    value = os.path.expandvars(value)
    return value if db.is_url(value) else _resolve(Path(value), root)


def parse_config(data: Mapping[str, Any], *, source: Path | None = None, root: Path | None = None) -> TrainerConfig:
    """Build a `TrainerConfig` from parsed TOML. Relative paths resolve against `root`
    (the directory holding the file). Raises one `ConfigError` listing every problem."""
    problems: list[str] = []
    where = str(source) if source else "<config>"
    root = root if root is not None else Path(".")
    top: dict[str, Any] = {}
    adapters_table: Any = {}
    for key, value in data.items():
        if key == "adapters":
            adapters_table = value
        elif key in _TOP_KEYS:
            converted = _coerce_field(TrainerConfig, key, value, f"{where}: {key}", problems)
            if converted is not None:
                top[key] = converted
        else:
            problems.append(f"{where}: unknown top-level key {key!r} (known: adapters, {', '.join(sorted(_TOP_KEYS))})")
    adapters: list[AdapterConfig] = []
    if not isinstance(adapters_table, dict):
        problems.append(f"{where}: [adapters] must be a table of [adapters.NAME] sections")
        adapters_table = {}
    for name, table in adapters_table.items():
        adapters.append(_parse_adapter(name, table, f"{where}: [adapters.{name}]", root, problems))

    for key in ("base_model", "adapters_dir", "cache_dir", "lock_file"):
        if isinstance(top.get(key), Path):
            top[key] = _resolve(top[key], root)
    if isinstance(top.get("runs_db"), str):
        top["runs_db"] = _log_target(top["runs_db"], root)
    if "logs" in top:
        top["logs"] = tuple(str(_log_target(p, root)) for p in top["logs"])
    cfg = TrainerConfig(**top, adapters=tuple(adapters), source_file=source)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _parse_adapter(name: str, table: Any, where: str, root: Path, problems: list[str]) -> AdapterConfig:
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        return AdapterConfig(name=name)
    source_values: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    keep = 5
    for key, value in table.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{where}.{key}: must be a table")
                continue
            sections[key] = _build(_SECTIONS[key], value, f"{where}.{key}", problems)
        elif key == "source":
            if not isinstance(value, dict):
                problems.append(f"{where}.source: must be a table")
                continue
            source_values.update(value)
        elif key == "keep":
            if _expect(value, int, f"{where}.keep", problems):
                keep = value
        elif key in _SOURCE_KEYS:
            source_values[key] = value
        else:
            known = sorted(_SOURCE_KEYS | set(_SECTIONS) | {"keep", "source"})
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
    source = _build(SourceConfig, source_values, where, problems)
    source = dataclasses.replace(source, jsonl=tuple(_resolve(p, root) for p in source.jsonl))
    gate = sections.get("gate")
    if isinstance(gate, GateSettings):
        scorer = gate.scorer
        if scorer and ":" in scorer and scorer.split(":", 1)[0].endswith(".py"):
            file, func = scorer.rsplit(":", 1)
            scorer = f"{_resolve(Path(file), root)}:{func}"
        sections["gate"] = dataclasses.replace(
            gate, scorer=scorer, score_file=_resolve(gate.score_file, root) if gate.score_file else None
        )
    return AdapterConfig(name=name, source=source, keep=keep, **sections)


def validate(cfg: TrainerConfig) -> list[str]:
    """Semantic checks that hold for any config, however it was built."""
    problems: list[str] = []
    where = str(cfg.source_file) if cfg.source_file else "<config>"
    if cfg.threads < 1:
        problems.append(f"{where}: threads must be >= 1, got {cfg.threads}")
    if cfg.n_gpu_layers < 0:
        problems.append(f"{where}: n_gpu_layers must be >= 0, got {cfg.n_gpu_layers}")
    names = [a.name for a in cfg.adapters]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}: adapter {dup!r} configured twice")
    for a in cfg.adapters:
        w = f"{where}: [adapters.{a.name}]"
        try:
            validate_name(a.name)
        except ValueError as exc:
            problems.append(f"{w}: {exc}")
        t = a.train
        if t.n_ctx < 256 or t.n_ctx % 256:
            problems.append(f"{w}.train.n_ctx must be a positive multiple of 256, got {t.n_ctx}")
        if t.schedule not in SCHEDULES:
            problems.append(f"{w}.train.schedule must be one of {', '.join(SCHEDULES)}, got {t.schedule!r}")
        if t.epochs < 1:
            problems.append(f"{w}.train.epochs must be >= 1, got {t.epochs}")
        if not t.lr > 0:
            problems.append(f"{w}.train.lr must be > 0, got {t.lr}")
        if t.optimizer not in OPTIMIZERS:
            problems.append(f"{w}.train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {t.optimizer!r}")
        if not 0.0 < t.val_fraction < 1.0:
            problems.append(f"{w}.train.val_fraction must be between 0 and 1, got {t.val_fraction}")
        if not t.targets:
            problems.append(f"{w}.train.targets must name at least one tensor kind")
        if t.method not in METHODS:
            problems.append(f"{w}.train.method must be one of {', '.join(METHODS)}, got {t.method!r}")
        if t.rank < 1:
            problems.append(f"{w}.train.rank must be >= 1, got {t.rank}")
        if not t.alpha > 0:
            problems.append(f"{w}.train.alpha must be > 0, got {t.alpha}")
        if t.windows not in WINDOWS:
            problems.append(f"{w}.train.windows must be one of {', '.join(WINDOWS)}, got {t.windows!r}")
        if t.checkpoint_every < 0 or t.warmup_steps < 0 or t.top_layers < 0:
            problems.append(f"{w}.train: checkpoint_every, warmup_steps and top_layers must be >= 0")
        g = a.gate
        if not 0.0 <= g.min_score <= 1.0:
            problems.append(f"{w}.gate.min_score must be in [0, 1], got {g.min_score}")
        if g.min_score > 0 and not g.scorer:
            problems.append(f"{w}.gate.min_score needs gate.scorer (what scores the answers?)")
        if g.scorer and ":" not in g.scorer:
            problems.append(f"{w}.gate.scorer must be 'file.py:function' or 'module:function', got {g.scorer!r}")
        if g.score_file is not None and not Path(g.score_file).exists():
            problems.append(f"{w}.gate.score_file {g.score_file} does not exist")
        e = a.extract
        if not 0.0 < e.fidelity <= 1.0:
            problems.append(f"{w}.extract.fidelity must be in (0, 1], got {e.fidelity}")
        if e.min_rank < 1 or e.max_rank < e.min_rank:
            problems.append(f"{w}.extract: need 1 <= min_rank <= max_rank, got {e.min_rank}..{e.max_rank}")
        if e.rank is not None and e.rank < 1:
            problems.append(f"{w}.extract.rank must be >= 1, got {e.rank}")
        if a.gate.mode not in GATE_MODES:
            problems.append(f"{w}.gate.mode must be one of {', '.join(GATE_MODES)}, got {a.gate.mode!r}")
        for cap in ("max_items", "max_val_items"):
            value = getattr(t, cap)
            if value is not None and value < 1:
                problems.append(f"{w}.train.{cap} must be >= 1, got {value}")
        if a.keep < 1:
            problems.append(f"{w}.keep must be >= 1, got {a.keep}")
        if a.gate.min_items < 1:
            problems.append(f"{w}.gate.min_items must be >= 1, got {a.gate.min_items}")
        if a.source.min_rating not in (-1, 0, 1):
            problems.append(f"{w}.min_rating must be -1, 0 or 1, got {a.source.min_rating}")
    return problems


def load_config(path: Path) -> TrainerConfig:
    """Read `trainer.toml`. Relative paths in it resolve against the file's directory."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from exc
    return parse_config(data, source=path, root=path.resolve().parent)


def with_overrides(cfg: TrainerConfig, **overrides: Any) -> TrainerConfig:
    """Apply CLI values (None means "not given") on top of a loaded config.

    Top-level keys (`base_model`, `logs`, `adapters_dir`, `cache_dir`, `runs_db`, `threads`,
    `n_gpu_layers`, `snapshot`) replace the file's; `adapter_overrides` maps section name ("train", "extract",
    "gate", "source") to field values applied to every adapter.
    """
    adapter_overrides: Mapping[str, Mapping[str, Any]] = overrides.pop("adapter_overrides", None) or {}
    top = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(top) - _TOP_KEYS
    if unknown:
        raise ConfigError([f"unknown override(s): {', '.join(sorted(unknown))}"])
    cfg = dataclasses.replace(cfg, **top)
    new_adapters = []
    for a in cfg.adapters:
        for section, values in adapter_overrides.items():
            values = {k: v for k, v in values.items() if v is not None}
            if not values:
                continue
            if section == "keep":
                continue
            a = dataclasses.replace(a, **{section: dataclasses.replace(getattr(a, section), **values)})
        if adapter_overrides.get("keep", {}).get("keep") is not None:
            a = dataclasses.replace(a, keep=adapter_overrides["keep"]["keep"])
        new_adapters.append(a)
    cfg = dataclasses.replace(cfg, adapters=tuple(new_adapters))
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg
