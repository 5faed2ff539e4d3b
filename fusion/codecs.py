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

import json
import logging
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from coldswarm.common.durable import atomic_write_bytes

from .bytegroup import bytegroup_decode, bytegroup_encode
from .checkpoint import DTYPE_NAMES, DTYPES
from .codec_frame import (
    MAGIC,
    check_output_size,
    compress,
    decompress,
    decompress_bounded,
    frame,
    frame_name,
    unframe,
)
from .errors import CodecError

log = logging.getLogger(__name__)

#: namespaces int8_blockwise quantises (task vectors); statistics, full weights and IA3 vectors stay exact
LOSSY_NAMESPACES = ("delta/", "lora_A/", "lora_B/")
INT8_BLOCKSIZE = 4096


def sniff(prefix: bytes) -> str | None:
    """The codec that framed ``prefix`` (the first bytes of some data): a codec name, 'none' for
    what looks like plain safetensors, or None when it is neither."""
    name = frame_name(prefix)
    if name is not None:
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
    check_output_size("none", len(data), max_output)
    if bytes(data[:4]) == MAGIC:
        raise CodecError(
            f"data is framed by codec {sniff(bytes(data[:64]))!r}; decode it with that codec, not 'none'"
        )
    return bytes(data)


def zstd_encode(data: bytes) -> bytes:
    return frame("zstd", len(data), compress(data))


def zstd_decode(data: bytes, max_output: int | None = None) -> bytes:
    _, orig, payload = unframe("zstd", data, max_output)
    return decompress(payload, orig, "zstd")


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
    return frame("int8_blockwise", len(data), compress(raw))


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

    _, orig, payload = unframe("int8_blockwise", data, max_output)
    try:
        # The quantised form is smaller than the original but for its index and per-tensor lengths.
        raw = decompress_bounded(payload, orig + 2**20, "int8_blockwise")
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
    check_output_size("int8_blockwise", len(decoded), max_output)
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
