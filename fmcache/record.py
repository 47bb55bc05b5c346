"""Record framing with checksums: the byte layout of every LMDB value fmcache writes.

A record bundles named parts (a layer's tiers and variants for one sample, or one blob
such as the manifest)::

    b"FMR2" | u32 crc | u16 n_parts | n_parts x (u16 name_len | name utf-8 | u32 len) | payloads

All integers little-endian. The checksum covers every byte after the crc field, so any
flipped or truncated byte is detected before a codec sees the payload. ``FMR2`` records
(format version 2) carry CRC-32C (Castagnoli, hardware-accelerated); ``FMR1`` records
(format version 1) carry zlib's CRC-32, several times slower, and are still read.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

from crc32c import crc32c

from .errors import CorruptionError

MAGIC = b"FMR2"
#: format version 1's records: the same layout with zlib's CRC-32
MAGIC_V1 = b"FMR1"
_HEAD = struct.Struct("<4sIH")
_NAME = struct.Struct("<H")
_LEN = struct.Struct("<I")


def pack_record(parts: Mapping[str, bytes | bytearray | memoryview]) -> bytes:
    """Frame named payloads into one checksummed record."""
    index = []
    for name, payload in parts.items():
        raw = name.encode()
        index.append(_NAME.pack(len(raw)) + raw + _LEN.pack(len(payload)))
    body = _NAME.pack(len(parts)) + b"".join(index) + b"".join(bytes(p) if not isinstance(p, bytes) else p
                                                                for p in parts.values())
    return MAGIC + struct.pack("<I", crc32c(body)) + body


def unpack_record(buf: bytes | memoryview, where: str) -> dict[str, memoryview]:
    """Named payloads (zero-copy views) of a record; CorruptionError naming ``where``."""
    view = memoryview(buf)
    if len(view) < _HEAD.size:
        raise CorruptionError(f"{where}: record of {len(view)} bytes is shorter than its header")
    magic, crc, count = _HEAD.unpack_from(view, 0)
    if magic == MAGIC:
        checksum = crc32c(view[8:])
    elif magic == MAGIC_V1:
        checksum = zlib.crc32(view[8:])
    else:
        raise CorruptionError(f"{where}: bad record magic {bytes(magic)!r}")
    if checksum != crc:
        raise CorruptionError(f"{where}: checksum mismatch (the record was damaged on disk)")
    offset = _HEAD.size
    names: list[tuple[str, int]] = []
    try:
        for _ in range(count):
            (name_len,) = _NAME.unpack_from(view, offset)
            offset += _NAME.size
            name = bytes(view[offset:offset + name_len]).decode()
            offset += name_len
            (length,) = _LEN.unpack_from(view, offset)
            offset += _LEN.size
            names.append((name, length))
    except (struct.error, UnicodeDecodeError) as exc:
        raise CorruptionError(f"{where}: malformed record index ({exc})") from None
    parts: dict[str, memoryview] = {}
    for name, length in names:
        if offset + length > len(view):
            raise CorruptionError(f"{where}: part {name!r} runs past the end of the record")
        parts[name] = view[offset:offset + length]
        offset += length
    if offset != len(view):
        raise CorruptionError(f"{where}: {len(view) - offset} trailing bytes after the last part")
    return parts


def pack_blob(data: bytes) -> bytes:
    """A single checksummed payload (manifest, labels, progress)."""
    return pack_record({"": data})


def unpack_blob(buf: bytes | memoryview, where: str) -> memoryview:
    parts = unpack_record(buf, where)
    if list(parts) != [""]:
        raise CorruptionError(f"{where}: expected a single-part blob, found parts {sorted(parts)}")
    return parts[""]
