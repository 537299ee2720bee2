"""Dataclass configs that serialise to and from JSON.

Every model takes its own config dataclass; configs travel with the weights as JSON
(``config.json`` beside one safetensors file per component).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Type, TypeVar

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
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: Type[C], data: dict, *, source: str = "config") -> C:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown {cls.__name__} field(s) {unknown}; "
                              f"known fields are {sorted(names)}")
        kwargs = {}
        for key, value in data.items():
            # JSON has no tuples: restore them (one level of nesting) where the default is one.
            if isinstance(names[key].default, tuple) and isinstance(value, list):
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
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))
