"""Codecs: bit-exact lossless round trips, measured lossy error, clear failures on garbage, and
decoders that survive fuzzed, truncated and bomb inputs (run in a child process: a crash in C code
would fail the test instead of the test run)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from coldswarm.fusion.bytegroup import BYTEGROUP_VERSION, _split_planes, bytegroup_encode
from coldswarm.fusion.codec_frame import compress, frame
from coldswarm.fusion.codecs import (
    CODECS,
    decode_file,
    encode_file,
    get_codec,
    measure_error,
    sniff,
)
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


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(0, 9), st.integers(1, 7)), min_size=1, max_size=4),
    dtype=st.sampled_from(
        [
            torch.float32,
            torch.bfloat16,
            torch.float16,
            torch.float64,
            torch.int8,
            torch.int16,
            torch.int32,
            torch.int64,
            torch.bool,
            torch.uint8,
        ]
    ),  # fmt: skip
    seed=st.integers(0, 1000),
)
def test_bytegroup_round_trips_any_safetensors(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": (torch.randn(s, generator=g) * 50).to(dtype) for i, s in enumerate(shapes)}
    data = save(tensors)
    assert CODECS["bytegroup"].decode(CODECS["bytegroup"].encode(data)) == data


def test_bytegroup_round_trips_a_dtype_split_by_another():
    # safetensors.torch writes each dtype's tensors together; another writer may interleave them
    g = torch.Generator().manual_seed(3)
    parts = [(n, dt, torch.randn(5000, generator=g).to(getattr(torch, dt.lower()))) for n, dt in
             (("a", "BFLOAT16"), ("b", "FLOAT16"), ("c", "BFLOAT16"))]  # fmt: skip
    header, pos, blobs = {}, 0, []
    for name, dt, t in parts:
        raw = t.view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": {"BFLOAT16": "BF16", "FLOAT16": "F16"}[dt],
            "shape": [5000],
            "data_offsets": [pos, pos + len(raw)],
        }
        pos += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    data = len(head).to_bytes(8, "little") + head + b"".join(blobs)
    assert torch.equal(load(data)["c"], parts[2][2])  # a valid safetensors file
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

    bomb = compress(bytes(64 * 2**20))  # 64 MiB of zeros: a few KiB on the wire
    assert len(bomb) < 2**16
    one_section = struct.pack("<BI", 1, 1) + struct.pack("<Q", len(bomb)) + bomb
    for name, body in (("zstd", bomb), ("int8_blockwise", bomb), ("bytegroup", one_section)):
        forged = frame(name, 1000, body)  # declares 1,000 bytes, expands to 64 MiB: damaged or forged
        with pytest.raises(CodecError, match="expands past the .* bytes its frame declares") as info:
            CODECS[name].decode(forged, max_output=10**6)
        assert not isinstance(info.value, DecodedTooLarge)
        with pytest.raises(DecodedTooLarge, match="more than the"):
            CODECS[name].decode(frame(name, 2**40, body), max_output=10**6)  # declares 1 TiB


def test_int8_index_cannot_declare_more_than_theframe():
    import json
    import struct

    head = json.dumps(
        {
            "metadata": {},
            "blocksize": 4096,
            "tensors": [{"name": "delta/a", "dtype": "F64", "shape": [2**28], "q": True}],
        }
    ).encode()
    codes = bytes(16)  # a 2 GiB F64 tensor declared in a frame of 1 MiB: refused before dequantising
    raw = struct.pack("<Q", len(head)) + head + struct.pack("<Q", len(codes)) + codes
    forged = frame("int8_blockwise", 2**20, compress(raw))
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
    with pytest.raises(CodecError, match="'delta/a''s codes holds 4 bytes, expected 8"):
        CODECS["int8_blockwise"].decode(frame("int8_blockwise", 2**20, compress(raw)), max_output=2**30)


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


# A bytegroup frame of version 1 (written by coldswarm before the sign bit moved): three tensors,
# bf16 delta (6x5), f32 fisher (6x5), i64 steps (3). It must keep decoding to these exact bytes.
V1_SHA256 = "2253cb4746a5065b889d938d25df2308ad499cb6c0698d2cd4845a7a59e1cc0a"
V1_FRAME = base64.b64decode(
    "Q1NXQwEJYnl0ZWdyb3VwnAEAAAAAAAABDwAAAIwAAAAAAAAAKwAAAAAAAAArAAAAAAAAACsAAAAAAAAAKwAAAAAAAAArAAAA"
    "AAAAACsAAAAAAAAAEAAAAAAAAAAQAAAAAAAAABAAAAAAAAAAEAAAAAAAAAAQAAAAAAAAABAAAAAAAAAAEAAAAAAAAAAQAAAA"
    "AAAAACi1L/0k0P0DAOJGGSCgpzn///+g7UdZPFSWNFkCxLY1et7XkS+9SU6QoLJhA+ecpmF6pFRFCiWC1oZ1ilJTIFVCEsZA"
    "LOTlPRumKQ9lnXv5vQOhdXNPhijrGxvk51UNvr4x0e6KdY7bbDQsLMtcAVgECABEfBAwgwwhNRGCFoIfYMwCBG4G0AaLEaRX"
    "KLUv/SQe8QAAhgKT41u7UpKYL74XaKbjJdv2ZTydWeXm5tUGrauksNzVgCi1L/0kHvEAALw8PLy7O7y8PLy8vDw8vDy6uTs9"
    "PLw8PLw8Pby7u5OAuQgotS/9JB7xAACcTATgSFfjhkBTYALAkOyfXWC4/BwuCukjgD0cLlzpoNitKLUv/SQe8QAAq/SjniQ/"
    "Xcnif+eCpqn6F9VdNALZMv6qy2sVVunAq50+zCi1L/0kHvEAANPePAe7Zn7w1gOI/z444Q4i3akFW5AqSQGcRmfDeP+YqWso"
    "tS/9JB7xAAA+Pj89PT8/Pj0/Pj4/Pz4/Pz0+Pz4+Pz8/Pj8+Pj8y+CuZKLUv/SQDGQAAAAEC3WW8Myi1L/0kAxkAAAAAAKSM"
    "r30otS/9JAMZAAAAAACkjK99KLUv/SQDGQAAAAAApIyvfSi1L/0kAxkAAAAAAKSMr30otS/9JAMZAAAAAACkjK99KLUv/SQD"
    "GQAAAAAApIyvfSi1L/0kAxkAAAAAAKSMr30="
)


def test_bytegroup_still_reads_version_1_frames():
    assert V1_FRAME[4] == 1 and BYTEGROUP_VERSION == 2
    out = CODECS["bytegroup"].decode(V1_FRAME, max_output=412)
    assert len(out) == 412 and hashlib.sha256(out).hexdigest() == V1_SHA256
    assert sorted(load(out)) == ["delta/w", "fisher/w", "weight/steps"]
    with pytest.raises(DecodedTooLarge):
        CODECS["bytegroup"].decode(V1_FRAME, max_output=411)
    assert CODECS["bytegroup"].encode(out)[4] == BYTEGROUP_VERSION


def test_bytegroup_top_plane_is_the_exponent():
    # Moving the sign bit below the exponent makes the top byte plane exactly the 8 exponent bits.
    x = torch.tensor([1.0, -1.0, 0.5, -0.375, 2.0**-126, -3e38])
    for dtype, k in ((torch.float32, 4), (torch.bfloat16, 2)):
        words = x.to(dtype).view(torch.uint8).numpy().view(f"<u{k}")
        planes = _split_planes(words, sign_first=True)
        exponents = [127, 127, 126, 125, 1, 254]  # 3e38 = 1.76 * 2**127
        assert planes[-1].tolist() == exponents
        assert (planes[-2] & 1).tolist() == [0, 1, 0, 1, 0, 1]  # the sign, just below


def test_bytegroup_compresses_exponents_better_than_plain_zstd_planes():
    g = torch.Generator().manual_seed(0)
    data = save(
        {f"w{i}": (0.02 * (i + 1) * torch.randn(50_000, generator=g)).to(torch.bfloat16) for i in range(4)}
    )
    literal, plain = bytegroup_encode(data), bytegroup_encode(data, literal_only=False)
    assert CODECS["bytegroup"].decode(literal) == data == CODECS["bytegroup"].decode(plain)
    assert len(literal) < 0.97 * len(plain)  # zstd's fast match finder wastes bits on exponents


@pytest.mark.parametrize("name", sorted(CODECS))
def test_encoders_never_write_to_their_input(name):
    data = payload()
    for source in (bytes(data), bytearray(data)):
        before = bytes(source)
        enc = CODECS[name].encode(source)
        assert bytes(source) == before
        assert bytes(enc) == bytes(CODECS[name].encode(before))  # and the output does not depend on the type


def _v2(sections, orig, layout=1):
    """A bytegroup version-2 frame from [(kind, bytes)] sections (forging helper)."""
    body = struct.pack("<BI", layout, len(sections)) + b"".join(
        struct.pack("<BQ", k, len(s)) for k, s in sections
    )
    return frame("bytegroup", orig, body + b"".join(s for _, s in sections), version=BYTEGROUP_VERSION)


def test_bytegroup_planes_are_bounded_by_the_header():
    head_only = save({"w": torch.zeros(1000, dtype=torch.bfloat16)})
    n = int.from_bytes(head_only[:8], "little")
    header, orig = head_only[: 8 + n], len(head_only)
    head = (1, compress(header))
    good = _v2([head, (0, bytes(1000)), (0, bytes(1000))], orig)
    assert CODECS["bytegroup"].decode(good, max_output=orig) == head_only
    forged = {
        "a raw plane of the wrong size": [head, (0, bytes(999)), (0, bytes(1000))],
        "a plane declaring 64 MiB": [head, (1, compress(bytes(64 * 2**20))), (0, bytes(1000))],
        "a plane with no declared size": [head, (1, _compress_no_size(bytes(1000))), (0, bytes(1000))],
        "a plane followed by another frame": [head, (1, compress(bytes(1000)) * 2), (0, bytes(1000))],
        "one plane too few": [head, (0, bytes(1000))],
        "an unknown section kind": [head, (7, bytes(1000)), (0, bytes(1000))],
        "a raw header": [(0, header), (0, bytes(1000)), (0, bytes(1000))],
    }
    for what, sections in forged.items():
        with pytest.raises(CodecError) as info:
            CODECS["bytegroup"].decode(_v2(sections, orig), max_output=orig)
        assert not isinstance(info.value, DecodedTooLarge), what
    # a header declaring more tensor bytes than the frame: refused before any plane is read
    with pytest.raises(CodecError, match="header is invalid"):
        CODECS["bytegroup"].decode(_v2([head, (0, bytes(1000)), (0, bytes(1000))], orig - 2), max_output=orig)


def _compress_no_size(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(write_content_size=False).compress(data)


# ---------------------------------------------------------------------------------------------
# fuzzing, in a child process


def test_decoders_survive_fuzzing_in_a_child_process():
    """Every decoder, fed truncated, mutated, spliced, garbage and bomb inputs with a 4 MiB limit,
    raises CodecError or returns at most 4 MiB: it never crashes, hangs or allocates without bound."""
    env = {**os.environ, "COLDSWARM_FUZZ_EXAMPLES": os.environ.get("COLDSWARM_FUZZ_EXAMPLES", "1200")}
    proc = subprocess.run(
        [sys.executable, __file__, "--fuzz"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, (
        f"the fuzzing child exited with {proc.returncode} (negative: killed by that signal)\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cases"] >= 1000 and set(report["by_codec"]) == set(CODECS)
    assert report["max_rss_mib"] < 1500, report  # nothing near the 1 TiB and 64 MiB the bombs declare


FUZZ_LIMIT = 4 * 2**20


def _fuzz_main() -> None:
    import resource

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    valid = {name: bytes(CODECS[name].encode(payload())) for name in CODECS}
    g = torch.Generator().manual_seed(1)
    valid["bytegroup-weights"] = bytegroup_encode(
        save({"w": (0.02 * torch.randn(4096, generator=g)).to(torch.bfloat16)})
    )
    valid["bytegroup-v1"] = V1_FRAME
    by_codec: dict[str, int] = {}

    def decode(name: str, blob: bytes) -> None:
        by_codec[name] = by_codec.get(name, 0) + 1
        try:
            out = CODECS[name].decode(blob, max_output=FUZZ_LIMIT)
        except CodecError:
            return
        assert isinstance(out, bytes) and len(out) <= FUZZ_LIMIT, (name, type(out), len(out))

    def header(name: str, orig: int, version: int = 1) -> bytes:
        return frame(name, orig, b"", version=version)

    bombs = [
        ("zstd", frame("zstd", 2**40, compress(bytes(2**20)))),
        ("zstd", frame("zstd", 1000, compress(bytes(64 * 2**20)))),
        ("int8_blockwise", frame("int8_blockwise", 1000, compress(bytes(64 * 2**20)))),
        ("bytegroup", _v2([(1, compress(bytes(64 * 2**20)))], 1000, layout=0)),
        ("bytegroup", _v2([(1, compress(b"\x08" + bytes(7) + b'{"w":{}}'))], 2**40)),
        ("bytegroup", frame("bytegroup", 1000, struct.pack("<BI", 1, 2**32 - 1), version=2)),
        ("bytegroup", frame("bytegroup", 1000, struct.pack("<BI", 1, 2**32 - 1), version=1)),
    ]
    for name, blob in bombs:
        decode(name, blob)

    @settings(max_examples=int(os.environ.get("COLDSWARM_FUZZ_EXAMPLES", "1200")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(source=st.sampled_from(sorted(valid)), how=st.sampled_from(["truncate", "flip", "splice", "garbage", "forged"]),
           data=st.data())  # fmt: skip
    def fuzz(source: str, how: str, data) -> None:
        name = source.split("-")[0]
        enc = valid[source]
        if how == "truncate":
            blob = enc[: data.draw(st.integers(0, max(0, len(enc) - 1)))]
        elif how == "flip":
            b = bytearray(enc)
            for _ in range(data.draw(st.integers(1, 8))):
                b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
            blob = bytes(b)
        elif how == "splice":
            i = data.draw(st.integers(0, len(enc)))
            j = data.draw(st.integers(i, min(len(enc), i + 64)))
            blob = enc[:i] + data.draw(st.binary(max_size=64)) + enc[j:]
        elif how == "garbage":
            blob = data.draw(st.binary(max_size=600))
        else:  # a valid header declaring any size, then garbage or a piece of a valid payload
            orig = data.draw(st.one_of(st.integers(0, 2 * FUZZ_LIMIT), st.integers(0, 2**64 - 1)))
            version = data.draw(st.sampled_from([1, BYTEGROUP_VERSION]))
            tail = data.draw(st.one_of(st.binary(max_size=300), st.just(enc[len(header(name, 0, enc[4])) :])))
            blob = header(name, orig, version) + tail
        decode(name, blob)

    fuzz()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"cases": sum(by_codec.values()), "by_codec": by_codec, "max_rss_mib": round(rss)}))


if __name__ == "__main__" and sys.argv[1:] == ["--fuzz"]:
    _fuzz_main()
