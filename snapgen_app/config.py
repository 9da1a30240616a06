"""Typed, frozen configuration dataclasses persisted as JSON.

Every config derives from :class:`ConfigBase`: ``from_dict`` rejects unknown keys and wrong types
with an error naming the field, lists become tuples (so configs stay hashable and frozen), and each
class validates its own consistency in ``validate``. Torch-free: the runtime reads these from
``bundle.json`` and the model code (the torch island) builds networks from them.

Sections: base machinery; UNetConfig (owned with snapgen_app/model/unet.py); autoencoder and text
encoder configs (owned with snapgen_app/model/autoencoder.py and text_encoders.py); SamplerConfig.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

from snapgen_app.errors import ConfigError

C = TypeVar("C", bound="ConfigBase")


def _coerce(field_name: str, hint: Any, value: Any) -> Any:
    """Convert a JSON value to the annotated type, or raise ConfigError naming the field."""
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(field_name, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(field_name, f"{value!r} matches none of the allowed types")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(field_name, f"{value!r} is not allowed", allowed=list(args))
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field_name, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(field_name, args[0], v) for v in value)
        if len(args) != len(value):
            raise ConfigError(field_name, f"expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(field_name, a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(field_name, f"expected an object, got {type(value).__name__}")
        return {str(k): _coerce(field_name, args[1], v) for k, v in value.items()} if args else dict(value)
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(field_name, f"expected an object, got {type(value).__name__}")
        return hint.from_dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(field_name, f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field_name, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field_name, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(field_name, f"expected a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Frozen config with strict JSON round trip and a ``validate`` hook run on construction."""

    format_version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field. Subclasses extend this."""

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any]) -> C:
        """Build from a JSON object; unknown keys and wrong types raise ConfigError."""
        if not isinstance(raw, dict):
            raise ConfigError(cls.__name__, f"expected an object, got {type(raw).__name__}")
        hints = get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ConfigError(f"{cls.__name__}.{unknown[0]}", "unknown field", allowed=sorted(fields))
        kwargs = {name: _coerce(f"{cls.__name__}.{name}", hints[name], value) for name, value in raw.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(cls.__name__, str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(str(path), f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(raw)


def require(condition: bool, field: str, message: str, *, allowed: object | None = None) -> None:
    """Raise ConfigError(field, message) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, message, allowed=allowed)


# --- UNet ------------------------------------------------------------------------------------
# (UNetConfig is defined here by the UNet owner.)


# --- Autoencoder and text encoders ---------------------------------------------------------------
# (DecoderConfig, EncoderConfig, AutoencoderConfig, TextEncoderConfig are defined here by their owner.)


# --- Sampling --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerConfig(ConfigBase):
    """Few-step flow-matching Euler sampling settings (1-50 steps, SD3 timestep shift)."""

    steps: int = 4
    shift: float = 1.0
    guidance_scale: float = 1.0

    def validate(self) -> None:
        require(1 <= self.steps <= 50, "steps", f"{self.steps} is out of range", allowed="1-50")
        require(self.shift > 0, "shift", f"{self.shift} must be positive")
        require(self.guidance_scale >= 0, "guidance_scale", f"{self.guidance_scale} must be >= 0")
