"""Typed training config: built once from YAML + dotted ``key=value`` overrides, validated in one place.

Every problem is collected and reported at once (:class:`ConfigError`), one per line.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """The training config is invalid; the message lists every problem, one per line."""


@dataclass
class ModelConfig:
    base: str = "embedded"               # local HF model directory, "embedded" (the shipped tiny Llama) or
                                         # "embedded:<task>" (the base of an embedded task, e.g. embedded:handoff)
    dtype: str = "float32"               # float32 | bfloat16 | float16: dtype of the frozen base weights
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    share_a: list[str] = field(default_factory=lambda: ["k_proj", "v_proj"])
    init: str = "kaiming"                # kaiming | svd (one-time, shared)
    layers: list[int] | None = None      # decoder-layer indices to adapt (negative: from the end); null: all


@dataclass
class DataConfig:
    train: str = "embedded"              # JSONL path, or "embedded[:<task>]" (generate the toy agent task, or the
                                         # named embedded task, into the run dir)
    eval: str | None = "embedded"        # JSONL path, "embedded[:<task>]", or null (no held-out evaluation)
    roles: list[str] | None = None       # null: the roles found in the training data, in order of appearance
    max_length: int = 256
    embedded_train_size: int = 500       # embedded task: training records per role
    embedded_eval_size: int = 100        # embedded task: held-out records per role


@dataclass
class TrainConfig:
    scheme: str = "joint"                # joint | sequential
    anchor_role: str | None = None       # sequential: trained first (default: the first role)
    anchor_fraction: float = 0.34        # sequential: share of max_steps spent on the anchor role
    max_steps: int = 100
    batch_size: int = 8                  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 2e-3
    loraplus_ratio: float = 1.0          # LoRA+: lr of B = lr * ratio
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"           # constant | linear | cosine
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"          # no | fp16 | bf16 (passed to accelerate)
    seed: int = 0
    log_every: int = 10
    save_every: int = 0                  # 0: only at the end
    eval_max_examples: int = 300         # per role
    eval_batch_size: int = 32


@dataclass
class WandbConfig:
    mode: str = "disabled"               # disabled | offline | online
    project: str = "lragent"
    name: str | None = None


@dataclass
class Config:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, typ: Any, key: str, errors: list[str]) -> Any:
    origin, args = get_origin(typ), get_args(typ)
    if value is None:
        if type(None) in args or typ is Any:
            return None
        errors.append(f"{key}: must not be null")
        return None
    if origin is list:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value) if v]
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return value
        return [_coerce(v, args[0], key, errors) for v in value]
    if args and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        if isinstance(value, str) and value.lower() in ("null", "none"):
            return None
        return _coerce(value, inner, key, errors)
    try:
        if isinstance(value, (dict, list, tuple, set)):
            raise TypeError
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError
        if typ in (int, float) and isinstance(value, bool):
            raise TypeError
        if typ is str and isinstance(value, bool):
            raise TypeError
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError, OverflowError):
        errors.append(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")
        return value


def _fill(obj: Any, data: dict, prefix: str, errors: list[str]) -> None:
    hints = get_type_hints(type(obj))
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            errors.append(f"{name}: unknown key (valid: {', '.join(hints)})")
            continue
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                errors.append(f"{name}: expected a mapping")
                continue
            _fill(cur, value, f"{name}.", errors)
        else:
            setattr(obj, key, _coerce(value, hints[key], name, errors))


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", ...]`` -> ``{"a": {"b": 1}}`` (values parsed as YAML scalars); ConfigError for a malformed item."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: the key {key!r} is not a dotted name like train.lr")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file and ``a.b=value`` overrides; raises ConfigError listing every problem."""
    cfg, errors = Config(), []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p} is not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p} ({e.strerror})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        _fill(cfg, data, "", errors)
    _fill(cfg, parse_overrides(overrides or []), "", errors)
    errors += validate(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


EMBEDDED = "embedded"
TASK_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def embedded_task(value: str | None) -> tuple[bool, str | None]:
    """(whether ``value`` names the embedded default, its task): ``"embedded"`` -> (True, None) (the provider's
    default task), ``"embedded:<task>"`` -> (True, task), anything else (a path, None) -> (False, None)."""
    if value == EMBEDDED:
        return True, None
    if isinstance(value, str) and value.startswith(EMBEDDED + ":"):
        return True, value[len(EMBEDDED) + 1:]
    return False, None


def resolve_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    """The sorted decoder-layer indices that ``lora.layers`` selects in a model of ``n_layers`` layers (None: all;
    negative indices count from the end). ValueError (one line) for an index out of range or two indices naming
    the same layer."""
    if layers is None:
        return list(range(n_layers))
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"lora.layers: {bad} out of range for a model with {n_layers} decoder layers "
                         f"(valid: {-n_layers}..{n_layers - 1})")
    seen: dict[int, int] = {}
    for i in layers:
        j = i % n_layers
        if j in seen:
            raise ValueError(f"lora.layers: {seen[j]} and {i} are the same decoder layer of a {n_layers}-layer model")
        seen[j] = i
    return sorted(seen)


