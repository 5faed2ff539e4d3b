"""The streaming merge driver end to end on small checkpoints, and its failure modes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from coldswarm.fusion.checkpoint import CheckpointReader, write_model_dir
from coldswarm.fusion.contribution import ContributionMeta, LoraMeta, save_contribution
from coldswarm.fusion.errors import ContributionError, MergeConfigError
from coldswarm.fusion.merge import MergeOptions, merge_checkpoints
from coldswarm.fusion.methods import METHODS
from coldswarm.fusion.topk import keep_count

SHAPES = {"emb.weight": (40, 8), "lin.weight": (6, 8), "lin.bias": (6,), "norm.weight": (8,), "scale": ()}


def make_base(path, dtype=torch.float32, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}
    tensors["steps"] = torch.tensor([7], dtype=torch.int64)  # a non-float buffer rides along untouched
    write_model_dir(path, tensors, **kw)
    (path / "config.json").write_text("{}")
    return tensors


def make_contributions(tmp_path, base, n=3, form="full", seed=1, with_stats=True, skip=()):
    g = torch.Generator().manual_seed(seed)
    paths, thetas = [], []
    for i in range(n):
        tensors, theta = {}, {}
        for name, b in base.items():
            if not b.is_floating_point() or name in skip:
                continue
            t = b.float() + 0.1 * (i + 1) * torch.randn(b.shape, generator=g)
            theta[name] = t
            tensors[f"{'weight' if form == 'full' else 'delta'}/{name}"] = (
                t if form == "full" else t - b.float()
            )
            if with_stats:
                tensors[f"fisher/{name}"] = torch.rand(b.shape, generator=g)
        if with_stats:
            x = torch.randn(20, 8, generator=g)
            tensors["gram/lin"] = x.T @ x / 20
        meta = ContributionMeta(form=form, base_version=3, num_examples=10 * (i + 1))
        paths.append(save_contribution(tmp_path / f"c{i}.safetensors", tensors, meta))
        thetas.append(theta)
    return paths, thetas


def read_all(path):
    with CheckpointReader(path) as r:
        return {n: r.get(n) for n in r.names()}


def test_average_of_full_contributions(tmp_path):
    base = make_base(tmp_path / "base")
    paths, thetas = make_contributions(tmp_path, base, n=3)
    report = merge_checkpoints(tmp_path / "base", paths, "average", {}, tmp_path / "out")
    out = read_all(tmp_path / "out")
    for name in SHAPES:
        torch.testing.assert_close(out[name], sum(t[name] for t in thetas) / 3)
    assert torch.equal(out["steps"], base["steps"])
    assert (tmp_path / "out" / "config.json").exists()
    assert report["method"] == "average" and report["tensors"] == {"total": 6, "merged": 5, "copied": 1}
    assert report["used"] == [str(p) for p in paths] and report["dropped"] == []
    json.dumps(report)  # the report is JSON-able (the coordinator stores it)


def test_examples_weighting_bf16_base_and_delta_form(tmp_path):
    base = make_base(tmp_path / "base", dtype=torch.bfloat16)
    paths, thetas = make_contributions(tmp_path, base, n=2, form="delta", with_stats=False)
    merge_checkpoints(tmp_path / "base", paths, "average", {"weighting": "examples"}, tmp_path / "out")
    out = read_all(tmp_path / "out")
    assert out["emb.weight"].dtype == torch.bfloat16  # written back in the base's dtype
    expected = (thetas[0]["emb.weight"] * 10 + thetas[1]["emb.weight"] * 20) / 30
    torch.testing.assert_close(out["emb.weight"], expected.to(torch.bfloat16))
    merge_checkpoints(tmp_path / "base", paths, "average", {"out_dtype": "float32"}, tmp_path / "out32")
    assert read_all(tmp_path / "out32")["emb.weight"].dtype == torch.float32


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunked_merge_equals_whole_tensor_merge(tmp_path, method):
    """Row chunking (bounded memory) must not change any method's result."""
    base = make_base(tmp_path / "base")
    paths, _ = make_contributions(tmp_path, base, n=3)
    merge_checkpoints(tmp_path / "base", paths, method, {}, tmp_path / "whole")
    merge_checkpoints(tmp_path / "base", paths, method, {"chunk_mb": 1e-4}, tmp_path / "chunked")
    a, b = read_all(tmp_path / "whole"), read_all(tmp_path / "chunked")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fisher_normalisation_and_method_options(tmp_path):
    base = make_base(tmp_path / "base")
    paths, _ = make_contributions(tmp_path, base, n=2)
    r = merge_checkpoints(
        tmp_path / "base", paths, "fisher", {"normalize": True, "eps": 1e-8}, tmp_path / "o"
    )
    assert r["method_options"] == {"eps": 1e-8, "normalize": True}
    with pytest.raises(MergeConfigError, match="unknown option"):
        merge_checkpoints(tmp_path / "base", paths, "fisher", {"density": 0.2}, tmp_path / "o2")
    with pytest.raises(MergeConfigError, match="choose one of"):
        merge_checkpoints(tmp_path / "base", paths, "fishr", {}, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_regmean_through_the_driver_and_fallback_report(tmp_path):
    base = make_base(tmp_path / "base")
    paths, thetas = make_contributions(tmp_path, base, n=2)
    r = merge_checkpoints(tmp_path / "base", paths, "regmean", {"alpha": 1.0}, tmp_path / "o")
    out = read_all(tmp_path / "o")
    assert r["regmean_fallback_to_average"] == ["emb.weight"]  # no gram/emb
    torch.testing.assert_close(out["emb.weight"], (thetas[0]["emb.weight"] + thetas[1]["emb.weight"]) / 2)
    assert not torch.allclose(out["lin.weight"], (thetas[0]["lin.weight"] + thetas[1]["lin.weight"]) / 2)


def test_lora_contribution_merges_with_full_ones(tmp_path):
    base = make_base(tmp_path / "base")
    paths, thetas = make_contributions(tmp_path, base, n=1, with_stats=False)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    lora = save_contribution(tmp_path / "lora.safetensors", {"lora_A/lin": a, "lora_B/lin": b},
                             ContributionMeta(form="lora", lora=LoraMeta(r=2, alpha=4)))  # fmt: skip
    merge_checkpoints(tmp_path / "base", [paths[0], lora], "average", {}, tmp_path / "o")
    out = read_all(tmp_path / "o")
    lora_theta = base["lin.weight"] + b @ a * 2
    torch.testing.assert_close(out["lin.weight"], (thetas[0]["lin.weight"] + lora_theta) / 2)
    torch.testing.assert_close(out["norm.weight"], (thetas[0]["norm.weight"] + base["norm.weight"]) / 2)


def test_screening_drops_and_clips_outliers(tmp_path):
    base = make_base(tmp_path / "base")
    paths, thetas = make_contributions(tmp_path, base, n=3, with_stats=False)
    huge = {f"delta/{n}": 50 * torch.ones(s) for n, s in SHAPES.items()}
    bad = save_contribution(tmp_path / "bad.safetensors", huge, ContributionMeta(form="delta"))
    r = merge_checkpoints(tmp_path / "base", [*paths, bad], "average", {"screen": "drop"}, tmp_path / "drop")
    assert r["dropped"] == [str(bad)] and r["flagged"] == [str(bad)]
    out = read_all(tmp_path / "drop")
    torch.testing.assert_close(out["emb.weight"], sum(t["emb.weight"] for t in thetas) / 3)
    r = merge_checkpoints(tmp_path / "base", [*paths, bad], "average", {"screen": {"action": "clip", "threshold": 2}},
                          tmp_path / "clip")  # fmt: skip
    assert r["clipped"] == [str(bad)]
    entry = next(c for c in r["contributions"] if c["key"] == str(bad))
    assert entry["norm_ratio"] > 2 and entry["screen"] == "clip"


def test_bad_contributions_fail_before_anything_is_written(tmp_path):
    base = make_base(tmp_path / "base")
    paths, _ = make_contributions(tmp_path, base, n=2, with_stats=False)
    nan = save_contribution(tmp_path / "nan.safetensors", {"delta/lin.bias": torch.tensor([float("nan")] * 6)},
                            ContributionMeta(form="delta", base_version=3))  # fmt: skip
    with pytest.raises(ContributionError, match=r"'nan-upload'.*lin\.bias.*NaN"):
        merge_checkpoints(
            tmp_path / "base", [paths[0], nan], "average", {}, tmp_path / "o", keys=["a", "nan-upload"]
        )
    with pytest.raises(ContributionError, match="base version 3, not the current base 4"):
        merge_checkpoints(tmp_path / "base", paths, "average", {}, tmp_path / "o", base_version=4)
    with pytest.raises(MergeConfigError, match="unique"):
        merge_checkpoints(tmp_path / "base", paths, "average", {}, tmp_path / "o", keys=["a", "a"])
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_options_parse_splits_driver_and_method_keys():
    o = MergeOptions.parse({"weighting": "examples", "density": 0.3, "screen": "flag"})
    assert o.weighting == "examples" and o.method == {"density": 0.3} and o.screen.action == "flag"
    with pytest.raises(MergeConfigError, match="weighting"):
        MergeOptions.parse({"weighting": "size"})


def test_merged_t5_loads_with_from_pretrained(t5_dir, tmp_path):
    from transformers import T5ForConditionalGeneration

    with CheckpointReader(t5_dir) as r:
        q = "encoder.block.0.layer.0.SelfAttention.q.weight"
        d = torch.randn(r.shape(q))
    c = save_contribution(tmp_path / "c.safetensors", {f"delta/{q}": d}, ContributionMeta(form="delta"))
    merge_checkpoints(t5_dir, [c], "task_arithmetic", {"scaling": 0.5}, tmp_path / "v1")
    m = T5ForConditionalGeneration.from_pretrained(tmp_path / "v1")
    base = T5ForConditionalGeneration.from_pretrained(t5_dir)
    torch.testing.assert_close(m.state_dict()[q], base.state_dict()[q] + 0.5 * d)
    assert (tmp_path / "v1" / "spiece.model").exists()


def test_streaming_memory_is_bounded_by_chunks_not_contributions(tmp_path):
    """Merging 6 full contributions of a 32 MiB model must not grow a fresh process by one model's size
    (loading them all would take 224 MiB)."""
    names = [f"layer{i}.weight" for i in range(8)]

    def gen(seed):  # 8 tensors x 4 MiB; cheap values: this measures memory, not math
        return {n: torch.full((1024, 1024), float(seed + j)) for j, n in enumerate(names)}

    write_model_dir(tmp_path / "base", gen(0))
    for i in range(6):
        save_contribution(tmp_path / f"c{i}.safetensors", {f"weight/{n}": t for n, t in gen(i + 1).items()},
                          ContributionMeta(form="full"))  # fmt: skip
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        import torch
        from coldswarm.fusion.merge import merge_checkpoints
        def status(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
        root = Path({str(tmp_path)!r})
        before = status("VmRSS")
        merge_checkpoints(root / "base", [root / f"c{{i}}.safetensors" for i in range(6)], "average",
                          {{"chunk_mb": 8}}, root / "out")
        print("RESULT", before, status("VmHWM"))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(line for line in res.stdout.splitlines() if line.startswith("RESULT"))
    _, before_kb, hwm_kb = line.split()
    model_kb = 8 * 1024 * 1024 * 4 // 1024
    grew = int(hwm_kb) - int(before_kb)
    assert grew < model_kb, (
        f"merge grew the process by {grew // 1024} MiB; one model is {model_kb // 1024} MiB"
    )
    torch.testing.assert_close(read_all(tmp_path / "out")["layer0.weight"], torch.full((1024, 1024), 3.5))


def _quantised_full_contributions(tmp_path, base, n):
    """Full-weight contributions whose deltas take few distinct values (many ties at any threshold)."""
    g = torch.Generator().manual_seed(9)
    paths, deltas = [], []
    for i in range(n):
        tensors, delta = {}, {}
        for name, b in base.items():
            if b.is_floating_point():
                t = b + torch.round(torch.randn(b.shape, generator=g) * 3) / 8
                tensors[f"weight/{name}"] = t
                delta[name] = t - b  # fp32, as the driver computes it
        paths.append(
            save_contribution(tmp_path / f"q{i}.safetensors", tensors, ContributionMeta(form="full"))
        )
        deltas.append(delta)
    return paths, deltas


def _reference_ties(base, deltas, density, trim):
    """Brute-force TIES over {name: tensor} deltas (float64): stable top-k per tensor or over the
    concatenation of every float tensor in base order, then sign election and disjoint mean."""
    from test_fusion_topk import reference_keep

    names = [n for n, b in base.items() if b.is_floating_point()]
    flat = [np.concatenate([d[n].double().numpy().ravel() for n in names]) for d in deltas]
    sizes = [base[n].numel() for n in names]
    if trim == "global":
        kept = [np.where(reference_keep(f, keep_count(density, f.size)), f, 0) for f in flat]
    else:
        kept = []
        for f in flat:
            parts = np.split(f, np.cumsum(sizes)[:-1])
            kept.append(
                np.concatenate(
                    [np.where(reference_keep(p, keep_count(density, p.size)), p, 0) for p in parts]
                )
            )
    total = sum(kept)
    agree = [(np.sign(k) == np.sign(total)) & (k != 0) for k in kept]
    num = sum(np.where(a, k, 0) for a, k in zip(agree, kept, strict=True))
    den = sum(a.astype(np.float64) for a in agree)
    merged = np.split(np.where(den > 0, num / np.maximum(den, 1), 0), np.cumsum(sizes)[:-1])
    return {
        n: base[n].double() + torch.from_numpy(m).reshape(base[n].shape)
        for n, m in zip(names, merged, strict=True)
    }


@pytest.mark.parametrize("trim", ["tensor", "global"])
@pytest.mark.parametrize("chunk_mb", [64, 1e-4])
def test_ties_through_the_driver_equals_brute_force(tmp_path, trim, chunk_mb):
    """Exactly k entries kept per tensor (trim='tensor') or per task vector (trim='global'), ties at
    the threshold broken by index: the result is the reference's whether or not tensors are chunked."""
    base = make_base(tmp_path / "base")
    paths, deltas = _quantised_full_contributions(tmp_path, base, 3)
    opts = {"density": 0.3, "trim": trim, "chunk_mb": chunk_mb}
    r = merge_checkpoints(tmp_path / "base", paths, "ties", opts, tmp_path / "out")
    out = read_all(tmp_path / "out")
    for name, want in _reference_ties(base, deltas, 0.3, trim).items():
        torch.testing.assert_close(out[name].double(), want, rtol=1e-6, atol=1e-6, msg=name)
    assert r["method_options"]["trim"] == trim
    if trim == "global":
        assert r["timings"]["prepass_s"] > 0


def test_ties_keeps_exactly_k_entries_of_a_tied_delta(tmp_path):
    """One contribution: the merge is base + its trimmed delta, so the number of changed entries is
    the number kept -- round(density * n) per tensor, although most magnitudes tie."""
    base = make_base(tmp_path / "base")
    paths, deltas = _quantised_full_contributions(tmp_path, base, 1)
    for chunk_mb in (64, 1e-4):
        out_dir = tmp_path / f"out-{chunk_mb}"
        merge_checkpoints(tmp_path / "base", paths, "ties", {"density": 0.2, "chunk_mb": chunk_mb}, out_dir)
        out = read_all(out_dir)
        n = base["emb.weight"].numel()
        nonzero = int((deltas[0]["emb.weight"] != 0).sum())
        changed = int((out["emb.weight"] != base["emb.weight"]).sum())
        assert changed == min(keep_count(0.2, n), nonzero)


def test_regmean_over_several_layers_through_the_driver_equals_the_closed_form(tmp_path):
    """Each layer's Grams are read ahead on the reader thread while the previous layer is solved; every
    layer still gets its own Grams: the result is the fp64 closed form layer by layer (a layer without
    Grams in between is averaged and does not shift the prefetch)."""
    from test_fusion_methods import _correlated_grams, _regmean_closed_form

    shapes = {"a.weight": (12, 16), "b.weight": (10, 12), "mid.weight": (10, 10), "c.weight": (6, 10)}
    g = torch.Generator().manual_seed(3)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    write_model_dir(tmp_path / "base", base)
    (tmp_path / "base" / "config.json").write_text("{}")
    layers = [n for n in shapes if n != "mid.weight"]
    grams = {
        n: _correlated_grams(shapes[n][1], 3, rank=shapes[n][1] // 2, seed=i) for i, n in enumerate(layers)
    }
    paths, thetas = [], []
    for i in range(3):
        theta = {n: b + 0.1 * torch.randn(b.shape, generator=g) for n, b in base.items()}
        tensors = {f"weight/{n}": t for n, t in theta.items()}
        tensors.update({f"gram/{n.removesuffix('.weight')}": grams[n][i] for n in layers})
        meta = ContributionMeta(form="full", num_examples=10 * (i + 1))
        paths.append(save_contribution(tmp_path / f"c{i}.safetensors", tensors, meta))
        thetas.append(theta)
    r = merge_checkpoints(
        tmp_path / "base", paths, "regmean", {"alpha": 0.9, "weighting": "examples"}, tmp_path / "out"
    )
    assert r["regmean_fallback_to_average"] == ["mid.weight"]
    out = read_all(tmp_path / "out")
    for n in layers:
        want = _regmean_closed_form([t[n] for t in thetas], grams[n], [10, 20, 30], 0.9).float()
        torch.testing.assert_close(out[n], want, atol=1e-4, rtol=1e-4, msg=n)
    torch.testing.assert_close(
        out["mid.weight"], sum(w * t["mid.weight"] for w, t in zip([1, 2, 3], thetas, strict=True)) / 6
    )
