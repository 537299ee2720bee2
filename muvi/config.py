"""Dataclass configs that serialise to and from JSON.

Every model takes its own config dataclass; configs travel with the weights as JSON
(``config.json`` beside one safetensors file per component).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, ClassVar, Optional, Type, TypeVar

from muvi.errors import MuviError

C = TypeVar("C", bound="Config")

#: the release folder layout muvi reads and writes (2: a folder of muvi.hub components + config.json).
RELEASE_FORMAT = 2


class ConfigError(MuviError, ValueError):
    """A config that cannot be built: unknown fields or values of the wrong kind."""


@dataclasses.dataclass
class Config:
    """Base class: ``to_dict``/``from_dict`` with strict field checking, and presets."""

    #: name -> dict of field values; subclasses fill this in.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: Type[C], data: dict, *, source: str = "config") -> C:
        """Strict: an unknown field is an error. A nested config field (see :func:`nested_configs`)
        takes a dict of its own fields; the ones it leaves out keep the field's default, so a
        recipe's ``{"optim": {"lr": 1e-3}}`` changes the rate and keeps the recipe's betas."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown {cls.__name__} field(s) {unknown}; "
                              f"known fields are {sorted(names)}")
        nested = nested_configs(cls)
        kwargs = {}
        for key, value in data.items():
            if key in nested and isinstance(value, dict):
                default = _default(names[key])
                base = default.to_dict() if isinstance(default, Config) else {}
                value = nested[key].from_dict({**base, **value}, source=f"{source}, field {key!r}")
            # JSON has no tuples: restore them (one level of nesting) where the default is one.
            elif isinstance(names[key].default, tuple) and isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ConfigError(f"{source}: cannot build {cls.__name__}: {err}") from None

    @classmethod
    def preset(cls: Type[C], name: str, **overrides: Any) -> C:
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown {cls.__name__} preset {name!r}; "
                              f"choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls: Type[C], path: str | Path) -> C:
        return cls.from_dict(read_json(path), source=str(path))


def read_json(path: str | Path) -> dict:
    """A JSON object from a file; one-line errors naming the file (missing, not JSON, not an object)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def nested_configs(cls: type) -> dict[str, Type[Config]]:
    """The fields of dataclass ``cls`` that hold a :class:`Config` of their own: ``{name: class}``.

    Read from the annotation, or, where it cannot be resolved (a class defined inside a
    function), from the type of the field's default.
    """
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 (an annotation naming something out of scope)
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name, f.type)
        if not (isinstance(kind, type) and issubclass(kind, Config)):
            kind = type(_default(f))
        if issubclass(kind, Config):
            out[f.name] = kind
    return out


def _default(f: dataclasses.Field) -> Optional[Any]:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default
