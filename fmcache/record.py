"""Record framing with checksums: the byte layout of every LMDB value fmcache writes.

A record bundles named parts (a layer's tiers and variants for one sample, or one blob
such as the manifest). Format version 3 writes ``FMR3`` records::

    b"FMR3" | u32 crc | u16 n_parts | u16 names_len
            | names: n_parts x (u16 name_len | name utf-8)    (names_len bytes)
            | n_parts x u32 len | payloads

All integers little-endian. The checksum (CRC-32C, hardware-accelerated) covers the
magic and every byte after the crc field, so any flipped or truncated byte is detected
before a codec sees the payload (a flip of ``FMR3`` into ``FMR2`` included: the older
records' checksum leaves the magic out). The names come first and apart from the lengths because every record
of a layer carries the same names: a reader parses each distinct names block once
(cached) and then reads all the lengths with one ``struct`` call, instead of a Python
loop per part (~1-2 us per part here, more than a record's CRC).

Older records are still read: ``FMR2`` (format version 2, CRC-32C) and ``FMR1`` (format
version 1, zlib's CRC-32) share the older layout
``magic | u32 crc | u16 n_parts | n_parts x (u16 name_len | name | u32 len) | payloads``.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Mapping, Sequence

from crc32c import crc32c

from .errors import CorruptionError

MAGIC = b"FMR3"
#: format version 2's records: the older layout with CRC-32C
MAGIC_V2 = b"FMR2"
#: format version 1's records: the older layout with zlib's CRC-32
MAGIC_V1 = b"FMR1"
_HEAD = struct.Struct("<4sIH")
_HEAD3 = struct.Struct("<4sIHH")
_NAME = struct.Struct("<H")
_LEN = struct.Struct("<I")
#: names block -> (names, their positions, the Struct of the lengths); bounded
_MAGIC_CRC = crc32c(MAGIC)
_LAYOUTS: dict[bytes, tuple[tuple[str, ...], dict[str, int], struct.Struct]] = {}
_MAX_LAYOUTS = 4096
#: what a record too short for PartPicker's known index unpacks to: fails its comparison
_NO_FIELDS = (None, None, None)


def pack_record(parts: Mapping[str, bytes | bytearray | memoryview]) -> bytes:
    """Frame named payloads into one checksummed ``FMR3`` record."""
    names = b"".join(_NAME.pack(len(raw)) + raw for raw in (name.encode() for name in parts))
    if len(parts) > 0xFFFF or len(names) > 0xFFFF:
        raise ValueError(f"a record holds at most 65535 parts and 64 KiB of names, got {len(parts)} parts")
    lengths = struct.pack(f"<{len(parts)}I", *(len(p) for p in parts.values()))
    body = struct.pack("<HH", len(parts), len(names)) + names + lengths + b"".join(
        bytes(p) if not isinstance(p, bytes) else p for p in parts.values())
    return MAGIC + struct.pack("<I", crc32c(body, _MAGIC_CRC)) + body


def _layout(names: bytes, count: int, where: str) -> tuple[tuple[str, ...], dict[str, int], struct.Struct]:
    """The parsed names block of ``count`` parts (cached: a layer's records share it)."""
    layout = _LAYOUTS.get(names)
    if layout is not None and len(layout[0]) == count:
        return layout
    parsed: list[str] = []
    offset = 0
    try:
        for _ in range(count):
            (size,) = _NAME.unpack_from(names, offset)
            if offset + 2 + size > len(names):
                raise struct.error("a name runs past the names block")
            parsed.append(names[offset + 2:offset + 2 + size].decode())
            offset += 2 + size
    except (struct.error, UnicodeDecodeError) as exc:
        raise CorruptionError(f"{where}: malformed record index ({exc})") from None
    if offset != len(names):
        raise CorruptionError(f"{where}: malformed record index ({len(names) - offset} bytes after the names)")
    if len(set(parsed)) != count:
        raise CorruptionError(f"{where}: malformed record index (repeated part names)")
    layout = (tuple(parsed), {name: k for k, name in enumerate(parsed)}, struct.Struct(f"<{count}I"))
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[names] = layout
    return layout


def _checked_v3(buf: bytes | memoryview, where: str, crc_pass: bool = True
                ) -> tuple[memoryview, tuple[str, ...], dict[str, int], tuple[int, ...], int]:
    """An ``FMR3`` record's view, names, positions, lengths and payload start, all checked
    (the CRC too, unless ``crc_pass`` is false: :func:`record_sizes`)."""
    view = memoryview(buf)
    if len(view) < _HEAD3.size:
        raise CorruptionError(f"{where}: record of {len(view)} bytes is shorter than its header")
    _, crc, count, names_len = _HEAD3.unpack_from(view, 0)
    if crc_pass and crc32c(view[8:], _MAGIC_CRC) != crc:
        raise CorruptionError(f"{where}: checksum mismatch (the record was damaged on disk)")
    start = _HEAD3.size + names_len
    names, position, lengths_of = _layout(bytes(view[_HEAD3.size:start]), count, where)
    try:
        lengths = lengths_of.unpack_from(view, start)
    except struct.error:
        raise CorruptionError(f"{where}: record of {len(view)} bytes is shorter than its index") from None
    start += lengths_of.size
    end = start + sum(lengths)
    if end != len(view):
        what = "trailing bytes after the last part" if end < len(view) else "a part runs past the end of the record"
        raise CorruptionError(f"{where}: {abs(len(view) - end)} {what}")
    return view, names, position, lengths, start


def unpack_record(buf: bytes | memoryview, where: str) -> dict[str, memoryview]:
    """Named payloads (zero-copy views) of a record; CorruptionError naming ``where``."""
    if bytes(buf[:4]) == MAGIC:
        view, names, _, lengths, offset = _checked_v3(buf, where)
        parts: dict[str, memoryview] = {}
        for name, length in zip(names, lengths):
            parts[name] = view[offset:offset + length]
            offset += length
        return parts
    return _unpack_v2(buf, where)


def record_sizes(buf: bytes | memoryview, where: str) -> dict[str, int]:
    """Byte size of each named payload, from the record's index alone: no CRC pass over the
    payloads (accounting, such as the manifest's ``stored_bytes``, not a read; ``verify``
    and every read check the CRC). The index must still add up to the record's length."""
    if bytes(buf[:4]) != MAGIC:
        return {name: len(payload) for name, payload in unpack_record(buf, where).items()}
    _, names, _, lengths, _ = _checked_v3(buf, where, crc_pass=False)
    return dict(zip(names, lengths))


def record_parts(buf: bytes | memoryview, wanted: Sequence[str], where: str) -> list[memoryview | None]:
    """The payloads of the ``wanted`` parts (None where absent), with every check of
    :func:`unpack_record`: the per-sample read path, which needs one or two parts."""
    if bytes(buf[:4]) != MAGIC:
        parts = _unpack_v2(buf, where)
        return [parts.get(name) for name in wanted]
    view, _, position, lengths, start = _checked_v3(buf, where)
    found: list[memoryview | None] = []
    for name in wanted:
        k = position.get(name)
        if k is None:
            found.append(None)
        else:
            offset = start + sum(lengths[:k])
            found.append(view[offset:offset + lengths[k]])
    return found


class PartPicker:
    """:func:`record_parts` of fixed ``wanted`` parts for a stream of records that share
    one names block, as a layer's records do: the LMDB backend's read paths (one picker
    per layer and part for per-sample reads, one of all the layer's parts for batches).

    The first record goes through :func:`record_parts`; the picker remembers its index
    layout (part count, names block, and so the lengths' position). A later record whose
    header, count and names match that layout is read with one ``struct`` call (magic,
    CRC, count, names and every length), the length check and the CRC: exactly
    :func:`record_parts`'s checks, without its layered calls (a few microseconds of a
    read that decodes a small map in ~15, docs/benchmarks.md). Anything else (another
    layout, an older format, damage) goes through :func:`record_parts`, which reads it
    or raises; a record it reads becomes the new layout.
    """

    __slots__ = ("_known", "wanted")

    def __init__(self, wanted: Sequence[str]) -> None:
        self.wanted = tuple(wanted)
        #: (whole-index Struct, the bytes from count to the names' end, payload start,
        #: wanted positions, both of a pair present); the Struct reads magic, CRC, those
        #: bytes as one field and every length: one comparison checks count and names
        self._known: tuple[struct.Struct, bytes, int, tuple[int, ...], bool] | None = None

    def __call__(self, buf: bytes | memoryview, where: str) -> list[memoryview | None]:
        known = self._known
        if known is not None:
            index, head, start, picks, _ = known
            try:
                fields = index.unpack_from(buf, 0)
            except struct.error:  # shorter than the index: record_parts names it
                fields = _NO_FIELDS
            # fields: magic, crc, count + names_len + names, then the lengths
            if fields[0] == MAGIC and fields[2] == head:
                view = memoryview(buf)
                offsets = list(itertools.accumulate(fields[3:], initial=start))
                if offsets[-1] == len(view) and crc32c(view[8:], _MAGIC_CRC) == fields[1]:
                    return [None if k < 0 else view[offsets[k]:offsets[k + 1]] for k in picks]
        found = record_parts(buf, self.wanted, where)  # raises on damage
        self._learn(buf)
        return found

    def pair(self, buf: bytes | memoryview, where: str) -> tuple[memoryview | None, memoryview | None]:
        """``tuple(self(buf, where))`` of a picker of two parts, written out flat for
        records of the known layout that hold both (a per-sample read's part and own key:
        the general call's list and offsets cost more than the record's CRC on a small map)."""
        known = self._known
        if known is not None and known[4]:
            index, head, start, (first, second), _ = known
            try:
                fields = index.unpack_from(buf, 0)
            except struct.error:  # shorter than the index: record_parts names it
                fields = _NO_FIELDS
            if fields[0] == MAGIC and fields[2] == head:
                view = memoryview(buf)
                lengths = fields[3:]
                if start + sum(lengths) == len(view) and crc32c(view[8:], _MAGIC_CRC) == fields[1]:
                    a = start + sum(lengths[:first])
                    b = start + sum(lengths[:second])
                    return view[a:a + lengths[first]], view[b:b + lengths[second]]
        a, b = self(buf, where)
        return a, b

    def _learn(self, buf: bytes | memoryview) -> None:
        """Remember the layout of ``buf``, a record :func:`record_parts` has just read."""
        if bytes(buf[:4]) != MAGIC:
            return
        _, _, count, names_len = _HEAD3.unpack_from(buf, 0)
        names_block = bytes(buf[_HEAD3.size:_HEAD3.size + names_len])
        _, position, _ = _layout(names_block, count, "")
        index = struct.Struct(f"<4sI{4 + names_len}s{count}I")
        picks = tuple(position.get(name, -1) for name in self.wanted)
        head = struct.pack("<HH", count, names_len) + names_block
        self._known = (index, head, index.size, picks, len(picks) == 2 and min(picks) >= 0)


def _unpack_v2(buf: bytes | memoryview, where: str) -> dict[str, memoryview]:
    """``FMR2`` / ``FMR1`` records (format versions 2 and 1)."""
    view = memoryview(buf)
    if len(view) < _HEAD.size:
        raise CorruptionError(f"{where}: record of {len(view)} bytes is shorter than its header")
    magic, crc, count = _HEAD.unpack_from(view, 0)
    if magic == MAGIC_V2:
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
