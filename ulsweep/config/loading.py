"""YAML and dicts -> the typed experiment: conversion with located errors, overrides, hashing, dumping."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from ulsweep.config.errors import ConfigError, key_join
from ulsweep.config.schema import ExperimentConfig

_TRUE_WORDS, _FALSE_WORDS = ("on", "yes", "true"), ("off", "no", "false")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:  # its values, not the word "Literal"
        return " or ".join(map(repr, typing.get_args(tp)))
    if tp is bool:
        return "true or false"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(f"expected {' or '.join(_type_name(a) for a in args)}", key=key, value=value)
    if origin is Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 reads on/off/yes/no as booleans: `mps: on` arrives as True. Map it back to the word this
            # Literal spells (so `mps: on` and `mps: "on"` mean the same); a choice without such a word errors.
            spelled = [w for w in (_TRUE_WORDS if value else _FALSE_WORDS) if w in args]
            value = spelled[0] if spelled else value
        if value not in args:
            raise ConfigError(f"must be one of {', '.join(map(repr, args))}", key=key, value=value)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping for section {_type_name(tp)}", key=key, value=value)
        return build(tp, value, prefix=key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError("expected a list", key=key, value=value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"expected a list of {len(args)} items", key=key, value=value)
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError("expected a mapping", key=key, value=value)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError("expected true or false", key=key, value=value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("expected an integer", key=key, value=value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError("expected a number", key=key, value=value)
        try:
            return float(value)
        except OverflowError:
            raise ConfigError("number too large", key=key, value=value) from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError("expected a string", key=key, value=value)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module, not in input


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursively; errors carry the dotted key."""
    if not isinstance(data, Mapping):
        raise ConfigError("expected a mapping", key=prefix or None, value=data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = key_join(prefix, k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key{hint}", key=key)
        kwargs[k] = _convert(hints[k], v, key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.located(prefix) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), the form written to YAML, MLflow and checkpoints."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_hash(cfg: Any) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of a config."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set d['a']['b'] = value for dotted='a.b'; 'base_models.0.x' indexes lists."""
    parts = dotted.split(".")
    node: Any = d
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError("list index out of range", key=".".join(parts[: i + 1]), value=p)
            node = node[int(p)]
            continue
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, (dict, list)):
            raise ConfigError("is not a section", key=".".join(parts[: i + 1]), value=nxt)
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError("list index out of range", key=dotted, value=last)
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """['ae.loss.loss_factor=4', ...] -> {'ae.loss.loss_factor': 4.0, ...} (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("override must look like KEY=VALUE", key="--set", value=item)
        k, v = item.split("=", 1)
        key = k.strip()
        if not key or "" in key.split("."):
            raise ConfigError("override key must be a dotted key such as ae.loss.loss_factor", key="--set",
                              value=item)
        try:
            out[key] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"value is not valid YAML: {_yaml_problem(e)}", key=key_join("", key),
                              value=v) from None
    return out


def _plain(value: Any, key: str) -> Any:
    """Deep copy of YAML data as JSON-like Python (str keys); other types (dates, binary, sets, complex
    keys) are refused with their dotted key."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not (k is None or isinstance(k, (str, bool, int, float))):
                raise ConfigError("keys must be strings", key=key or None, value=k)
            ks = k if isinstance(k, str) else json.dumps(k)
            out[ks] = _plain(v, key_join(key, ks))
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"unsupported value of type {type(value).__name__}; use a string, number, list or mapping",
                      key=key or None, value=value)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: where (line, column; a reader error's position is a character offset), what."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}: "
    elif isinstance(getattr(e, "position", None), int):  # yaml.reader.ReaderError
        where = f"character {e.position + 1}: "
    else:
        where = ""
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
    if isinstance(e, yaml.reader.ReaderError):
        problem = f"unacceptable character {e.character!r}: {e.reason}"
    return where + " ".join(str(problem).split())


def experiment_from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                         file: str | None = None) -> ExperimentConfig:
    try:
        if not isinstance(raw, Mapping):
            raise ConfigError("top level must be a mapping", value=type(raw).__name__)
        data = _plain(raw, "")  # deep copy of plain YAML data
        for k, v in (overrides or {}).items():
            if not isinstance(k, str) or not k or "" in k.split("."):
                raise ConfigError("override key must be a dotted key such as ae.loss.loss_factor", key="--set",
                                  value=k)
            set_dotted(data, k, _plain(v, k))
        return build(ExperimentConfig, data)
    except ConfigError as e:
        raise e.located(file=file) from None


def load_experiment(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read an experiment YAML (safe_load only) into a validated ExperimentConfig."""
    path = str(path)
    try:
        if "://" in path:  # an experiment file in a bucket: s3://..., gs://... (fsspec)
            from ulsweep import io as uio

            text = uio.read_bytes(path).decode()
        else:
            text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=path) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML syntax error: {_yaml_problem(e)}", file=path) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("top level must be a mapping", file=path, value=type(raw).__name__)
    return experiment_from_dict(raw, overrides, file=path)


def check_data(exp: ExperimentConfig, file: str | None = None) -> None:
    """data.path must name a dataset (a builtin, or a directory / URI holding dataset.json): checked when a
    command starts, before Ray or training does (a missing dataset is a config error, not a trial failure)."""
    from ulsweep.data import DataError, open_dataset
    from ulsweep.data.builtin import data_path_problem

    path = exp.data.path
    problem = data_path_problem(path)
    if problem is None and not path.startswith("builtin:"):
        try:  # the manifest: schema, splits, shard list (shards themselves are hashed when read)
            splits = open_dataset(path).splits
            missing = [s for s in (exp.data.train_split, exp.data.eval_split) if s not in splits]
            if missing:
                problem = f"has no split(s) {missing} (splits: {', '.join(splits)})"
        except DataError as e:
            problem = f"invalid dataset: {e}"
    if problem:
        raise ConfigError(problem, key="data.path", value=path, file=file)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
