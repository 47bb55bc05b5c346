"""Codecs: one sample's feature map <-> bytes, with stable ids and JSON configs."""

from .base import Codec, Hdf5Field, channel_axis
from .registry import codec_from_config, codec_from_spec, parse_spec, register_codec, registered_codecs

# Importing the built-in modules registers them.
from . import lossless, cast, quantize, grid, zfp, sz3  # noqa: F401  isort:skip

__all__ = [
    "Codec",
    "Hdf5Field",
    "channel_axis",
    "codec_from_config",
    "codec_from_spec",
    "parse_spec",
    "register_codec",
    "registered_codecs",
]
