"""Building a :class:`~shared_model.config.PerspectiveConfig`: preset, YAML file, overrides.

Every result is checked by :func:`shared_model.config_validation.validate`; unknown fields
and values of the wrong type raise :class:`~shared_model.config.ConfigError` naming them.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from shared_model.config import PRESETS, ConfigError, PerspectiveConfig
from shared_model.config_validation import validate
from shared_model.files import write_text_atomic


def _coerce(path: str, current: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the type of the field's current value."""
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} = {value!r} is invalid: allowed true/false")
    try:
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            items = yaml.safe_load(value) if isinstance(value, str) else value
            return tuple(float(v) for v in items)
        if isinstance(current, str):
            return str(value)
    except (TypeError, ValueError) as exc:
        kind = type(current).__name__
        raise ConfigError(f"{path} = {value!r} is invalid: allowed a value of type {kind}") from exc
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"unknown config field {path!r}: allowed {', '.join(prefix + k for k in known)}"
            )
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a mapping of its fields, got {value!r}")
            changes[key] = _apply(current, value, f"{path}.")
        else:
            changes[key] = _coerce(path, current, value)
    return replace(obj, **changes)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["model.d_model=128", "train.steps=10"]`` into a nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(
    preset: str = "tiny",
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> PerspectiveConfig:
    """Build a validated config from a preset, an optional YAML file and overrides.

    Args:
        preset: one of ``PRESETS`` (``tiny``, ``small``, ``full``); a YAML file may name
            its own base preset with a top-level ``preset:`` key.
        path: optional YAML file with a nested mapping of fields to change.
        overrides: ``section.field=value`` strings or a nested dict, applied last.

    Raises:
        ConfigError: unknown preset, unreadable file, unknown field or invalid value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
        preset = data.pop("preset", preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: allowed {', '.join(PRESETS)}")
    cfg = _apply(PRESETS[preset], data)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        cfg = _apply(cfg, extra)
    return validate(cfg)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at top level")
    return data


def save_config(cfg: PerspectiveConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (atomically: temp file then rename)."""
    write_text_atomic(path, yaml.safe_dump({"preset": cfg.name, **cfg.to_dict()}, sort_keys=False))


def config_from_dict(data: dict[str, Any]) -> PerspectiveConfig:
    """Rebuild a config from :meth:`PerspectiveConfig.to_dict` output (e.g. a checkpoint)."""
    data = dict(data)
    preset = data.pop("preset", data.get("name", "tiny"))
    base = PRESETS.get(preset, PRESETS["tiny"])
    return validate(_apply(base, data))
