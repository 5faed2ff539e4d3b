"""The frame every coldswarm codec writes, and the bounded zstd both lossless and lossy codecs use.

    b"CSWC" | version (u8) | codec name length (u8) | codec name | original length (u64 LE) | payload

The codecs themselves and their registry are in :mod:`coldswarm.fusion.codecs`; this module knows no codec
by name, so each codec's module can import it without importing the registry.
"""

from __future__ import annotations

import struct

from .errors import CodecError, DecodedTooLarge

MAGIC = b"CSWC"
VERSION = 1
ZSTD_LEVEL = 3


def frame_name(prefix: bytes) -> str | None:
    """The codec name a frame starting with ``prefix`` declares, or None when ``prefix`` is not a frame."""
    if prefix[:4] != MAGIC or len(prefix) < 6:
        return None
    return bytes(prefix[6 : 6 + prefix[5]]).decode("ascii", "replace")


def zstd_module():
    import zstandard  # imported lazily: only codecs need it

    return zstandard


def compress(data: bytes | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    return zstd_module().ZstdCompressor(level=level, write_checksum=True).compress(data)


def decompress_bounded(data: bytes | memoryview, limit: int, what: str) -> bytes:
    """All of a zstd stream, refusing to produce more than ``limit`` bytes (what its frame declared).

    A zstd frame may declare any content size, and one-shot decompression would allocate it; reading
    the stream in blocks bounds the memory by what is actually produced, and stops past ``limit``. A
    stream longer than its coldswarm frame declared is damaged or forged: :class:`CodecError`."""
    z = zstd_module()
    parts, total = [], 0
    try:
        reader = z.ZstdDecompressor().stream_reader(data)
        while True:
            block = reader.read(min(16 * 2**20, limit - total + 1))
            if not block:
                break
            total += len(block)
            if total > limit:
                raise CodecError(
                    f"{what}: expands past the {limit} bytes its frame declares; the data is damaged or forged"
                )
            parts.append(block)
    except z.ZstdError as e:
        raise CodecError(
            f"{what}: corrupt zstd data ({e}); the file is damaged or truncated -- download it again"
        ) from e
    return b"".join(parts)


def decompress(data: bytes | memoryview, expected: int, what: str) -> bytes:
    out = decompress_bounded(data, expected, what)
    if len(out) != expected:
        raise CodecError(f"{what}: decoded {len(out)} bytes, expected {expected}; the data is damaged")
    return out


def check_output_size(name: str, size: int, max_output: int | None) -> None:
    if max_output is not None and size > max_output:
        raise DecodedTooLarge(
            f"{name}: the data decodes to {size} bytes, more than the {max_output} accepted here; "
            "send a smaller contribution (fewer statistics, a PEFT adapter instead of full weights)"
        )


def frame(name: str, original_len: int, payload: bytes, version: int = VERSION) -> bytes:
    nb = name.encode()
    return MAGIC + bytes([version, len(nb)]) + nb + struct.pack("<Q", original_len) + payload


def unframe(
    name: str, data: bytes | memoryview, max_output: int | None, versions: tuple[int, ...] = (VERSION,)
) -> tuple[int, int, memoryview]:
    """(frame version, declared original length, payload) of a frame of codec ``name``."""
    data = memoryview(data)
    found = frame_name(bytes(data[:64]))
    if found is None:
        raise CodecError(
            f"{name}: not a coldswarm codec frame (no {MAGIC!r} header); was it encoded with '{name}'?"
        )
    if found != name:
        raise CodecError(f"data was encoded with codec {found!r}, not {name!r}; decode it with {found!r}")
    if data[4] not in versions:
        raise CodecError(
            f"{name}: frame version {data[4]} is not one this coldswarm reads ({', '.join(map(str, versions))}); "
            "upgrade coldswarm"
        )
    start = 6 + data[5]
    if len(data) < start + 8:
        raise CodecError(f"{name}: truncated frame header")
    (orig,) = struct.unpack_from("<Q", data, start)
    check_output_size(name, orig, max_output)
    return data[4], orig, data[start + 8 :]