def validate(cfg: Config) -> list[str]:
    """Every problem of a filled config, one message each (empty: valid). Checks choices, ranges (positive sizes,
    finite rates, a 32-bit seed), role names, that share_a / anchor_role refer to what exists, that lora.layers has no
    duplicate index and that ``embedded:<task>`` names a task. (lora.layers is checked against the base model's layer
    count in ``preflight.check_base_model``.)"""
    e = []
    t, lo, d = cfg.train, cfg.lora, cfg.data

    def choice(name, value, allowed):
        if value not in allowed:
            e.append(f"{name}: {value!r} is not one of {list(allowed)}")

    def num(name, v, lo_=None, hi=None, lo_open=False, hi_open=False):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return                                   # a type error was already reported by _coerce
        if not math.isfinite(v):
            e.append(f"{name}: must be a finite number, got {v}")
        elif lo_ is not None and (v <= lo_ if lo_open else v < lo_):
            e.append(f"{name}: must be {'>' if lo_open else '>='} {lo_}, got {v}")
        elif hi is not None and (v >= hi if hi_open else v > hi):
            e.append(f"{name}: must be {'<' if hi_open else '<='} {hi}, got {v}")

    choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    choice("lora.init", lo.init, ("kaiming", "svd"))
    choice("train.scheme", t.scheme, ("joint", "sequential"))
    choice("train.schedule", t.schedule, ("constant", "linear", "cosine"))
    choice("train.mixed_precision", t.mixed_precision, ("no", "fp16", "bf16"))
    choice("wandb.mode", cfg.wandb.mode, ("disabled", "offline", "online"))
    for name, v in (("lora.rank", lo.rank), ("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size),
                    ("train.grad_accum", t.grad_accum), ("data.max_length", d.max_length),
                    ("train.log_every", t.log_every), ("train.eval_batch_size", t.eval_batch_size),
                    ("data.embedded_train_size", d.embedded_train_size),
                    ("data.embedded_eval_size", d.embedded_eval_size)):
        num(name, v, 1)
    for name, v in (("train.save_every", t.save_every), ("train.warmup_steps", t.warmup_steps),
                    ("train.eval_max_examples", t.eval_max_examples), ("train.weight_decay", t.weight_decay),
                    ("train.max_grad_norm", t.max_grad_norm)):
        num(name, v, 0)
    num("train.seed", t.seed, 0, 2 ** 32 - 1)
    num("train.lr", t.lr, 0, lo_open=True)
    num("train.loraplus_ratio", t.loraplus_ratio, 0, lo_open=True)
    num("lora.alpha", lo.alpha, 0, lo_open=True)
    num("lora.dropout", lo.dropout, 0, 1, hi_open=True)
    num("train.anchor_fraction", t.anchor_fraction, 0, 1, lo_open=True, hi_open=True)
    if isinstance(lo.targets, list) and not lo.targets:
        e.append("lora.targets: give at least one module name (e.g. q_proj,v_proj)")
    if isinstance(lo.share_a, list) and isinstance(lo.targets, list):
        bad = [s for s in lo.share_a if s not in lo.targets]
        if bad:
            e.append(f"lora.share_a: {bad} are not in lora.targets {lo.targets}")
    if isinstance(lo.layers, list):
        if not lo.layers:
            e.append("lora.layers: give at least one decoder-layer index (e.g. [-1]), or null for every layer")
        dup = sorted({i for i in lo.layers if isinstance(i, int) and lo.layers.count(i) > 1})
        if dup:
            e.append(f"lora.layers: duplicate indices {dup}")
    for name, v in (("model.base", cfg.model.base), ("data.train", d.train), ("data.eval", d.eval)):
        if isinstance(v, str) and v.startswith(EMBEDDED + ":") and not TASK_RE.match(v[len(EMBEDDED) + 1:]):
            e.append(f"{name}: {v!r} does not name an embedded task (use embedded or embedded:<task>, e.g. "
                     f"embedded:handoff)")
    from lragent.bundle import BundleError, validate_role_name
    roles = d.roles if isinstance(d.roles, list) else None
    for r in roles or []:
        try:
            validate_role_name(r)
        except BundleError as err:
            e.append(f"data.roles: {err}")
    if t.anchor_role is not None:
        try:
            validate_role_name(t.anchor_role)
        except BundleError as err:
            e.append(f"train.anchor_role: {err}")
        else:
            if roles is not None and t.anchor_role not in roles:
                e.append(f"train.anchor_role: {t.anchor_role!r} is not one of data.roles {roles}")
    if not isinstance(cfg.output_dir, str) or not cfg.output_dir.strip():
        e.append("output_dir: give a directory path")
    return e
