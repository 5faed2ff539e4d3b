"""The benchmark's byte counts: counting wrappers on hivemind's codec registry survive register_safe_codecs
(which SwarmTrainer.start calls), so what reducers send back is counted (the miscount of issue 14)."""

from __future__ import annotations

import torch
from hivemind.compression import CompressionInfo
from hivemind.compression import serialization as hm_serialization

from coldswarm.swarm.averaging_codecs import (
    ByteCountingCompression,
    count_registry_bytes,
    make_compression,
    register_safe_codecs,
)


def test_registry_counters_survive_register_safe_codecs():
    registry = hm_serialization._BASE_COMPRESSION_TYPES
    saved = dict(registry)
    try:
        counter = ByteCountingCompression(make_compression("uniform8bit"))
        count_registry_bytes(counter)
        register_safe_codecs()  # what SwarmTrainer.start() does before its averagers fork
        tensor = torch.randn(8192)
        codec = registry["UNIFORM_8BIT"]
        serialized = codec.compress(tensor, CompressionInfo.from_tensor(tensor))
        assert counter.values_sent == 8192  # a reducer's delta, encoded through the registry, is counted
        assert counter.bytes_sent == len(serialized.buffer)
        decoded = hm_serialization.deserialize_torch_tensor(serialized)
        assert (decoded - tensor).abs().mean() < 0.02  # and it still decodes (8-bit, clipped at 3 sigma)
    finally:
        registry.clear()
        registry.update(saved)
    register_safe_codecs()
