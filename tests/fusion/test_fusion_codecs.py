"""Codecs: bit-exact lossless round trips, measured lossy error, clear failures on garbage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from coldswarm.fusion.codecs import CODECS, decode_file, encode_file, get_codec, measure_error, sniff
from coldswarm.fusion.contribution import ContributionMeta, LoraMeta, open_contribution, save_contribution
from coldswarm.fusion.errors import CodecError, ContributionError, DecodedTooLarge


def payload(seed=0):
    g = torch.Generator().manual_seed(seed)
    return save(
        {
            "delta/a": torch.randn(300, 17, generator=g),
            "lora_A/m": torch.randn(4, 33, generator=g).to(torch.bfloat16),
            "fisher/a": torch.rand(300, 17, generator=g),
            "ia3/x": torch.randn(5, generator=g).half(),
            "weight/steps": torch.arange(7, dtype=torch.int64),
            "weight/flags": torch.tensor([True, False]),
            "weight/empty": torch.zeros(0, 3),
            "weight/scalar": torch.tensor(2.5, dtype=torch.float64),
        },
        metadata={"coldswarm": '{"format": 1}'},
    )


def test_registry():
    assert set(CODECS) == {"none", "zstd", "bytegroup", "int8_blockwise"}
    assert [n for n, c in CODECS.items() if not c.lossless] == ["int8_blockwise"]
    for name, c in CODECS.items():
        assert c.name == name and c.summary and c.reference.startswith("https://")
    with pytest.raises(CodecError, match="choose one of"):
        get_codec("lz4")


@pytest.mark.parametrize("name", ["none", "zstd", "bytegroup"])
def test_lossless_round_trips_are_bit_exact(name):
    data = payload()
    enc = CODECS[name].encode(data)
    assert CODECS[name].decode(enc) == data
    assert sniff(enc[:64]) == name


@settings(max_examples=30, deadline=None)
@given(blob=st.binary(min_size=0, max_size=300))
def test_lossless_codecs_round_trip_arbitrary_bytes(blob):
    for name in ("zstd", "bytegroup"):
        assert CODECS[name].decode(CODECS[name].encode(blob)) == blob


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(0, 9), st.integers(1, 7)), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8]),
    seed=st.integers(0, 1000),
)
def test_bytegroup_round_trips_any_safetensors(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": (torch.randn(s, generator=g) * 50).to(dtype) for i, s in enumerate(shapes)}
    data = save(tensors)
    assert CODECS["bytegroup"].decode(CODECS["bytegroup"].encode(data)) == data


def test_bytegroup_beats_zstd_on_structured_floats():
    # weights of a trained layer are roughly Gaussian with a small scale: few distinct exponents
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        data = save({"w": (0.02 * torch.randn(200_000, generator=g)).to(dtype)})
        assert len(CODECS["bytegroup"].encode(data)) < len(CODECS["zstd"].encode(data)) < len(data)


def test_int8_blockwise_is_lossy_on_deltas_only_and_reports_error():
    data = payload()
    dec = CODECS["int8_blockwise"].decode(CODECS["int8_blockwise"].encode(data))
    a, b = load(data), load(dec)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
    for exact in ("fisher/a", "ia3/x", "weight/steps", "weight/flags", "weight/scalar"):
        assert torch.equal(a[exact], b[exact]), exact  # statistics and non-task-vector tensors stay exact
    err = measure_error(data, dec)
    assert 0 < err["delta/a"]["rel_rms"] < 0.02  # 8-bit dynamic blockwise: ~1% relative error
    assert err["fisher/a"]["max_abs"] == 0.0
    assert len(CODECS["int8_blockwise"].encode(data)) < len(CODECS["zstd"].encode(data))


def test_garbage_and_mismatched_frames_fail_clearly():
    data = payload()
    z = CODECS["zstd"].encode(data)
    with pytest.raises(CodecError, match="encoded with codec 'zstd', not 'bytegroup'"):
        CODECS["bytegroup"].decode(z)
    with pytest.raises(CodecError, match="decode it with that codec"):
        CODECS["none"].decode(z)
    for name in ("zstd", "bytegroup", "int8_blockwise"):
        with pytest.raises(CodecError, match="not a coldswarm codec frame"):
            CODECS[name].decode(b"hello world, not compressed at all")
        enc = CODECS[name].encode(data)
        with pytest.raises(CodecError):
            CODECS[name].decode(enc[: len(enc) // 2])  # truncated
    with pytest.raises(CodecError, match="not a safetensors"):
        CODECS["int8_blockwise"].encode(b"plain text")


@pytest.mark.parametrize("name", sorted(CODECS))
def test_decoded_size_limit_is_exact(name):
    data = payload()
    enc = CODECS[name].encode(data)
    assert len(CODECS[name].decode(enc, max_output=len(data))) == len(data)
    with pytest.raises(DecodedTooLarge, match="more than the"):
        CODECS[name].decode(enc, max_output=len(data) - 1)


def test_forged_frames_cannot_expand_past_what_they_declare():
    import struct

    from coldswarm.fusion.codecs import _compress, _frame

    bomb = _compress(bytes(64 * 2**20))  # 64 MiB of zeros: a few KiB on the wire
    assert len(bomb) < 2**16
    one_section = struct.pack("<BI", 1, 1) + struct.pack("<Q", len(bomb)) + bomb
    for name, body in (("zstd", bomb), ("int8_blockwise", bomb), ("bytegroup", one_section)):
        forged = _frame(name, 1000, body)  # declares 1,000 bytes, expands to 64 MiB: damaged or forged
        with pytest.raises(CodecError, match="expands past the .* bytes its frame declares") as info:
            CODECS[name].decode(forged, max_output=10**6)
        assert not isinstance(info.value, DecodedTooLarge)
        with pytest.raises(DecodedTooLarge, match="more than the"):
            CODECS[name].decode(_frame(name, 2**40, body), max_output=10**6)  # declares 1 TiB


def test_int8_index_cannot_declare_more_than_the_frame():
    import json
    import struct

    from coldswarm.fusion.codecs import _compress, _frame

    head = json.dumps(
        {
            "metadata": {},
            "blocksize": 4096,
            "tensors": [{"name": "delta/a", "dtype": "F64", "shape": [2**28], "q": True}],
        }
    ).encode()
    codes = bytes(16)  # a 2 GiB F64 tensor declared in a frame of 1 MiB: refused before dequantising
    raw = struct.pack("<Q", len(head)) + head + struct.pack("<Q", len(codes)) + codes
    forged = _frame("int8_blockwise", 2**20, _compress(raw))
    with pytest.raises(CodecError, match="tensors declare 2147483648 bytes, more than the frame's 1048576"):
        CODECS["int8_blockwise"].decode(forged, max_output=2**30)
    small = json.dumps(
        {
            "metadata": {},
            "blocksize": 4096,
            "tensors": [{"name": "delta/a", "dtype": "F32", "shape": [8], "q": True}],
        }
    ).encode()
    raw = (
        struct.pack("<Q", len(small))
        + small
        + struct.pack("<Q", 4)
        + bytes(4)
        + struct.pack("<Q", 4)
        + bytes(4)
    )
    with pytest.raises(CodecError, match="4 codes for shape"):
        CODECS["int8_blockwise"].decode(_frame("int8_blockwise", 2**20, _compress(raw)), max_output=2**30)


def test_files_and_codec_wrapped_contributions_open_transparently(tmp_path):
    meta = ContributionMeta(form="lora", lora=LoraMeta(r=2, alpha=2))
    p = save_contribution(
        tmp_path / "c.safetensors", {"lora_A/m": torch.ones(2, 3), "lora_B/m": torch.ones(4, 2)}, meta
    )
    for name in ("zstd", "bytegroup", "int8_blockwise"):
        enc = tmp_path / f"c.{name}"
        encode_file(p, enc, name)
        with open_contribution(enc) as c:
            assert c.meta == meta
            torch.testing.assert_close(c.get("lora_B/m"), torch.ones(4, 2), atol=0.01, rtol=0.01)
        decode_file(enc, tmp_path / f"plain-{name}.safetensors")
    assert (tmp_path / "plain-zstd.safetensors").read_bytes() == p.read_bytes()
    (tmp_path / "junk").write_bytes(b"CSWC\x01\x04zstd" + b"\x00" * 20)
    with pytest.raises(ContributionError, match="cannot be read"):
        open_contribution(tmp_path / "junk")
