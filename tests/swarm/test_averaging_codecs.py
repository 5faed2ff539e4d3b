"""Fast, single-process tests of the swarm's averaging codecs (no DHT, no peers)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hivemind.compression import (
    CompressionInfo,
    Float16Compression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.compression import serialization as hivemind_serialization
from hivemind.proto import runtime_pb2

from coldswarm.swarm.averaging_codecs import (
    AVERAGING_CODECS,
    ByteCountingCompression,
    SafeQuantile8BitQuantization,
    SafeUniform8BitQuantization,
    make_compression,
    register_safe_codecs,
)


def _compress(codec, tensor):
    return codec.compress(tensor, CompressionInfo.from_tensor(tensor))


def _strict():
    """What numpy >= 2.4 does to int(<1-element array>): raise. Under numpy < 2.4 it is a DeprecationWarning,
    which this turns into an error so the trap is reproducible with the pinned numpy."""
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("error", DeprecationWarning)
    return context


def test_stock_hivemind_8bit_extract_is_the_numpy_trap():
    tensor = torch.randn(5000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serialized = _compress(Uniform8BitQuantization(), tensor)
    context = _strict()
    try:
        with pytest.raises((DeprecationWarning, TypeError)):
            Uniform8BitQuantization().extract(serialized)
    finally:
        context.__exit__(None, None, None)


@pytest.mark.parametrize("codec_cls", [SafeUniform8BitQuantization, SafeQuantile8BitQuantization])
def test_safe_codec_decodes_under_strict_numpy_and_matches_stock(codec_cls):
    torch.manual_seed(0)
    tensor = torch.randn(20000) * 0.01 + 0.003
    serialized = _compress(codec_cls(), tensor)
    context = _strict()
    try:
        ours = codec_cls().extract(serialized)
    finally:
        context.__exit__(None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = Uniform8BitQuantization().extract(serialized)  # same wire format, same decode
    assert torch.equal(ours, stock)
    # 8 bits over +-3 sigma: typical error about a hundredth of sigma; 1 byte per value plus a 1 KiB codebook.
    assert (ours - tensor).abs().mean() < 0.02 * tensor.std()
    assert len(serialized.buffer) == tensor.numel() + 256 * 4 + 8


def test_wire_compatible_with_stock_hivemind_both_ways():
    torch.manual_seed(1)
    tensor = torch.randn(3000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_stock = _compress(Uniform8BitQuantization(), tensor)
        ours = _compress(SafeUniform8BitQuantization(), tensor)
        decoded_by_stock = Uniform8BitQuantization().extract(ours)
    decoded_by_us = SafeUniform8BitQuantization().extract(from_stock)
    for decoded in (decoded_by_stock, decoded_by_us):
        assert (decoded - tensor).abs().mean() < 0.02


@pytest.mark.parametrize("tensor", [torch.zeros(100), torch.full((7,), 3.5), torch.ones(1)], ids=str)
def test_degenerate_tensors(tensor):
    decoded = SafeUniform8BitQuantization().extract(_compress(SafeUniform8BitQuantization(), tensor))
    assert torch.allclose(decoded, tensor)


def test_registry_decodes_8bit_with_the_safe_codec():
    """The averager decodes every received part through hivemind's registry, not the configured codec object;
    the registry must hold the safe codecs so averaging survives numpy >= 2.4."""
    register_safe_codecs()
    registry = hivemind_serialization._BASE_COMPRESSION_TYPES
    assert isinstance(registry["UNIFORM_8BIT"], SafeUniform8BitQuantization)
    assert isinstance(registry["QUANTILE_8BIT"], SafeQuantile8BitQuantization)
    tensor = torch.randn(4096)
    serialized = serialize_torch_tensor(tensor, runtime_pb2.UNIFORM_8BIT)
    context = _strict()
    try:
        decoded = deserialize_torch_tensor(serialized)
    finally:
        context.__exit__(None, None, None)
    assert (decoded - tensor).abs().mean() < 0.02


def test_blockwise_roundtrip_if_bitsandbytes_works_here():
    try:
        from bitsandbytes.functional import quantize_blockwise  # noqa: F401

        codec = make_compression("blockwise8bit", size_threshold=1)
        serialized = _compress(codec, torch.randn(10000))
    except Exception as exc:  # no CPU kernels in this bitsandbytes build
        pytest.skip(f"bitsandbytes blockwise quantisation unavailable: {exc!r}")
    context = _strict()
    try:
        decoded = deserialize_torch_tensor(serialized)
    finally:
        context.__exit__(None, None, None)
    assert decoded.shape == (10000,)


def test_adaptive_codecs_keep_small_tensors_fp16():
    codec = make_compression("uniform8bit", size_threshold=1000)
    small, large = torch.randn(999), torch.randn(1000)
    assert _compress(codec, small).compression == runtime_pb2.FLOAT16
    assert _compress(codec, large).compression == runtime_pb2.UNIFORM_8BIT
    assert set(AVERAGING_CODECS) >= {"none", "fp16", "uniform8bit", "blockwise8bit"}
    assert isinstance(make_compression("fp16"), Float16Compression)
    with pytest.raises(ValueError, match="unknown compression"):
        make_compression("int3")


def test_byte_counting_compression_counts_encoded_bytes():
    counter = ByteCountingCompression(make_compression("uniform8bit", size_threshold=1))
    _compress(counter, torch.randn(10000))
    assert counter.values_sent == 10000
    assert counter.bytes_sent == 10000 + 256 * 4 + 8
    counter.reset()
    assert counter.bytes_sent == 0


def test_every_averaging_codec_says_what_it_is_and_where_it_comes_from():
    for name, codec in AVERAGING_CODECS.items():
        assert codec.name == name and codec.summary and codec.source.startswith("https://")
        assert codec.bits in (8, 16, 32)
        assert make_compression(name, size_threshold=16) is not None
