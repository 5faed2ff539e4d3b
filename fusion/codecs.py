"""Compression codecs for what crosses the wire and sits on disk, in one registry (:data:`CODECS`).

Every codec maps ``bytes -> bytes`` (the input is normally a safetensors file: a contribution or a
model shard). Encoded data is framed so it describes itself and fails clearly on garbage::

    b"CSWC" | version (u8) | codec name length (u8) | codec name | original length (u64 LE) | payload

``none`` is the identity (plain safetensors is self-describing already).

=================  ========  ==================================================================
name               lossless  what it does
=================  ========  ==================================================================
``none``           yes       nothing
``zstd``           yes       zstd over the whole byte string
``bytegroup``      yes       per dtype, splits the tensors' elements into byte planes after moving
                             each float's sign bit to the bottom, so one plane is exactly the
                             exponents; Huffman-codes each plane per block of one tensor (zstd
                             literal-only frames) or stores it raw (mantissas). Smaller than ZipNN
                             0.5.4 on trained bf16/fp32 weights and deltas; frames of version 1
                             (before the sign bit moved) still decode
``int8_blockwise`` no        8-bit blockwise dynamic quantisation (bitsandbytes
                             ``quantize_blockwise``, CPU) of task-vector tensors (``delta/``,
                             ``lora_A/``, ``lora_B/``; every float tensor in a file without
                             contribution namespaces), the rest kept exactly; then zstd.
                             :func:`measure_error` reports the error it introduced
=================  ========  ==================================================================

Use :func:`encode_file` / :func:`decode_file` for files, :func:`sniff` to tell which codec framed
some bytes. Decoding what someone else encoded: pass ``max_output`` (the most bytes you accept); a
frame declaring more raises :class:`DecodedTooLarge` before decoding starts. Every zstd stream is read
with a bound (what its frame declared), so a small upload cannot expand into gigabytes: one that tries
is damaged or forged (:class:`CodecError`). zstd runs single-threaded at level 3 by default
(``ZSTD_LEVEL``) so a busy coordinator stays responsive; raise the level for archival. Encoders only
read their input (a ``bytes`` or ``bytearray`` is never written to).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coldswarm.common.durable import atomic_write_bytes

from .checkpoint import DTYPE_NAMES, DTYPES
from .errors import CodecError, DecodedTooLarge

log = logging.getLogger(__name__)

MAGIC = b"CSWC"
VERSION = 1
ZSTD_LEVEL = 3
#: namespaces int8_blockwise quantises (task vectors); statistics, full weights and IA3 vectors stay exact
LOSSY_NAMESPACES = ("delta/", "lora_A/", "lora_B/")
INT8_BLOCKSIZE = 4096


def _zstd():
    import zstandard  # imported lazily: only codecs need it

    return zstandard


def _compress(data: bytes | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    return _zstd().ZstdCompressor(level=level, write_checksum=True).compress(data)


def _decompress_bounded(data: bytes | memoryview, limit: int, what: str) -> bytes:
    """All of a zstd stream, refusing to produce more than ``limit`` bytes (what its frame declared).

    A zstd frame may declare any content size, and one-shot decompression would allocate it; reading
    the stream in blocks bounds the memory by what is actually produced, and stops past ``limit``. A
    stream longer than its coldswarm frame declared is damaged or forged: :class:`CodecError`."""
    z = _zstd()
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


def _decompress(data: bytes | memoryview, expected: int, what: str) -> bytes:
    out = _decompress_bounded(data, expected, what)
    if len(out) != expected:
        raise CodecError(f"{what}: decoded {len(out)} bytes, expected {expected}; the data is damaged")
    return out


def _check_output_size(name: str, size: int, max_output: int | None) -> None:
    if max_output is not None and size > max_output:
        raise DecodedTooLarge(
            f"{name}: the data decodes to {size} bytes, more than the {max_output} accepted here; "
            "send a smaller contribution (fewer statistics, a PEFT adapter instead of full weights)"
        )


def _frame(name: str, original_len: int, payload: bytes, version: int = VERSION) -> bytes:
    nb = name.encode()
    return MAGIC + bytes([version, len(nb)]) + nb + struct.pack("<Q", original_len) + payload


def _unframe(
    name: str, data: bytes | memoryview, max_output: int | None, versions: tuple[int, ...] = (VERSION,)
) -> tuple[int, int, memoryview]:
    """(frame version, declared original length, payload) of a frame of codec ``name``."""
    data = memoryview(data)
    found = sniff(bytes(data[:64]))
    if found is None or found == "none":
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
    _check_output_size(name, orig, max_output)
    return data[4], orig, data[start + 8 :]


def sniff(prefix: bytes) -> str | None:
    """The codec that framed ``prefix`` (the first bytes of some data): a codec name, 'none' for
    what looks like plain safetensors, or None when it is neither."""
    if prefix[:4] == MAGIC and len(prefix) >= 6:
        n = prefix[5]
        name = bytes(prefix[6 : 6 + n]).decode("ascii", "replace")
        return name if name in CODECS else None
    if len(prefix) >= 9 and prefix[8:9] == b"{":
        return "none"
    return None


def sniff_file(path: str | os.PathLike) -> str | None:
    with open(path, "rb") as f:
        return sniff(f.read(64))


# ---------------------------------------------------------------------------------------------
# none / zstd


def none_encode(data: bytes) -> bytes:
    return bytes(data)


def none_decode(data: bytes, max_output: int | None = None) -> bytes:
    _check_output_size("none", len(data), max_output)
    if bytes(data[:4]) == MAGIC:
        raise CodecError(
            f"data is framed by codec {sniff(bytes(data[:64]))!r}; decode it with that codec, not 'none'"
        )
    return bytes(data)


def zstd_encode(data: bytes) -> bytes:
    return _frame("zstd", len(data), _compress(data))


def zstd_decode(data: bytes, max_output: int | None = None) -> bytes:
    _, orig, payload = _unframe("zstd", data, max_output)
    return _decompress(payload, orig, "zstd")


# ---------------------------------------------------------------------------------------------
# bytegroup
#
# Version 2 (what bytegroup writes): per dtype, the tensors' elements are split into byte planes after
# moving each float's sign bit below its exponent (a rotation of the top 16 bits), so that one plane
# holds exactly the exponents.
# Every plane is one zstd frame whose blocks hold only literals (no LZ matches: on exponents they cost
# more than they save), which zstd Huffman-codes per block, or stores raw where that does not pay
# (mantissas). Blocks end at tensor boundaries, so each tensor's exponents get their own code.
# Version 1 (still read): byte planes grouped by element size, no bit moved, each plane plain zstd.

BYTEGROUP_VERSION = 2
_WARNED_NO_LITERALS = False
#: most elements per zstd block of a plane (zstd's own limit is 128 KiB); smaller adapts faster
BYTEGROUP_BLOCK = 2**15
#: tensors smaller than this share a block with the next tensor (a block per tiny tensor costs a table)
BYTEGROUP_MIN_BLOCK = 2**12
#: dtypes laid out sign | exponent | mantissa, whose sign bit moves to the lowest bit
_SIGN_FIRST = frozenset({"F16", "BF16", "F32", "F64"})
_ITEMSIZE = {name: dt.itemsize for name, dt in DTYPES.items()}
_WORD = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _safetensors_spans(
    data: bytes | memoryview, total: int | None = None
) -> tuple[int, list[tuple[int, int, int, str]]] | None:
    """(data start, [(start, end, itemsize, dtype)] sorted, tiling the data region) or None if not
    safetensors (or a dtype this coldswarm does not know).

    ``data`` needs to hold at least the header; ``total`` is the whole file's length (default len(data)).
    """
    total = len(data) if total is None else total
    if len(data) < 8:
        return None
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > len(data) - 8 or n > 100 * 2**20:
        return None
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
        if not isinstance(header, dict):
            return None
        spans = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = info["dtype"]
            s, e = info["data_offsets"]
            spans.append((int(s), int(e), _ITEMSIZE[dtype], dtype))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    spans.sort()
    pos = 0
    for s, e, k, _ in spans:
        if s != pos or e < s or (e - s) % k:
            return None
        pos = e
    if 8 + n + pos != total:
        return None
    return 8 + n, spans


def _dtype_groups(spans: list[tuple[int, int, int, str]]) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """[(dtype, itemsize, [(start, end), ...] in file order)], by dtype name; empty tensors left out."""
    out: dict[str, list[tuple[int, int]]] = {}
    for s, e, _, dtype in spans:
        if e > s:
            out.setdefault(dtype, []).append((s, e))
    return [(dtype, _ITEMSIZE[dtype], ranges) for dtype, ranges in sorted(out.items())]


def _block_lengths(
    counts: list[int], block: int = BYTEGROUP_BLOCK, min_block: int = BYTEGROUP_MIN_BLOCK
) -> list[int]:
    """Elements per zstd block for tensors of ``counts`` elements laid end to end: a block ends at a
    tensor boundary once it holds ``min_block`` elements, and none holds more than ``block``."""
    out, cur = [], 0
    for n in counts:
        if cur >= min_block:
            out.append(cur)
            cur = 0
        cur += n
        if cur > block:
            parts = -(-cur // block)
            q, r = divmod(cur, parts)
            out += [q + 1] * r + [q] * (parts - r)
            cur = 0
    if cur:
        out.append(cur)
    return out


class _LiteralFrames:
    """zstd frames of literals only, made with ``ZSTD_compressSequences`` and one block delimiter
    per block. zstandard reaches that function through its cffi binding; where that binding is
    missing (or ``literal_only`` is False), plain zstd frames are written instead: the same decoder
    reads both, but plain zstd codes exponents ~10% worse (its fast match finder takes short matches
    in them that cost more than the literals they replace)."""

    def __init__(self, level: int = ZSTD_LEVEL, literal_only: bool = True):
        self.level = level
        self.ffi = self.lib = None
        if not literal_only:
            return
        try:
            from zstandard import _cffi  # the cffi binding exposes zstd's experimental API

            ffi, lib = _cffi.ffi, _cffi.lib
            lib.ZSTD_compressSequences  # noqa: B018 -- present in zstd >= 1.5.0
        except (ImportError, AttributeError) as e:
            global _WARNED_NO_LITERALS
            if not _WARNED_NO_LITERALS:
                _WARNED_NO_LITERALS = True
                log.warning(
                    "bytegroup: zstandard's cffi binding is unavailable (%s); writing plain zstd planes", e
                )
            return
        self.ffi, self.lib = ffi, lib
        self.cctx = ffi.gc(lib.ZSTD_createCCtx(), lib.ZSTD_freeCCtx)
        for param, value in (
            (lib.ZSTD_c_compressionLevel, level),
            (lib.ZSTD_c_blockDelimiters, lib.ZSTD_sf_explicitBlockDelimiters),
            (lib.ZSTD_c_contentSizeFlag, 1),
            (lib.ZSTD_c_checksumFlag, 1),
        ):
            self._check(lib.ZSTD_CCtx_setParameter(self.cctx, param, value))

    def _check(self, code: int) -> int:
        if self.lib.ZSTD_isError(code):
            raise CodecError(
                f"bytegroup: zstd refused to encode: {self.ffi.string(self.lib.ZSTD_getErrorName(code)).decode()}"
            )
        return code

    def frame(self, plane: np.ndarray, blocks: list[int]) -> bytes:
        """One zstd frame of ``plane`` (contiguous uint8), a block per entry of ``blocks`` (lengths)."""
        if self.lib is None or plane.size == 0:
            return _zstd().ZstdCompressor(level=self.level, write_checksum=True).compress(plane.data)
        # ZSTD_Sequence is {offset, litLength, matchLength, rep}: a sequence with no match ends a block
        seqs = np.zeros((len(blocks), 4), dtype=np.uint32)
        seqs[:, 1] = blocks
        cap = self.lib.ZSTD_compressBound(plane.size)
        dst = bytearray(cap)
        n = self._check(
            self.lib.ZSTD_compressSequences(
                self.cctx,
                self.ffi.from_buffer(dst),
                cap,
                self.ffi.cast("ZSTD_Sequence *", self.ffi.from_buffer(seqs)),
                len(blocks),
                self.ffi.from_buffer(plane),
                plane.size,
            )
        )
        return bytes(memoryview(dst)[:n])


#: bytes of words split or joined at a time, so that the temporaries stay in the CPU cache (on a
#: 2-core machine shared with other work this was 3-5x faster than whole-array passes)
_CHUNK_BYTES = 2**18


_U16 = np.dtype("<u2")


def _split_planes(words: np.ndarray, sign_first: bool) -> list[np.ndarray]:
    """Byte planes of ``words`` (little-endian unsigned ints), least significant first: the low bytes
    as they are, then the two bytes of the top 16 bits. With ``sign_first`` those 16 bits are rotated
    left by one first, moving the sign to the bottom, so the top plane holds exactly the exponent of a
    BF16/F32 (the top 8 exponent bits of an F64)."""
    k, bits = words.dtype.itemsize, 8 * words.dtype.itemsize
    if k == 1:
        return [np.ascontiguousarray(words)]
    planes = [np.empty(words.size, np.uint8) for _ in range(k)]
    step = _CHUNK_BYTES // k
    n = min(step, words.size)
    t, top, t16 = np.empty(n, words.dtype), np.empty(n, _U16), np.empty(n, _U16)
    for i in range(0, words.size, step):
        w = words[i : i + step]
        m = w.size
        tt, tp, tq = t[:m], top[:m], t16[:m]
        for j in range(k - 2):
            np.copyto(planes[j][i : i + m], np.right_shift(w, 8 * j, out=tt) if j else w, casting="unsafe")
        np.copyto(tp, np.right_shift(w, bits - 16, out=tt) if k > 2 else w, casting="unsafe")
        if sign_first:
            np.left_shift(tp, 1, out=tq)
            np.bitwise_or(tq, np.right_shift(tp, 15, out=tp), out=tp)
        np.copyto(planes[k - 2][i : i + m], tp, casting="unsafe")  # keeps the low byte
        np.copyto(planes[k - 1][i : i + m], np.right_shift(tp, 8, out=tq), casting="unsafe")
    return planes


def _join_planes(planes: list[np.ndarray], sign_first: bool, out: np.ndarray) -> None:
    """Inverse of :func:`_split_planes`, written into ``out`` (unsigned words). Shifts and ors of
    runs: numpy vectorises those, where interleaving bytes with strided copies is ~10x slower."""
    k, word = out.dtype.itemsize, out.dtype
    if k == 1:
        out[:] = planes[0]
        return
    step = _CHUNK_BYTES // k
    n = min(out.size, step)
    top, t16, low, tw = np.empty(n, _U16), np.empty(n, _U16), np.empty(n, np.uint8), np.empty(n, word)
    for i in range(0, out.size, step):
        o = out[i : i + step]
        m = o.size
        p = [q[i : i + step] for q in planes]
        tp, tq = (o if k == 2 else top[:m]), t16[:m]
        if sign_first:  # top 16 bits = rotate_right(exponent << 8 | sign-and-mantissa byte)
            np.left_shift(p[k - 1], 7, out=tp, dtype=_U16)
            np.bitwise_or(tp, np.right_shift(p[k - 2], 1, out=low[:m]), out=tp, dtype=_U16)
            np.bitwise_or(tp, np.left_shift(p[k - 2], 15, out=tq, dtype=_U16), out=tp)
        else:
            np.left_shift(p[k - 1], 8, out=tp, dtype=_U16)
            np.bitwise_or(tp, p[k - 2], out=tp, dtype=_U16)
        if k == 2:
            continue
        np.left_shift(tp, 8 * k - 16, out=o, dtype=word)
        for j in range(0, k - 2, 2):  # the low bytes, unchanged, two at a time
            np.left_shift(p[j + 1], 8, out=tq, dtype=_U16)
            np.bitwise_or(tq, p[j], out=tq, dtype=_U16)
            if j:
                np.bitwise_or(o, np.left_shift(tq, 8 * j, out=tw[:m], dtype=word), out=o)
            else:
                np.bitwise_or(o, tq, out=o, dtype=word)


#: section kinds in a version-2 frame
_RAW, _ZSTD = 0, 1
#: a plane whose sampled byte entropy is above this (bits) is stored raw without trying zstd
_RAW_ENTROPY = 7.95


def _looks_random(plane: np.ndarray) -> bool:
    sample = plane[:: max(1, plane.size // 2**17)]
    counts = np.bincount(sample, minlength=256)
    p = counts[counts > 0] / sample.size
    return float(-(p * np.log2(p)).sum()) > _RAW_ENTROPY


def bytegroup_encode(data: bytes, level: int = ZSTD_LEVEL, literal_only: bool = True) -> bytes:
    """Lossless: header as is (zstd), then per dtype the tensors' byte planes (see the section comment).
    ``data`` is only read, never written. ``literal_only=False`` writes plain zstd planes (what happens
    without zstandard's cffi binding; decoded the same way)."""
    mv = memoryview(data)
    parsed = _safetensors_spans(mv)
    sections: list[tuple[int, bytes | memoryview]] = []
    if parsed is None:  # not safetensors: plain zstd (still bit-exact)
        sections.append((_ZSTD, _compress(mv, level)))
    else:
        start, spans = parsed
        sections.append((_ZSTD, _compress(mv[:start], level)))
        buf = np.frombuffer(mv, dtype=np.uint8)
        frames = _LiteralFrames(level, literal_only)
        for dtype, k, ranges in _dtype_groups(spans):
            if ranges[-1][1] - ranges[0][0] == sum(e - s for s, e in ranges):  # adjacent: no copy
                joined = buf[start + ranges[0][0] : start + ranges[-1][1]]
            else:
                joined = np.concatenate([buf[start + s : start + e] for s, e in ranges])
            blocks = _block_lengths([(e - s) // k for s, e in ranges])
            for plane in _split_planes(joined.view(_WORD[k]), dtype in _SIGN_FIRST):
                frame = None if _looks_random(plane) else frames.frame(plane, blocks)
                # stored raw where zstd would store it raw anyway: decoding it is then a view
                sections.append(
                    (_RAW, plane.data) if frame is None or len(frame) >= plane.size else (_ZSTD, frame)
                )
    head = struct.pack("<BI", 0 if parsed is None else 1, len(sections))
    head += b"".join(struct.pack("<BQ", kind, len(sec)) for kind, sec in sections)
    nb = b"bytegroup"
    return b"".join(
        [MAGIC, bytes([BYTEGROUP_VERSION, len(nb)]), nb, struct.pack("<Q", len(data)), head]
        + [sec for _, sec in sections]
    )


def _sections(payload: memoryview, kinds: bool) -> tuple[int, list[tuple[int, memoryview]]]:
    """(layout, [(kind, bytes)]) of a bytegroup payload; version 1 has no kinds (all zstd)."""
    entry = "<BQ" if kinds else "<Q"
    size = struct.calcsize(entry)
    try:
        mode, count = struct.unpack_from("<BI", payload, 0)
        if 5 + size * count > len(payload):
            raise struct.error(f"{count} sections do not fit in {len(payload)} bytes")
        table = [struct.unpack_from(entry, payload, 5 + size * i) for i in range(count)]
    except struct.error as e:
        raise CodecError(f"bytegroup: truncated section table ({e})") from e
    if not kinds:
        table = [(_ZSTD, n) for (n,) in table]
    pos = 5 + size * count
    if pos + sum(n for _, n in table) != len(payload):
        raise CodecError("bytegroup: section sizes do not add up; the data is truncated or damaged")
    chunks = []
    for kind, n in table:
        if kind not in (_RAW, _ZSTD):
            raise CodecError(f"bytegroup: unknown section kind {kind}; the data is damaged")
        chunks.append((kind, payload[pos : pos + n]))
        pos += n
    if mode not in (0, 1) or not chunks or (mode == 0 and len(chunks) != 1) or chunks[0][0] != _ZSTD:
        raise CodecError(f"bytegroup: unknown layout {mode} with {len(chunks)} sections; the data is damaged")
    return mode, chunks


def _plane(dctx, kind: int, section: memoryview, size: int) -> np.ndarray:
    """One plane of ``size`` bytes: the section itself (raw), or a zstd frame that must declare
    exactly ``size`` bytes, decoded into no more."""
    if kind == _RAW:
        if len(section) != size:
            raise CodecError(
                f"bytegroup: a raw byte plane holds {len(section)} bytes where the header needs {size}"
            )
        return np.frombuffer(section, dtype=np.uint8)
    z = _zstd()
    try:
        declared = z.frame_content_size(section)
        if declared != size:
            raise CodecError(
                f"bytegroup: a byte plane declares {declared} bytes where the header needs {size}; "
                "the data is damaged or forged"
            )
        out = dctx.decompress(section, max_output_size=size, allow_extra_data=False)
    except z.ZstdError as e:
        raise CodecError(
            f"bytegroup: corrupt byte plane ({e}); the data is damaged -- download it again"
        ) from e
    if len(out) != size:
        raise CodecError(f"bytegroup: a byte plane decoded to {len(out)} bytes, expected {size}")
    return np.frombuffer(out, dtype=np.uint8)


def _fill_planes(outv: np.ndarray, start: int, groups, planes_sections) -> None:
    """Decode every dtype group's planes into its place in ``outv`` (the whole output file)."""
    dctx = _zstd().ZstdDecompressor()
    i = 0
    for dtype, k, ranges in groups:
        size = sum(e - s for s, e in ranges)
        planes = [_plane(dctx, *planes_sections[i + j], size // k) for j in range(k)]
        i += k
        adjacent = ranges[-1][1] - ranges[0][0] == size
        target = outv[start + ranges[0][0] : start + ranges[-1][1]] if adjacent else np.empty(size, np.uint8)
        _join_planes(planes, dtype in _SIGN_FIRST, target.view(_WORD[k]))
        if not adjacent:
            pos = 0
            for s, e in ranges:
                outv[start + s : start + e] = target[pos : pos + e - s]
                pos += e - s


def _decode_v2(orig: int, payload: memoryview) -> bytes:
    mode, chunks = _sections(payload, kinds=True)
    if mode == 0:
        return _decompress(chunks[0][1], orig, "bytegroup")
    head = _decompress_bounded(chunks[0][1], orig, "bytegroup header")
    parsed = _safetensors_spans(head, total=orig) if len(head) >= 8 else None
    if parsed is None or parsed[0] != len(head):
        raise CodecError("bytegroup: the embedded safetensors header is invalid")
    start, spans = parsed
    groups = _dtype_groups(spans)
    if len(chunks) != 1 + sum(k for _, k, _ in groups):
        raise CodecError(
            "bytegroup: the number of byte planes does not match the header; the data is damaged"
        )
    # The output is built inside a BytesIO, whose getvalue() hands over its buffer as the bytes
    # object without copying it once no view of it is left.
    result = io.BytesIO()
    result.write(head)
    if orig > len(head):
        result.seek(orig - 1)
        result.write(b"\0")
    view = result.getbuffer()
    try:
        _fill_planes(np.frombuffer(view, dtype=np.uint8), start, groups, chunks[1:])
    finally:
        view.release()
    return result.getvalue()


def _decode_v1(orig: int, payload: memoryview) -> bytes:
    """Version-1 frames (coldswarm before bytegroup moved sign bits): planes per element size."""
    mode, sections = _sections(payload, kinds=False)
    chunks = [sec for _, sec in sections]
    if mode == 0:
        return _decompress(chunks[0], orig, "bytegroup")
    head = _decompress_bounded(chunks[0], orig, "bytegroup header")
    if len(head) < 8 or len(head) != 8 + int.from_bytes(head[:8], "little") or len(head) > orig:
        raise CodecError("bytegroup: the embedded safetensors header is invalid")
    out = bytearray(orig)
    out[: len(head)] = head
    parsed = _safetensors_spans(head, total=orig)
    if parsed is None:
        raise CodecError("bytegroup: the embedded safetensors header is invalid")
    start, spans = parsed
    by_size: dict[int, list[tuple[int, int]]] = {}
    for s, e, k, _ in spans:
        by_size.setdefault(k, []).append((s, e))
    i = 1
    outv = np.frombuffer(out, dtype=np.uint8)
    for k, ranges in sorted(by_size.items()):
        total = sum(e - s for s, e in ranges)
        if i + k > len(chunks):
            raise CodecError("bytegroup: fewer byte planes than the header needs; the data is damaged")
        planes = np.empty((k, total // k), dtype=np.uint8)
        for j in range(k):
            planes[j] = np.frombuffer(
                _decompress(chunks[i + j], total // k, "bytegroup plane"), dtype=np.uint8
            )
        flat = np.ascontiguousarray(planes.T).reshape(-1)
        i += k
        pos = 0
        for s, e in ranges:
            outv[start + s : start + e] = flat[pos : pos + e - s]
            pos += e - s
    return bytes(out)


def bytegroup_decode(data: bytes, max_output: int | None = None) -> bytes:
    version, orig, payload = _unframe("bytegroup", data, max_output, versions=(1, BYTEGROUP_VERSION))
    return (_decode_v1 if version == 1 else _decode_v2)(orig, payload)


# ---------------------------------------------------------------------------------------------
# int8_blockwise (lossy)


def _parse_safetensors(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}
        return meta, load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CodecError(f"int8_blockwise: input is not a safetensors file ({e})") from e


def _quantise_this(name: str, t: torch.Tensor, namespaced: bool) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return False
    return name.startswith(LOSSY_NAMESPACES) if namespaced else True


def int8_blockwise_encode(data: bytes, blocksize: int = INT8_BLOCKSIZE) -> bytes:
    """Lossy: task-vector tensors become uint8 codes + one fp32 absmax per block of ``blocksize``."""
    from bitsandbytes.functional import quantize_blockwise

    if blocksize not in INT8_BLOCKSIZES:
        raise CodecError(f"int8_blockwise: block size {blocksize} is not one of {INT8_BLOCKSIZES}")
    meta, tensors = _parse_safetensors(bytes(data))  # safetensors reads only bytes
    namespaced = any("/" in n for n in tensors)
    index, blobs = [], []
    for name, t in sorted(tensors.items()):  # safetensors' own order varies from call to call
        entry = {"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
        if _quantise_this(name, t, namespaced):
            codes, state = quantize_blockwise(
                t.detach().float().reshape(-1).contiguous(), blocksize=blocksize
            )
            entry["q"] = True
            blobs += [codes.numpy().tobytes(), state.absmax.float().numpy().tobytes()]
        else:
            entry["q"] = False
            flat = t.contiguous().reshape(-1).view(torch.uint8)
            blobs.append(flat.numpy().tobytes())
        index.append(entry)
    head = json.dumps({"metadata": meta, "blocksize": blocksize, "tensors": index}).encode()
    raw = struct.pack("<Q", len(head)) + head + b"".join(struct.pack("<Q", len(b)) + b for b in blobs)
    return _frame("int8_blockwise", len(data), _compress(raw))


def _from_bytes(b: bytes) -> torch.Tensor:
    """A fresh uint8 tensor holding ``b`` (torch.frombuffer refuses empty buffers)."""
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


#: block sizes bitsandbytes' blockwise quantisation supports (the encoder's ``blocksize`` must be one)
INT8_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def _int8_index(
    head: object, orig: int
) -> tuple[dict[str, str], int, list[tuple[str, str, tuple[int, ...], bool]]]:
    """The checked index of an int8_blockwise payload: (metadata, blocksize, [(name, dtype, shape, q)]).
    Everything the dequantiser (C code) is handed is checked here first."""
    if not isinstance(head, dict) or not isinstance(head.get("tensors"), list):
        raise CodecError("int8_blockwise: the index is not a tensor list; the data is damaged")
    meta, blocksize = head.get("metadata") or {}, head.get("blocksize")
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CodecError("int8_blockwise: the metadata is not a string map; the data is damaged")
    if type(blocksize) is not int or blocksize not in INT8_BLOCKSIZES:
        raise CodecError(
            f"int8_blockwise: block size {str(blocksize)[:20]!r} is not one of {INT8_BLOCKSIZES}"
        )
    out, declared = [], 0
    for e in head["tensors"]:
        ok = isinstance(e, dict) and isinstance(e.get("name"), str) and e.get("dtype") in DTYPES
        shape = e.get("shape") if ok else None
        ok = ok and isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**48 for d in shape)
        if not ok or not isinstance(e.get("q"), bool):
            raise CodecError(f"int8_blockwise: malformed index entry {str(e)[:60]!r}; the data is damaged")
        out.append((e["name"], e["dtype"], tuple(shape), e["q"]))
        # Declared shapes decide what dequantising allocates: they must fit the declared original length.
        declared += math.prod(shape) * DTYPES[e["dtype"]].itemsize
    if declared > orig:
        raise CodecError(f"int8_blockwise: tensors declare {declared} bytes, more than the frame's {orig}")
    return meta, blocksize, out


def int8_blockwise_decode(data: bytes, max_output: int | None = None) -> bytes:
    from bitsandbytes.functional import QuantState, create_dynamic_map, dequantize_blockwise
    from safetensors.torch import save

    _, orig, payload = _unframe("int8_blockwise", data, max_output)
    try:
        # The quantised form is smaller than the original but for its index and per-tensor lengths.
        raw = _decompress_bounded(payload, orig + 2**20, "int8_blockwise")
        (n,) = struct.unpack_from("<Q", raw, 0)
        if 8 + n > len(raw):
            raise CodecError("int8_blockwise: truncated index")
        meta, blocksize, index = _int8_index(json.loads(raw[8 : 8 + n]), orig)
        pos = 8 + n

        def blob(expected: int, what: str) -> bytes:
            nonlocal pos
            (k,) = struct.unpack_from("<Q", raw, pos)
            if k != expected or pos + 8 + k > len(raw):
                raise CodecError(
                    f"int8_blockwise: {what} holds {k} bytes, expected {expected}; the data is damaged"
                )
            b = raw[pos + 8 : pos + 8 + k]
            pos += 8 + k
            return b

        code = create_dynamic_map()
        out: dict[str, torch.Tensor] = {}
        for name, dtype, shape, q in index:
            dt, numel = DTYPES[dtype], math.prod(shape)
            if q:
                codes = _from_bytes(blob(numel, f"{name!r}'s codes")).view(torch.uint8)
                absmax = _from_bytes(blob(4 * -(-numel // blocksize), f"{name!r}'s scales")).view(
                    torch.float32
                )
                state = QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
                out[name] = dequantize_blockwise(codes, state).reshape(shape).to(dt)
            else:
                out[name] = _from_bytes(blob(numel * dt.itemsize, f"{name!r}")).view(dt).reshape(shape)
        if pos != len(raw):
            raise CodecError(
                f"int8_blockwise: {len(raw) - pos} bytes past the last tensor; the data is damaged"
            )
        decoded = save(out, metadata=meta or None)
    except CodecError:
        raise
    except Exception as e:  # zstd, struct, json, torch and safetensors errors: all mean damaged data
        raise CodecError(f"int8_blockwise: damaged data ({str(e)[:200]}); download it again") from e
    _check_output_size("int8_blockwise", len(decoded), max_output)
    return decoded


def measure_error(original: bytes, decoded: bytes) -> dict[str, dict[str, float]]:
    """Per tensor: max abs error and relative RMS error ||x - x'|| / ||x|| between two safetensors byte
    strings (use it to report what a lossy codec did: ``measure_error(d, decode(encode(d)))``)."""
    from safetensors.torch import load

    a, b = load(original), load(decoded)
    out = {}
    for name, x in a.items():
        if not x.is_floating_point():
            continue
        x, y = x.double(), b[name].double()
        err = (x - y).reshape(-1)
        norm = float(x.norm())
        out[name] = {"max_abs": float(err.abs().max()) if err.numel() else 0.0,
                     "rel_rms": float(err.norm()) / norm if norm > 0 else float(err.norm())}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Codec:
    name: str
    encode: Callable[[bytes], bytes]
    #: ``decode(data, max_output=None)``: ``max_output`` bounds the decoded size (DecodedTooLarge past it)
    decode: Callable[..., bytes]
    lossless: bool
    summary: str
    reference: str


CODECS: dict[str, Codec] = {
    c.name: c
    for c in [
        Codec("none", none_encode, none_decode, True, "identity (plain safetensors)", "https://github.com/huggingface/safetensors"),
        Codec("zstd", zstd_encode, zstd_decode, True, "zstd over the bytes", "https://datatracker.ietf.org/doc/html/rfc8878"),
        Codec("bytegroup", bytegroup_encode, bytegroup_decode, True,
              "byte planes per dtype with the sign bit moved out of the exponent; exponents Huffman-coded "
              "per tensor block (zstd literal-only frames), mantissas raw (ZipNN's idea, zstd's coder)",
              "https://arxiv.org/abs/2411.05239"),
        Codec("int8_blockwise", int8_blockwise_encode, int8_blockwise_decode, False,
              "8-bit blockwise dynamic quantisation of task-vector tensors (bitsandbytes), then zstd",
              "https://arxiv.org/abs/2110.02861"),
    ]
}  # fmt: skip


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None


def encode_file(src: str | os.PathLike, dst: str | os.PathLike, codec: str) -> int:
    """Encode file ``src`` with ``codec`` into ``dst`` (atomically); returns the encoded size."""
    data = get_codec(codec).encode(Path(src).read_bytes())
    atomic_write_bytes(dst, data)
    return len(data)


def decode_file(
    src: str | os.PathLike, dst: str | os.PathLike, codec: str | None = None, max_output: int | None = None
) -> int:
    """Decode ``src`` into plain bytes at ``dst`` (atomically). ``codec`` None: detect from the frame;
    ``max_output``: the most decoded bytes accepted (:class:`DecodedTooLarge` past it)."""
    data = Path(src).read_bytes()
    name = codec or sniff(data[:64])
    if name is None:
        raise CodecError(f"{src}: neither a coldswarm codec frame nor a safetensors file")
    out = get_codec(name).decode(data, max_output=max_output)
    atomic_write_bytes(dst, out)
    return len(out)


__all__ = [
    "CODECS",
    "Codec",
    "get_codec",
    "sniff",
    "sniff_file",
    "encode_file",
    "decode_file",
    "measure_error",
]
