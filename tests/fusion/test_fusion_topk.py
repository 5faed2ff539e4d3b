"""TIES' exact top-k trim against a brute-force reference: per tensor, over a streamed task vector, and
through the whole method; ties at the threshold are broken by index, independent of chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coldswarm.fusion.errors import MergeConfigError
from coldswarm.fusion.methods import METHODS, TensorInputs, TiesConfig, ties_combine
from coldswarm.fusion.topk import GlobalTopK, keep_count, tensor_threshold, trim_into


def reference_keep(values: np.ndarray, k: int) -> np.ndarray:
    """The k entries of largest |value|, ties broken by lower index first (a stable sort)."""
    order = np.argsort(-np.abs(values.astype(np.float64)), kind="stable")
    keep = np.zeros(values.size, dtype=bool)
    keep[order[:k]] = True
    return keep


def random_delta(rng: np.random.Generator, n: int, quantised: bool) -> np.ndarray:
    d = rng.standard_normal(n).astype(np.float32)
    if quantised:  # few distinct magnitudes (like deltas of bf16 weights): many ties at the threshold
        d = np.round(d * 3).astype(np.float32) / 8
    return d


def trimmed_in_chunks(delta: torch.Tensor, thr, rng: np.random.Generator) -> torch.Tensor:
    """Apply ``thr`` over random chunk boundaries, as the driver does with row chunks."""
    out = torch.empty_like(delta)
    cuts = sorted({0, delta.numel(), *rng.integers(0, delta.numel() + 1, size=3).tolist()})
    for s, e in zip(cuts, cuts[1:], strict=False):
        trim_into(delta[s:e], thr, s, out[s:e])
    return out


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 600),
    density=st.floats(0.01, 1.0),
    quantised=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_tensor_threshold_keeps_exactly_the_reference_top_k(n, density, quantised, seed):
    rng = np.random.default_rng(seed)
    d = random_delta(rng, n, quantised)
    k = keep_count(density, n)
    thr = tensor_threshold(torch.from_numpy(d.copy()), k)
    out = trimmed_in_chunks(torch.from_numpy(d), thr, rng).numpy()
    want = np.where(reference_keep(d, k), d, 0)
    np.testing.assert_array_equal(out, want)


def test_tensor_threshold_edge_cases():
    d = torch.tensor([0.5, -0.5, 0.5, 0.1])
    assert tensor_threshold(d, 4) is None  # keep everything
    thr = tensor_threshold(d, 0)
    assert torch.equal(trim_into(d, thr, 0, torch.empty(4)), torch.zeros(4))
    thr = tensor_threshold(d, 2)  # three entries tie at 0.5: keep the first two by index
    assert thr.value == 0.5 and thr.cutoff == 2
    assert trim_into(d, thr, 0, torch.empty(4)).tolist() == [0.5, -0.5, 0.0, 0.0]
    assert torch.equal(d, torch.tensor([0.5, -0.5, 0.5, 0.1]))  # the input is left as it was


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
    untouched=st.integers(0, 400),
    density=st.floats(0.01, 1.0),
    quantised=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_global_top_k_streamed_equals_the_reference_over_the_whole_vector(
    sizes, untouched, density, quantised, seed
):
    """Several tensors fed in chunks over up to three passes (plus ``untouched`` entries of tensors
    never fed, which count as zeros) keep exactly what the brute force keeps on their concatenation."""
    rng = np.random.default_rng(seed)
    tensors = [random_delta(rng, n, quantised) for n in sizes]
    total = sum(sizes) + untouched
    k = keep_count(density, total)
    sel = GlobalTopK(k, total)
    passes = 0
    while sel.wants_pass:
        passes += 1
        for j, t in enumerate(tensors):
            cuts = sorted({0, t.size, *rng.integers(0, t.size + 1, size=2).tolist()})
            for s, e in zip(cuts, cuts[1:], strict=False):
                if sel.wants_pass:
                    sel.feed(j, s, torch.from_numpy(t[s:e].copy()))
        sel.end_pass()
    assert passes <= 3
    flat = np.concatenate([*tensors, np.zeros(untouched, dtype=np.float32)])
    want = np.where(reference_keep(flat, k), flat, 0)[: sum(sizes)]
    got = [
        trimmed_in_chunks(torch.from_numpy(t), sel.threshold(j, t.size), rng).numpy()
        for j, t in enumerate(tensors)
    ]
    np.testing.assert_array_equal(np.concatenate(got), want)


def reference_ties(base, thetas, weights, density, scaling):
    """TIES as the paper states it, in float64 from the fp32 deltas: trim (stable top-k), elect, disjoint mean."""
    deltas = [(t - base).astype(np.float64).ravel() for t in thetas]
    k = keep_count(density, deltas[0].size)
    trimmed = [np.where(reference_keep(d, k), d, 0) for d in deltas]
    rel = np.asarray(weights, np.float64) * len(thetas) / np.sum(weights)
    elected = np.sign(sum(w * t for w, t in zip(rel, trimmed, strict=True)))
    num = sum(
        w * np.where((np.sign(t) == elected) & (t != 0), t, 0) for w, t in zip(rel, trimmed, strict=True)
    )
    den = sum(w * ((np.sign(t) == elected) & (t != 0)) for w, t in zip(rel, trimmed, strict=True))
    merged = np.where(den > 0, num / np.maximum(den, 1e-30), 0)
    return np.asarray(base, np.float64).ravel() + scaling * merged


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.7])
def test_ties_method_equals_the_reference(quantised, density):
    rng = np.random.default_rng(int(density * 100) + quantised)
    base = rng.standard_normal((30, 17)).astype(np.float32)
    thetas = [base + random_delta(rng, base.size, quantised).reshape(base.shape) for _ in range(5)]
    weights = [1.0, 2.0, 0.5, 1.0, 0.5]  # sum 5 = N: relative weights exact, so sums of ties are too
    w = torch.tensor(weights) / sum(weights)
    x = TensorInputs("t", torch.from_numpy(base), [torch.from_numpy(t) for t in thetas], w)
    out = METHODS["ties"](x, TiesConfig(density=density, scaling=0.8))
    want = reference_ties(base, thetas, weights, density, 0.8).reshape(base.shape)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)


def test_ties_combine_blocks_do_not_change_the_result(monkeypatch):
    import coldswarm.fusion.methods as methods

    g = torch.Generator().manual_seed(5)
    deltas = torch.randn(4, 1000, generator=g)
    w = torch.tensor([1.0, 2.0, 1.0, 0.5])
    whole = ties_combine(deltas.clone(), w, [None] * 4)
    monkeypatch.setattr(methods, "TIES_BLOCK_ENTRIES", 4 * 37)  # blocks of 37 entries
    torch.testing.assert_close(ties_combine(deltas.clone(), w, [None] * 4), whole)


def test_ties_global_trim_needs_the_driver():
    x = TensorInputs("t", torch.zeros(3), [torch.ones(3)], torch.ones(1))
    with pytest.raises(MergeConfigError, match="pre-pass"):
        METHODS["ties"](x, TiesConfig(trim="global"))
    with pytest.raises(MergeConfigError, match="trim"):
        TiesConfig(trim="model")
