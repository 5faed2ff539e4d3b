"""Compression for hivemind averaging: numpy-safe 8-bit codecs and the codec registry the swarm uses.

Not to be confused with :data:`coldswarm.fusion.codecs.CODECS`, which encodes whole files (contributions)
for upload; these compress tensors inside hivemind's all-reduce and state averaging.

Why this module exists
----------------------
hivemind 1.1.12's 8-bit codecs (``Uniform8BitQuantization``, ``Quantile8BitQuantization``,
``BlockwiseQuantization``) read their header with ``int(np.frombuffer(buf, count=1, ...))``. That converts a
1-element *array* to a scalar, which numpy deprecated in 1.25 and rejects from numpy 2.4 on. The failure
happens inside the averager's background process, while ``hivemind.Optimizer.step()`` returns normally and
the only trace is a log line like ``Reducer: received 50.0% of input tensors``: peers silently stop
averaging. The project bounds ``numpy<2.4``; this module makes it robust either way.

How it works: every received tensor is decoded by hivemind's *registry*
(``hivemind.compression.serialization._BASE_COMPRESSION_TYPES``, keyed by the wire ``compression_type``),
not by the codec object a peer was configured with; the all-reduce reducer also encodes its averaged
deltas through that registry. :func:`register_safe_codecs` therefore swaps the registry's 8-bit entries for
subclasses whose ``extract`` reads the header with ``.item()``. The bytes on the wire are unchanged, so
patched peers interoperate with stock hivemind peers. The swap must happen before the averagers fork
their background processes; the worker's ``SwarmTrainer``, :func:`coldswarm.swarm.dht.start_dht` and the
coordinator's checkpointer call it first thing, and importing this module calls it too.

Codec names (the ``grad_compression`` / ``state_compression`` config keys)
-----------------------------------------------------------------------
:data:`AVERAGING_CODECS` maps a config name to an :class:`AveragingCodec` (its factory
``(size_threshold) -> CompressionBase``, bits per value, a summary and its source):

================  ==========================================================================  ======
name              what                                                                        bits
================  ==========================================================================  ======
``none``          fp32 as is (hivemind ``NoCompression``)                                     32
``fp16``          cast to float16 (``Float16Compression``)                                    16
``scaled_fp16``   mean/std-normalised float16 over the last axis (``ScaledFloat16Compression``) 16
``uniform8bit``   8-bit uniform quantisation, 6 sigma range, 256-entry codebook; small          8
                  tensors (< ``size_threshold`` values) go fp16 because a 1 KiB codebook
                  would dominate them (the mix hivemind's ALBERT example uses)
``blockwise8bit`` bitsandbytes dynamic blockwise 8-bit (Dettmers et al. 2022, "8-bit Optimizers via   8
                  Block-wise Quantization"); small tensors fp16 as above; needs bitsandbytes
================  ==========================================================================  ======
"""

from __future__ import annotations

import math
import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Quantile8BitQuantization,
    ScaledFloat16Compression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
)
from hivemind.compression import serialization as _serialization
from hivemind.compression.quantization import average_buckets
from hivemind.proto import runtime_pb2

__all__ = [
    "AVERAGING_CODECS",
    "AveragingCodec",
    "ByteCountingCompression",
    "SafeBlockwiseQuantization",
    "SafeQuantile8BitQuantization",
    "SafeUniform8BitQuantization",
    "make_compression",
    "register_safe_codecs",
]


def _read_int64(buffer: bytes, offset: int = 0) -> int:
    # `.item()` on a 1-element array is the numpy-2.4-safe way to get a Python int;
    # int(ndarray) with ndim > 0 raises from numpy 2.4 on.
    return int(np.frombuffer(buffer, count=1, offset=offset, dtype=np.int64)[0].item())


