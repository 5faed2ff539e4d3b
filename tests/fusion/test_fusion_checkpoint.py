"""Checkpoint I/O: single and sharded safetensors, row reads, atomic streaming writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from coldswarm.fusion.checkpoint import (
    INDEX_FILE,
    CheckpointReader,
    ModelDirWriter,
    SafetensorsFile,
    dtype_from_name,
    write_model_dir,
)
from coldswarm.fusion.errors import CheckpointError


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g),
        "b.weight": torch.randn(7, 2, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(4, generator=g).half(),
        "step": torch.tensor(3, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def test_reader_matches_safetensors_and_reads_rows(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref = load_file(tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as r:
        assert set(r.names()) == set(tensors)
        assert r.metadata == {"format": "pt"}
        for n, t in ref.items():
            assert r.shape(n) == tuple(t.shape) and r.dtype(n) == t.dtype
            assert torch.equal(r.get(n), t)
        torch.testing.assert_close(r.get_rows("a.weight", 1, 4), ref["a.weight"][1:4])
        assert r.get("b.weight", torch.float32).dtype == torch.float32
        assert r.layout() == {"model.safetensors": r.names()}


def test_sharded_write_and_read_round_trip(tmp_path):
    tensors = sample_tensors()
    out = write_model_dir(tmp_path / "m", tensors, max_shard_bytes=64)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(".safetensors") for s in shards)
    for s in shards:  # every shard is a valid safetensors file for the reference parser
        with safe_open(str(out / s), "pt") as f:
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), tensors[k])
    with CheckpointReader(out) as r:
        assert set(r.names()) == set(tensors)
        for n, t in tensors.items():
            assert torch.equal(r.get(n), t)


def test_writer_is_atomic_and_refuses_to_clobber(tmp_path):
    specs = {"x": (torch.float32, (4,))}
    with pytest.raises(RuntimeError, match="boom"):
        with ModelDirWriter(tmp_path / "out", {"model.safetensors": specs}) as w:
            w.write("x", torch.ones(4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no output, no temp dir left behind
    with pytest.raises(CheckpointError, match="not .*written"):
        with ModelDirWriter(tmp_path / "out", {"model.safetensors": specs}):
            pass  # forgot to write x
    assert list(tmp_path.iterdir()) == []
    write_model_dir(tmp_path / "out", {"x": torch.ones(4)})
    with pytest.raises(CheckpointError, match="already exists"):
        write_model_dir(tmp_path / "out", {"x": torch.ones(4)})
    write_model_dir(tmp_path / "out", {"x": torch.zeros(4)}, overwrite=True)
    with CheckpointReader(tmp_path / "out") as r:
        assert torch.equal(r.get("x"), torch.zeros(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_rows_written_out_of_order_and_shape_checks(tmp_path):
    specs = {"w": (torch.bfloat16, (6, 2)), "s": (torch.float32, ())}
    with ModelDirWriter(tmp_path / "o", {"model.safetensors": specs}) as w:
        w.write_rows("w", 3, torch.full((3, 2), 2.0))
        w.write_rows("w", 0, torch.full((3, 2), 1.0))
        w.write("s", torch.tensor(5.0))
        with pytest.raises(CheckpointError, match="shape"):
            w.write("s", torch.ones(2))
    t = load_file(tmp_path / "o" / "model.safetensors")
    assert t["w"].dtype == torch.bfloat16 and t["w"][:3].eq(1).all() and t["w"][3:].eq(2).all()
    assert t["s"].item() == 5.0


def test_copies_non_weight_files_only(t5_dir, tmp_path):
    with CheckpointReader(t5_dir) as r:
        tensors = {n: r.get(n) for n in r.names()}
    out = write_model_dir(tmp_path / "copy", tensors, base_dir=t5_dir)
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "spiece.model" in names and "model.safetensors" in names
    assert "coldswarm-manifest.json" not in names  # the base's manifest describes the base
    from transformers import T5ForConditionalGeneration

    m = T5ForConditionalGeneration.from_pretrained(out)
    assert torch.equal(m.shared.weight, tensors["shared.weight"])


def test_garbage_and_missing_inputs_fail_clearly(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="no such model"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected model.safetensors"):
        CheckpointReader(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="unknown dtype"):
        dtype_from_name("float13")
    assert dtype_from_name("bf16") is torch.bfloat16 and dtype_from_name("F32") is torch.float32


def test_safetensors_file_does_not_keep_pages_mapped(tmp_path):
    """Reads go through pread into fresh buffers: a read tensor is independent of the file."""
    save_file({"x": torch.arange(10.0)}, tmp_path / "f.safetensors")
    f = SafetensorsFile(tmp_path / "f.safetensors")
    x = f.get("x")
    f.close()
    (tmp_path / "f.safetensors").unlink()
    assert torch.equal(x, torch.arange(10.0))
    with pytest.raises(CheckpointError, match="after close"):
        f.get("x")
