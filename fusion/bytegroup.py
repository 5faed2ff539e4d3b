"""The ``bytegroup`` codec (lossless): per dtype, byte planes of the tensors' elements, exponents Huffman-coded.

Registered in :data:`coldswarm.fusion.codecs.CODECS`; see that module for framing and how to decode data from
someone else (``max_output``). Decoding bounds every size it reads before allocating.
"""

from __future__ import annotations

import io
import json
import logging
import struct

import numpy as np

from .checkpoint import DTYPES
from .codec_frame import (
    MAGIC,
    ZSTD_LEVEL,
    compress,
    decompress,
    decompress_bounded,
    unframe,
    zstd_module,
)
from .errors import CodecError

log = logging.getLogger(__name__)

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
            return zstd_module().ZstdCompressor(level=self.level, write_checksum=True).compress(plane.data)
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
        sections.append((_ZSTD, compress(mv, level)))
    else:
        start, spans = parsed
        sections.append((_ZSTD, compress(mv[:start], level)))
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
    z = zstd_module()
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
    dctx = zstd_module().ZstdDecompressor()
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
        return decompress(chunks[0][1], orig, "bytegroup")
    head = decompress_bounded(chunks[0][1], orig, "bytegroup header")
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
        return decompress(chunks[0], orig, "bytegroup")
    head = decompress_bounded(chunks[0], orig, "bytegroup header")
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
                decompress(chunks[i + j], total // k, "bytegroup plane"), dtype=np.uint8
            )
        flat = np.ascontiguousarray(planes.T).reshape(-1)
        i += k
        pos = 0
        for s, e in ranges:
            outv[start + s : start + e] = flat[pos : pos + e - s]
            pos += e - s
    return bytes(out)


def bytegroup_decode(data: bytes, max_output: int | None = None) -> bytes:
    version, orig, payload = unframe("bytegroup", data, max_output, versions=(1, BYTEGROUP_VERSION))
    return (_decode_v1 if version == 1 else _decode_v2)(orig, payload)