class _SafeQuantizationExtract:
    """``Quantization.extract`` with a numpy-2.4-safe header read; same wire format as hivemind's."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        codebook_size = _read_int64(buffer)
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


class SafeUniform8BitQuantization(_SafeQuantizationExtract, Uniform8BitQuantization):
    """hivemind's ``Uniform8BitQuantization`` (wire type ``UNIFORM_8BIT``) with a numpy-2.4-safe ``extract``.

    ``quantize`` is re-implemented with plain tensor ops: hivemind's uses ``torch.quantize_per_tensor``, which
    torch deprecates for removal (it warns on every call in torch 2.13). Same rule, same wire format: values
    are centred on the mean, scaled so that +-3 sigma spans the 256 bins, rounded and clamped; the codebook
    holds each bin's mean value.
    """

    def quantize(self, tensor: torch.Tensor, allow_inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
        assert torch.is_floating_point(tensor)
        offset = self.n_bins // 2
        # Never in place: the codebook is the mean of the *original* values in each bin (hivemind's
        # allow_inplace path centres the tensor first and so loses the mean; no caller uses it, but why copy it).
        tensor = tensor.detach().to(dtype=torch.float32)
        centered = tensor - tensor.mean()
        std_unbiased = centered.norm() / math.sqrt(max(centered.numel() - 1, 1))
        # A constant tensor has std 0: any positive scale maps it to the middle bin.
        scale = torch.clamp_min(
            self.RANGE_IN_SIGMAS * std_unbiased / self.n_bins, torch.finfo(torch.float32).tiny
        )
        quantized = torch.clamp_(torch.round(centered / scale).add_(offset), 0, self.n_bins - 1).to(
            torch.uint8
        )
        lookup = average_buckets(tensor, quantized, self.n_bins)
        return quantized.numpy(), lookup.numpy().astype(self.codebook_dtype, copy=False)


class SafeQuantile8BitQuantization(_SafeQuantizationExtract, Quantile8BitQuantization):
    """hivemind's ``Quantile8BitQuantization`` (wire type ``QUANTILE_8BIT``) with a numpy-2.4-safe ``extract``."""


