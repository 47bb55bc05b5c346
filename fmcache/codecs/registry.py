"""The codec registry: stable id -> class, and the spec grammar of the CLI.

Spec grammar: ``id[:key=value[,key=value]]``; values that parse as int or float become
numbers, ``true``/``false`` booleans, the rest strings. Examples: ``raw``, ``bf16``,
``blosc2:cname=zstd,clevel=1,shuffle=byte``, ``zfp:accuracy=0.01``, ``sz3:abs=1e-3``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import CodecSpecError, UnknownCodecError
from .base import Codec

_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Register a codec class under its ``codec_id`` (usable as a decorator)."""
    codec_id = getattr(cls, "codec_id", None)
    if not isinstance(codec_id, str) or not codec_id:
        raise CodecSpecError(f"{cls.__name__} has no codec_id")
    existing = _REGISTRY.get(codec_id)
    if existing is not None and existing is not cls:
        raise CodecSpecError(f"codec id {codec_id!r} is already registered by {existing.__name__}")
    _REGISTRY[codec_id] = cls
    return cls


def registered_codecs() -> dict[str, type[Codec]]:
    """A copy of the registry, id -> class, sorted by id."""
    return dict(sorted(_REGISTRY.items()))


def _lookup(codec_id: str) -> type[Codec]:
    try:
        return _REGISTRY[codec_id]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownCodecError(f"unknown codec id {codec_id!r} (registered: {known})") from None


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> dict[str, Any]:
    """Config dict from a spec string, without building the codec."""
    if not isinstance(spec, str) or not spec.strip():
        raise CodecSpecError(f"empty codec spec {spec!r}")
    codec_id, _, rest = spec.strip().partition(":")
    if not codec_id or any(ch in codec_id for ch in "=, "):
        raise CodecSpecError(f"malformed codec spec {spec!r}: it must start with a codec id")
    config: dict[str, Any] = {"id": codec_id}
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key or not value:
                raise CodecSpecError(f"malformed codec spec {spec!r}: {item!r} is not key=value")
            if key in config:
                raise CodecSpecError(f"malformed codec spec {spec!r}: {key!r} given twice")
            config[key] = _parse_value(value)
    return config


def codec_from_config(config: Mapping[str, Any] | str) -> Codec:
    """Build a codec from its JSON config (a dict with ``"id"``, or its JSON text)."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise CodecSpecError(f"codec config is not JSON: {exc}") from None
    if not isinstance(config, Mapping) or "id" not in config:
        raise CodecSpecError(f"codec config must be an object with an 'id', got {config!r}")
    return _lookup(str(config["id"])).from_config(config)


def codec_from_spec(spec: str | Codec) -> Codec:
    """Build a codec from a spec string such as ``'zfp:accuracy=0.01'``."""
    if isinstance(spec, Codec):
        return spec
    return codec_from_config(parse_spec(spec))
