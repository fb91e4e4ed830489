"""Typed job configs: a dataclass, optionally filled from YAML, then overridden by flags.

Every job (`jobs.extract`, `student.train`, `lma.finetune`, ...) declares one flat
dataclass. `parse_config` builds an argparse parser from its fields, so that

    python -m jobs.extract --config big.yaml --clip-frames 8 --fps 1-4

reads defaults from the dataclass, then the YAML file, then the flags, in that order.
Field `clip_frames` is flag `--clip-frames`; a field's `metadata={"help": ...}` is its help
text; `metadata={"flag": "fps"}` renames the flag. Unknown YAML keys are an error, so a
typo never silently falls back to a default.

Every value is checked before a job touches its output: bounds declared on the field
(`metadata={"min": 1}`, `"max"`, `"choices"`, `"bytes": True` for sizes such as "512MB"), then
the dataclass's own `check()` for rules across fields. A bad value, or a YAML file that is
missing, unparsable or not a mapping, is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or flag that does not fit the job's config dataclass."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str = "value") -> Any:
    """Convert a YAML value or a flag string to the annotated type."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional or value is None:
            return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float, str):
            return tp(value)
        if origin in (tuple, list):
            args = typing.get_args(tp)
            if isinstance(value, str):
                # "1-4" and "1,4" both mean a pair of numbers; a leading '-' is a sign, not a separator,
                # and a name such as "compile-fp8" keeps its dash.
                numeric = all(a in (int, float) for a in args if a is not Ellipsis)
                dash = numeric and value.count("-") == 1 and not value.startswith("-") and "," not in value
                value = [v.strip() for v in value.split("-" if dash else ",") if v.strip()]
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ValueError(f"expected {len(args)} items, got {len(value)}")
                return tuple(coerce(v, a, name) for v, a in zip(value, args))
            inner = args[0] if args else str
            items = [coerce(v, inner, name) for v in value]
            return tuple(items) if origin is tuple else items
        if origin is dict or tp is dict:
            return dict(value)
        if tp is Any:
            return value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: cannot read {value!r} as {tp}: {e}") from None
    raise ConfigError(f"{name}: unsupported config type {tp}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def parse_bytes(text: str | int) -> int:
    """'512MB', '1GiB', '4096' -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9,
             "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(float(s))


def _field_problems(name: str, value: Any, meta: typing.Mapping) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (tuple, list)):
        return [p for v in value for p in _field_problems(name, v, meta)]
    flag = _flag_name(name, meta)
    if meta.get("bytes"):
        try:
            value = parse_bytes(value)
        except ValueError:
            return [f"{flag}: {value!r} is not a size (e.g. 512MB, 1GiB, 4096)"]
    if "choices" in meta and value not in meta["choices"]:
        return [f"{flag}: {value!r} is not one of {', '.join(map(str, meta['choices']))}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            return [f"{flag}: {value} is not a finite number"]
        if "min" in meta and value < meta["min"]:
            return [f"{flag}: {value} is below its minimum {meta['min']}"]
        if "max" in meta and value > meta["max"]:
            return [f"{flag}: {value} is above its maximum {meta['max']}"]
    return []


def check_config(cfg: Any) -> None:
    """Raise ConfigError naming every field outside its declared bounds, then run `cfg.check()`."""
    problems = [p for name, f in _fields(type(cfg)).items() for p in _field_problems(name, getattr(cfg, name), f.metadata)]
    if problems:
        raise ConfigError("; ".join(problems))
    if hasattr(cfg, "check"):
        cfg.check()


def config_from_dict(cls: type[C], data: dict[str, Any], base: C | None = None) -> C:
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)} (known: {', '.join(fields)})")
    values = dataclasses.asdict(base) if base is not None else {}
    for k, v in data.items():
        values[k] = coerce(v, fields[k].type, k)
    obj = cls(**values) if base is None else dataclasses.replace(base, **{k: values[k] for k in data})
    check_config(obj)
    return obj


def load_yaml(cls: type[C], path: str | Path) -> C:
    return config_from_dict(cls, _read_yaml(cls, path))


def _read_yaml(cls: type, path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    return data


def _flag_name(name: str, meta: typing.Mapping) -> str:
    return "--" + meta.get("flag", name.replace("_", "-"))


def _flag(f: dataclasses.Field) -> str:
    return _flag_name(f.name, f.metadata)


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    # no abbreviations: a typo that is a prefix of a flag (--max-failure) must not pass as that flag
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with config fields; flags override it")
    for f in _fields(cls).values():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = f.metadata.get("help", "")
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        suffix = "(required)" if required else f"(default: {shown})"
        tp, _ = _unwrap_optional(f.type)
        if tp is bool:
            parser.add_argument(_flag(f), dest=f.name, nargs="?", const="true", default=argparse.SUPPRESS,
                                help=f"{help_text} {suffix}")
            parser.add_argument("--no-" + _flag(f)[2:], dest=f.name, action="store_const", const="false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(_flag(f), dest=f.name, default=argparse.SUPPRESS,
                                help=f"{help_text} {suffix}")
    return parser


def parse_config(cls: type[C], argv: Sequence[str] | None = None, description: str | None = None) -> C:
    """Defaults < YAML (`--config`) < flags. Required fields (no default) must come from one of them.
    A bad config exits with status 2 and one line on stderr, before the job does anything."""
    parser = build_parser(cls, description)
    ns = vars(parser.parse_args(argv))
    path = ns.pop("config", None)
    try:
        data = _read_yaml(cls, path) if path else {}
        data.update(ns)
        missing = [f.name for f in _fields(cls).values()
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in data]
        if missing:
            raise ConfigError("missing required: " + ", ".join(_flag(_fields(cls)[m]) for m in missing))
        return config_from_dict(cls, data)
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-safe dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object or config dataclass."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def log_to_stderr() -> None:
    """The jobs' one log format (timestamps, so Ray job logs and local runs line up)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
