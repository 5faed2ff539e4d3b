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
``bytegroup``      yes       splits each tensor's elements into byte planes (all first bytes, all
                             second bytes, ...; grouped by element size) and zstd-compresses each
                             plane: exponent bytes of trained weights are highly repetitive,
                             mantissa bytes are not, and separating them lets zstd see that
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
(``ZSTD_LEVEL``) so a busy coordinator stays responsive; raise the level for archival.
"""

from __future__ import annotations

import json
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


def _frame(name: str, original_len: int, payload: bytes) -> bytes:
    nb = name.encode()
    return MAGIC + bytes([VERSION, len(nb)]) + nb + struct.pack("<Q", original_len) + payload


def _unframe(name: str, data: bytes | memoryview, max_output: int | None) -> tuple[int, memoryview]:
    data = memoryview(data)
    found = sniff(bytes(data[:64]))
    if found is None or found == "none":
        raise CodecError(
            f"{name}: not a coldswarm codec frame (no {MAGIC!r} header); was it encoded with '{name}'?"
        )
    if data[4] != VERSION:
        raise CodecError(f"{name}: frame version {data[4]} is not {VERSION}; upgrade coldswarm")
    if found != name:
        raise CodecError(f"data was encoded with codec {found!r}, not {name!r}; decode it with {found!r}")
    start = 6 + data[5]
    if len(data) < start + 8:
        raise CodecError(f"{name}: truncated frame header")
    (orig,) = struct.unpack_from("<Q", data, start)
    _check_output_size(name, orig, max_output)
    return orig, data[start + 8 :]


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
    orig, payload = _unframe("zstd", data, max_output)
    return _decompress(payload, orig, "zstd")


# ---------------------------------------------------------------------------------------------
# bytegroup


def _safetensors_spans(
    data: bytes | memoryview, total: int | None = None
) -> tuple[int, list[tuple[int, int, int]]] | None:
    """(data start, [(start, end, itemsize)] sorted, tiling the data region) or None if not safetensors.

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
            dt = DTYPES[info["dtype"]]
            s, e = info["data_offsets"]
            spans.append((int(s), int(e), torch.empty((), dtype=dt).element_size()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    spans.sort()
    pos = 0
    for s, e, k in spans:
        if s != pos or e < s or (e - s) % k:
            return None
        pos = e
    if 8 + n + pos != total:
        return None
    return 8 + n, spans


def _groups(spans: list[tuple[int, int, int]]) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for s, e, k in spans:
        out.setdefault(k, []).append((s, e))
    return dict(sorted(out.items()))


def bytegroup_encode(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    """Lossless: header as is, then per element size k the tensors' bytes split into k planes."""
    mv = memoryview(data)
    parsed = _safetensors_spans(mv)
    sections: list[bytes] = []
    if parsed is None:  # not safetensors: one plane, i.e. plain zstd (still bit-exact)
        sections.append(_compress(mv, level))
    else:
        start, spans = parsed
        sections.append(_compress(mv[:start], level))
        buf = np.frombuffer(mv, dtype=np.uint8)
        for k, ranges in _groups(spans).items():
            joined = np.concatenate([buf[start + s : start + e] for s, e in ranges]) if ranges else buf[:0]
            planes = np.ascontiguousarray(joined.reshape(-1, k).T)  # one transpose: row j = byte j of all
            for j in range(k):
                sections.append(_compress(planes[j].data, level))
    body = struct.pack("<BI", 0 if parsed is None else 1, len(sections))
    body += b"".join(struct.pack("<Q", len(s)) for s in sections)
    return _frame("bytegroup", len(data), body + b"".join(sections))


def bytegroup_decode(data: bytes, max_output: int | None = None) -> bytes:
    orig, payload = _unframe("bytegroup", data, max_output)
    try:
        mode, count = struct.unpack_from("<BI", payload, 0)
        lens = struct.unpack_from(f"<{count}Q", payload, 5)
    except struct.error as e:
        raise CodecError(f"bytegroup: truncated section table ({e})") from e
    pos = 5 + 8 * count
    if pos + sum(lens) != len(payload):
        raise CodecError("bytegroup: section sizes do not add up; the data is truncated or damaged")
    chunks = []
    for n in lens:
        chunks.append(payload[pos : pos + n])
        pos += n
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
    i = 1
    outv = np.frombuffer(out, dtype=np.uint8)
    for k, ranges in _groups(spans).items():
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

    meta, tensors = _parse_safetensors(data)
    namespaced = any("/" in n for n in tensors)
    index, blobs = [], []
    for name, t in tensors.items():
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


def int8_blockwise_decode(data: bytes, max_output: int | None = None) -> bytes:
    from bitsandbytes.functional import QuantState, create_dynamic_map, dequantize_blockwise
    from safetensors.torch import save

    orig, payload = _unframe("int8_blockwise", data, max_output)
    z = _zstd()
    try:
        # The quantised form is smaller than the original but for its index and per-tensor lengths.
        raw = _decompress_bounded(payload, orig + 2**20, "int8_blockwise")
        (n,) = struct.unpack_from("<Q", raw, 0)
        head = json.loads(raw[8 : 8 + n])
        pos = 8 + n

        def blob() -> bytes:
            nonlocal pos
            (k,) = struct.unpack_from("<Q", raw, pos)
            b = raw[pos + 8 : pos + 8 + k]
            if len(b) != k:
                raise CodecError("int8_blockwise: truncated tensor data")
            pos += 8 + k
            return b

        # Declared shapes decide what dequantising allocates: they must fit the declared original length.
        declared = sum(math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize for e in head["tensors"])
        if declared > orig:
            raise CodecError(
                f"int8_blockwise: tensors declare {declared} bytes, more than the frame's {orig}"
            )
        code = create_dynamic_map()
        out: dict[str, torch.Tensor] = {}
        for e in head["tensors"]:
            dt, shape = DTYPES[e["dtype"]], tuple(e["shape"])
            if e["q"]:
                codes = _from_bytes(blob()).view(torch.uint8)
                if codes.numel() != math.prod(shape):
                    raise CodecError(
                        f"int8_blockwise: {e['name']} has {codes.numel()} codes for shape {shape}"
                    )
                absmax = _from_bytes(blob()).view(torch.float32)
                state = QuantState(absmax=absmax, code=code, blocksize=head["blocksize"], dtype=torch.float32)
                out[e["name"]] = dequantize_blockwise(codes, state).reshape(shape).to(dt)
            else:
                out[e["name"]] = _from_bytes(blob()).view(dt).reshape(shape)
    except CodecError:
        raise
    except (z.ZstdError, struct.error, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CodecError(f"int8_blockwise: damaged data ({e}); download it again") from e
    decoded = save(out, metadata=head["metadata"] or None)
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
              "byte planes of each element size, each zstd-compressed (exponent bytes compress, mantissas barely)",
              "https://arxiv.org/abs/2504.11651"),
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