class SafeBlockwiseQuantization(BlockwiseQuantization):
    """hivemind's ``BlockwiseQuantization`` (wire type ``BLOCKWISE_8BIT``) with a numpy-2.4-safe ``extract``."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_blockwise
        from hivemind.compression.quantization import _BLOCKWISE_QUANTIZATION_BLOCKSIZE

        buffer = serialized_tensor.buffer
        absmax_size = _read_int64(buffer, 0)
        codebook_size = _read_int64(buffer, 8)
        absmax = np.frombuffer(buffer, offset=16, count=absmax_size, dtype=self.codebook_dtype)
        codebook = np.frombuffer(
            buffer, offset=16 + absmax.nbytes, count=codebook_size, dtype=self.codebook_dtype
        )
        quantized = np.frombuffer(
            buffer, offset=16 + absmax.nbytes + codebook.nbytes, dtype=self.indices_dtype
        )
        result = dequantize_blockwise(
            torch.as_tensor(quantized).reshape(tuple(serialized_tensor.size)),
            absmax=torch.as_tensor(absmax),
            code=torch.as_tensor(codebook),
            blocksize=_BLOCKWISE_QUANTIZATION_BLOCKSIZE,
            nested=False,
        )
        return result.to(getattr(torch, serialized_tensor.dtype)).requires_grad_(
            serialized_tensor.requires_grad
        )


_SAFE_REGISTRY: dict[str, CompressionBase] = {
    "UNIFORM_8BIT": SafeUniform8BitQuantization(),
    "QUANTILE_8BIT": SafeQuantile8BitQuantization(),
    "BLOCKWISE_8BIT": SafeBlockwiseQuantization(),
}


def register_safe_codecs() -> None:
    """Make hivemind decode (and reducers re-encode) 8-bit tensors with the numpy-safe codecs.

    Idempotent. Call it before creating any hivemind averager (they fork background processes that
    inherit the registry as it is at that moment). Entries that :func:`count_registry_bytes` wrapped around a
    safe codec stay wrapped: replacing them would silently stop the count of what reducers send back.
    """
    registry = _serialization._BASE_COMPRESSION_TYPES
    for key, codec in _SAFE_REGISTRY.items():
        current = registry.get(key)
        if not (isinstance(current, _RegistryCounter) and isinstance(current.inner, type(codec))):
            registry[key] = codec


def _adaptive(large: CompressionBase, size_threshold: int) -> CompressionBase:
    return SizeAdaptiveCompression(threshold=size_threshold, less=Float16Compression(), greater_equal=large)


@dataclass(frozen=True)
class AveragingCodec:
    """One registry entry: the config key, how to build it, and where it comes from."""

    name: str
    #: ``(size_threshold) -> CompressionBase``; tensors with fewer values than the threshold go fp16
    make: Callable[[int], CompressionBase]
    bits: int
    summary: str
    source: str


_HIVEMIND_COMPRESSION = "https://github.com/learning-at-home/hivemind/tree/1.1.12/hivemind/compression"

AVERAGING_CODECS: dict[str, AveragingCodec] = {
    c.name: c
    for c in [
        AveragingCodec("none", lambda size_threshold: NoCompression(), 32,
                       "fp32 as is (hivemind NoCompression)", f"{_HIVEMIND_COMPRESSION}/base.py"),
        AveragingCodec("fp16", lambda size_threshold: Float16Compression(), 16,
                       "cast to float16 (hivemind Float16Compression)", f"{_HIVEMIND_COMPRESSION}/floating.py"),
        AveragingCodec("scaled_fp16", lambda size_threshold: ScaledFloat16Compression(), 16,
                       "mean/std-normalised float16 over the last axis (hivemind ScaledFloat16Compression)",
                       f"{_HIVEMIND_COMPRESSION}/floating.py"),
        AveragingCodec("uniform8bit", lambda size_threshold: _adaptive(SafeUniform8BitQuantization(), size_threshold), 8,
                       "8-bit uniform quantisation over +-3 sigma with a 256-entry codebook; small tensors fp16 "
                       "(the mix hivemind's ALBERT example uses)",
                       "https://github.com/learning-at-home/hivemind/tree/1.1.12/examples/albert"),
        AveragingCodec("blockwise8bit", lambda size_threshold: _adaptive(SafeBlockwiseQuantization(), size_threshold), 8,
                       "bitsandbytes dynamic blockwise 8-bit (Dettmers et al. 2022); small tensors fp16",
                       "https://arxiv.org/abs/2110.02861"),
    ]
}  # fmt: skip


def make_compression(name: str, size_threshold: int = 2**12) -> CompressionBase:
    """The hivemind compression for a config name in :data:`AVERAGING_CODECS` (registers the safe codecs
    first)."""
    register_safe_codecs()
    try:
        codec = AVERAGING_CODECS[name]
    except KeyError:
        raise ValueError(f"unknown compression {name!r}; choose one of {sorted(AVERAGING_CODECS)}") from None
    return codec.make(size_threshold)


class ByteCountingCompression(CompressionBase):
    """Wraps a compression and counts the values and encoded bytes it produces, across processes.

    hivemind averagers compress in forked background processes, so the counters are shared
    ``multiprocessing.Value`` objects: create the wrapper *before* the averager starts. Counts only what this
    peer encodes with the configured codec (its outgoing tensor parts); reducers encode averaged deltas through
    hivemind's registry, see :func:`count_registry_bytes` to include those. Used by ``benchmarks/swarm.py``.
    """

    def __init__(self, inner: CompressionBase):
        self.inner = inner
        self.compression_type = inner.compression_type if hasattr(inner, "compression_type") else None
        self._bytes = mp.Value("q", 0)
        self._values = mp.Value("q", 0)

    @property
    def bytes_sent(self) -> int:
        return self._bytes.value

    @property
    def values_sent(self) -> int:
        return self._values.value

    def reset(self) -> None:
        with self._bytes.get_lock():
            self._bytes.value = 0
        with self._values.get_lock():
            self._values.value = 0

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False):
        serialized = self.inner.compress(tensor, info, allow_inplace)
        with self._bytes.get_lock():
            self._bytes.value += len(serialized.buffer)
        with self._values.get_lock():
            self._values.value += tensor.numel()
        return serialized

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return self.inner.extract(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.inner.estimate_compression_ratio(info)


class _RegistryCounter(CompressionBase):
    def __init__(self, inner: CompressionBase, counter: ByteCountingCompression):
        self.inner, self.counter = inner, counter
        self.compression_type = inner.compression_type

    def compress(self, tensor, info, allow_inplace=False):
        serialized = self.inner.compress(tensor, info, allow_inplace)
        with self.counter._bytes.get_lock():
            self.counter._bytes.value += len(serialized.buffer)
        with self.counter._values.get_lock():
            self.counter._values.value += tensor.numel()
        return serialized

    def extract(self, serialized_tensor):
        return self.inner.extract(serialized_tensor)

    def estimate_compression_ratio(self, info):
        return self.inner.estimate_compression_ratio(info)


def count_registry_bytes(counter: ByteCountingCompression) -> None:
    """Also count, into ``counter``, what this process encodes through hivemind's registry (the reducer's
    averaged deltas sent back to peers). Process-wide; for benchmarks, not for production peers."""
    register_safe_codecs()
    registry = _serialization._BASE_COMPRESSION_TYPES
    for key, codec in list(registry.items()):
        base = codec.inner if isinstance(codec, _RegistryCounter) else codec
        registry[key] = _RegistryCounter(base, counter)


register_safe_codecs()
