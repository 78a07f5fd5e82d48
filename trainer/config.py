"""Typed trainer configuration: one file (`trainer.toml`), CLI > file > defaults.

This module owns the shape of the trainer's configuration and nothing else. Every section is a
pydantic dataclass (pydantic is what the server's settings use too): the types are checked by
pydantic when a section is built, strictly (no `"2"` for an int, no `true` for a number), and the
checks across fields live in one place per section (`TrainSettings.problems`, `validate`).
`load_config` reads a TOML file and reports *every* problem it finds in one `ConfigError` (each
naming the file and the key); `with_overrides` applies CLI values on top;
`TrainerConfig.to_dict` is what gets saved beside the output (in the manifest's
`hyperparameters` and the run folder). A training run's own config
(`trainer.finetune.TrainConfig`) is `TrainSettings` plus where the run reads and writes, so a
setting is defined and checked once.

Layout of `trainer.toml` (see `trainer.toml.example` and docs/trainer.md)::

    base_model = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    logs = ["data/conversations*.sqlite3"]      # paths or globs; de-duplicated by request id
    adapters_dir = "adapters"

    [adapters.house-style]
    routes = ["house-style"]
    jsonl = ["examples/fractional-cto/data/conversations.jsonl"]

    [adapters.house-style.train]
    epochs = 1

Over the ~400-line guide on purpose: every section of `trainer.toml` with its documented fields
(the field docstrings are the configuration's reference) and the one loader.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import BeforeValidator, ConfigDict, Strict, ValidationError
from pydantic.dataclasses import dataclass

from adapter_chat import db
from adapter_chat.registry import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS
from adapter_chat.registry import validate_name

OPTIMIZERS = ("sgd", "adamw")  # the names trainer.llama_opt.OPTIMIZERS maps to ggml's enum
METHODS = ("lora", "full")
WINDOWS = ("packed", "stream")
SCHEDULES = ("constant", "cosine")
GATE_MODES = ("relative", "absolute")


def _one_or_many(value: Any) -> Any:
    """A TOML string where a list is meant is a list of one (`logs = "x.sqlite3"`)."""
    return [value] if isinstance(value, (str, Path)) else value


# TOML values as typed fields: strict (TOML already has ints, floats, booleans and strings, so a
# "2" or a true where a number is meant is a mistake to report), except that an int is a float.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Strs = Annotated[tuple[Str, ...], BeforeValidator(_one_or_many)]
Paths = Annotated[tuple[Path, ...], BeforeValidator(_one_or_many)]
SECTION = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A configuration file or CLI value is invalid. The message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid trainer configuration:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True, config=SECTION)
class SourceConfig:
    """Which logged exchanges and files become training items for one adapter."""

    routes: Strs = ()
    """Only exchanges whose resolved route is one of these (empty: any route)."""
    adapter_names: Strs = ()
    """Only exchanges served with one of these adapters first (empty: any)."""
    path_kinds: Strs = ()
    """Only these path kinds: `prompt`, `finetuned`, `base` (empty: any)."""
    window_days: Float | None = None
    """Only exchanges created in the last N days (None: everything retained)."""
    since: Float | None = None
    """Absolute lower bound (unix time); combined with `window_days` by taking the later one."""
    until: Float | None = None
    """Absolute upper bound (unix time)."""
    min_rating: Int = 0
    """Drop exchanges whose latest feedback rating is below this (unrated counts as 0)."""
    drop_length_finish: Bool = True
    """Drop replies cut off by max_tokens (`finish_reason = 'length'`) unless corrected."""
    include_system_prompt: Bool = True
    """Render the route's logged system prompt before the messages, as the server did. False
    learns the behaviour without it (distilling a prompt path into a finetuned path)."""
    jsonl: Paths = ()
    """Extra JSONL files (completion, pairs or chat shape), globs allowed."""
    use_logs: Bool = True
    """Read the conversation log(s) at all (False: JSONL files only)."""


@dataclass(frozen=True, config=SECTION)
class TrainSettings:
    """Hyperparameters handed to `trainer.finetune.TrainConfig`."""

    n_ctx: Int = 256
    """Training window in tokens: a multiple of 256 (llama.cpp pads contexts to 256)."""
    epochs: Int = 1
    method: Str = "lora"
    """`lora`: train the adapter's A/B tensors directly, base frozen. `full`: train the target
    matrices in full on an FP32 copy, then extract a LoRA by SVD (see `[extract]`)."""
    rank: Int = 16
    """LoRA rank (method `lora`)."""
    alpha: Float = 32.0
    """LoRA alpha: the update is scaled by alpha / rank (method `lora`)."""
    quantized_base: Bool = False
    """Method `lora`: train over the served quantized base file (True) or its FP32 copy (False:
    faster on CPU, where backward through quantized matrices is 2.3x slower)."""
    top_layers: Int = 0
    """Method `lora`: adapt only the last N blocks (0: all); backward stops below them."""
    frozen_cache: Bool = False
    """Method `lora` with `top_layers`: compute the frozen blocks below once per item and keep
    their output in `cache_dir/frozen/` between runs; a step then runs only the top blocks
    (`trainer.frozen`). Same gradient, up to rounding. Needs the F32 base (`quantized_base = false`)."""
    checkpoint_every: Int = 50
    """Method `lora`: steps between checkpoints; a killed run resumes from the last one. 0: none."""
    warmup_steps: Int = 0
    """Linear learning-rate warm-up over this many steps."""
    windows: Str = "packed"
    """`packed`: items packed whole, one sequence each, loss on assistant tokens only. `stream`:
    the trainer before session 4, kept to benchmark against: every item's tokens concatenated and
    cut into windows across item boundaries, every token a target."""
    unlikelihood: Float = 0.0
    """Weight w of the unlikelihood term against repeated lines (0: off): where an answer's line
    departs from an earlier line of the same answer, the loss adds ``-w * log(1 - p)`` for the
    earlier line's token (Welleck et al. 2019). Method `lora` or `full`, CPU backend."""
    lr: Float = 1e-3
    optimizer: Str = "adamw"
    weight_decay: Float = 0.0
    targets: Strs = DEFAULT_TARGETS
    seed: Int = 0
    schedule: Str = "constant"
    """Learning-rate schedule: `constant` or `cosine` (from `lr` down to `lr_min`)."""
    lr_min: Float = 0.0
    val_fraction: Float = 0.1
    """Share of conversations (by hash) held out for validation."""
    max_items: Int | None = None
    """Cap on training items (the newest are kept); None: no cap."""
    max_val_items: Int | None = 100
    """Cap on validation items (evaluation time grows with them); None: no cap."""

    def problems(self) -> list[str]:
        """What is wrong across these settings (the types pydantic has checked already): one
        message per problem, each starting with its key. The one place [train] is checked: the
        config file's loader and a training run's own config (`TrainConfig`) both call it."""
        out: list[str] = []
        if self.n_ctx < 256 or self.n_ctx % 256:
            out.append(f"n_ctx must be a positive multiple of 256 (llama.cpp pads to 256), got {self.n_ctx}")
        for name, allowed in _TRAIN_CHOICES.items():
            if getattr(self, name) not in allowed:
                out.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name, least in _TRAIN_AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < least:
                out.append(f"{name} must be >= {least}, got {value}")
        if not self.lr > 0:
            out.append(f"lr must be > 0, got {self.lr}")
        if self.unlikelihood > 0 and self.windows != "packed":
            out.append("unlikelihood needs windows = \"packed\" (its targets are found per answer)")
        if self.frozen_cache and (self.method != "lora" or self.top_layers < 1 or self.quantized_base):
            out.append("frozen_cache needs method = \"lora\", top_layers >= 1 and quantized_base = false")
        if not self.alpha > 0:
            out.append(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 < self.val_fraction < 1.0:
            out.append(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not self.targets:
            out.append("targets must name at least one tensor kind, e.g. attn_q")
        return out


_TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS, "windows": WINDOWS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
}  # fmt: skip
_TRAIN_AT_LEAST: dict[str, float] = {
    "epochs": 1, "rank": 1, "max_items": 1, "max_val_items": 1,  # None (no cap) is allowed for the caps
    "checkpoint_every": 0, "warmup_steps": 0, "top_layers": 0, "unlikelihood": 0,
}  # fmt: skip


@dataclass(frozen=True, config=SECTION)
class ExtractSettings:
    """How the trained weights are turned into a LoRA (`trainer.extract.extract_lora`)."""

    fidelity: Float = 0.9
    max_rank: Int = 64
    min_rank: Int = 4
    rank: Int | None = None
    """Fixed rank; None picks the smallest rank keeping `fidelity` of the delta's energy."""


@dataclass(frozen=True, config=SECTION)
class GateSettings:
    """When a new version is good enough to publish."""

    margin: Float = 0.0
    """Required validation-loss improvement over the base model: with `mode = "relative"` a
    fraction (0.02: the adapter's loss must be at least 2% lower), with `"absolute"` in nats.
    0.0: publish when the adapter is no worse than the base (see trainer.evaluate.gate)."""
    mode: Str = "relative"
    min_items: Int = 50
    """Fewer training items than this: the run is `skipped`."""
    min_val_items: Int = 5
    """Fewer validation items than this: the run is `skipped`."""
    max_tokens: Int = 64
    """Tokens generated per sample prompt in the evaluation report (without a `scorer`)."""
    sample_prompts: Int = 3
    """How many validation prompts to generate answers for (shown in the report). With a
    `scorer`, the samples are the first of its answers (`score_max_tokens` long), not generated
    twice."""
    scorer: Str | None = None
    """A task scorer, `file.py:function` (relative to the config file) or `module:function`,
    taking an answer and returning a bool or a number in [0, 1]: greedy answers to held-out
    prompts are scored with it, through the server's engine (e.g.
    `style_check.py:is_house_style`)."""
    min_score: Float = 0.0
    """The adapter's mean score must reach this share to publish (with `scorer`)."""
    score_prompts: Int = 30
    """How many held-out prompts the scorer judges: validation items' prompts, or `score_file`'s."""
    score_file: Path | None = None
    """Held-out prompts for the scorer (JSONL, one `{"messages": [...]}` or `{"prompt": "..."}`
    per line), never trained on. None: the validation items' prompts."""
    score_max_tokens: Int = 200
    """Tokens generated per scored answer."""


@dataclass(frozen=True, config=SECTION)
class AdapterConfig:
    """One adapter the nightly job keeps fresh."""

    name: Str
    source: SourceConfig = field(default_factory=SourceConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    keep: Int = 5
    """Complete versions kept on disk (plus the current one)."""


@dataclass(frozen=True, config=SECTION)
class TrainerConfig:
    """Everything the trainer needs; built once at the entry point and passed down."""

    base_model: Path = Path("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    logs: Strs = ("data/conversations.sqlite3",)
    """Conversation logs: SQLite files (paths or globs) or PostgreSQL URLs (`$VAR` is expanded)."""
    runs_db: Str | Path | None = None
    """Where `trainer_runs` rows go (a SQLite path or a PostgreSQL URL); None: the first log."""
    adapters_dir: Path = Path("adapters")
    cache_dir: Path = Path("data/trainer-cache")
    lock_file: Path | None = None
    """None: `<cache_dir>/nightly.lock`."""
    threads: Int = 2
    n_gpu_layers: Int = 0
    """Model layers offloaded to a GPU in training and evaluation (needs a GPU build)."""
    snapshot: Bool = False
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


# pydantic's error types, as the kind of TOML value a key wants
_KINDS = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
          "path_type": "str (a path)", "tuple_type": "list"}  # fmt: skip


def _problems(exc: ValidationError, where: str, sep: str = ".") -> list[str]:
    """One message per bad key of a pydantic error, named `<where><sep><key>`."""
    out: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = err["loc"]
        key = str(loc[0]) if loc else ""
        if key in seen:  # a union's members each complain: one message per key
            continue
        seen.add(key)
        at = f"{where}{sep}{key}" + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
        kind, value = _KINDS.get(err["type"]), err.get("input")
        if kind is not None:
            out.append(f"{at}: expected {kind}, got {type(value).__name__} {value!r}")
        else:
            out.append(f"{at}: {err['msg']}")
    return out


def _build(cls: type, table: Mapping[str, Any], where: str, problems: list[str], *, sep: str = ".",
           **fixed: Any) -> Any:  # fmt: skip
    """`cls` from a TOML table, pydantic checking the types. Every unknown key and bad value goes
    into `problems` (named `<where><sep><key>`); the object returned keeps the defaults for those."""
    known = {f.name for f in dataclasses.fields(cls)} - {"adapters", "source_file"} - set(fixed)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        else:
            values[key] = value
    try:
        return cls(**values, **fixed)
    except ValidationError as exc:
        problems.extend(_problems(exc, where, sep))
        bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        return cls(**{k: v for k, v in values.items() if k not in bad}, **fixed)


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
            top[key] = value
        else:
            problems.append(f"{where}: unknown top-level key {key!r} (known: adapters, {', '.join(sorted(_TOP_KEYS))})")
    base = _build(TrainerConfig, top, where, problems, sep=": ")
    adapters: list[AdapterConfig] = []
    if not isinstance(adapters_table, dict):
        problems.append(f"{where}: [adapters] must be a table of [adapters.NAME] sections")
        adapters_table = {}
    for name, table in adapters_table.items():
        adapters.append(_parse_adapter(name, table, f"{where}: [adapters.{name}]", root, problems))

    resolved: dict[str, Any] = {}  # the paths the file names, against its folder (defaults as they are)
    for key in ("base_model", "adapters_dir", "cache_dir", "lock_file"):
        if key in top and isinstance(getattr(base, key), Path):
            resolved[key] = _resolve(getattr(base, key), root)
    if "runs_db" in top and isinstance(base.runs_db, str):
        resolved["runs_db"] = _log_target(base.runs_db, root)
    if "logs" in top:
        resolved["logs"] = tuple(str(_log_target(p, root)) for p in base.logs)
    cfg = dataclasses.replace(base, **resolved, adapters=tuple(adapters), source_file=source)
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
    own: dict[str, Any] = {}
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
            own[key] = value
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
    return _build(AdapterConfig, own, where, problems, name=name, source=source, **sections)


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
        problems.extend(f"{w}.train.{p}" for p in a.train.problems())
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
    try:
        return _overridden(cfg, top, adapter_overrides)
    except ValidationError as exc:  # a value of the wrong type
        raise ConfigError(_problems(exc, "override", ": ")) from None


def _overridden(cfg: TrainerConfig, top: dict[str, Any], adapter_overrides: Mapping[str, Mapping[str, Any]]) -> TrainerConfig:
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
