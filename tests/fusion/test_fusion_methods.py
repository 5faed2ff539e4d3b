"""Merge methods against closed forms, hand-worked examples and order invariance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coldswarm.fusion.errors import MergeConfigError, MergeError
from coldswarm.fusion.methods import (
    METHODS,
    DareConfig,
    FisherConfig,
    RegMeanConfig,
    TensorInputs,
    TiesConfig,
    TrimmedMeanConfig,
    get_method,
)
from coldswarm.fusion.screening import ScreenConfig, screen_norms


def inputs(base, thetas, weights=None, **kw) -> TensorInputs:
    n = len(thetas)
    w = torch.full((n,), 1.0 / n) if weights is None else torch.tensor(weights, dtype=torch.float32)
    w = w / w.sum()
    return TensorInputs(
        name=kw.pop("name", "layer.weight"),
        base=base,
        thetas=thetas,
        weights=w,
        keys=kw.pop("keys", [f"c{i}" for i in range(n)]),
        **kw,
    )


def test_registry_entries_are_complete():
    assert set(METHODS) == {
        "average",
        "fisher",
        "regmean",
        "task_arithmetic",
        "ties",
        "dare",
        "median",
        "trimmed_mean",
    }
    for name, m in METHODS.items():
        assert m.name == name
        assert m.paper.startswith("https://arxiv.org/abs/")
        assert m.summary
        m.make_config({})  # defaults are valid
        if m.fallback is not None:  # the driver runs it where m's statistics are missing: it needs none
            fb = METHODS[m.fallback]
            assert fb.fallback is None and not fb.needs_gram and not fb.needs_fisher and fb.chunkable


def test_unknown_method_and_option_errors_name_the_choices():
    with pytest.raises(MergeConfigError, match="choose one of"):
        get_method("mean")
    with pytest.raises(MergeConfigError, match="unknown option"):
        METHODS["ties"].make_config({"densty": 0.3})
    with pytest.raises(MergeConfigError, match="density"):
        METHODS["ties"].make_config({"density": 0})
    with pytest.raises(MergeConfigError, match="combination"):
        DareConfig(combination="max")
    with pytest.raises(MergeConfigError, match="alpha"):
        RegMeanConfig(alpha=2)
    with pytest.raises(MergeConfigError, match="eps"):
        FisherConfig(eps=0)
    with pytest.raises(MergeConfigError, match="trim"):
        TrimmedMeanConfig(trim=0.5)


def test_average_weighted():
    base = torch.zeros(4)
    a, b = torch.ones(4), torch.full((4,), 4.0)
    out = METHODS["average"](inputs(base, [a, b], weights=[3, 1]))
    torch.testing.assert_close(out, torch.full((4,), 1.75))


def test_fisher_equal_fishers_give_the_average():
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(5, 3, generator=g) for _ in range(3)]
    f = torch.rand(5, 3, generator=g) + 0.1
    out = METHODS["fisher"](inputs(torch.zeros(5, 3), thetas, weights=[1, 2, 3], fishers=[f, f, f]))
    avg = METHODS["average"](inputs(torch.zeros(5, 3), thetas, weights=[1, 2, 3]))
    torch.testing.assert_close(out, avg)


def test_fisher_one_hot_fishers_select_one_model():
    g = torch.Generator().manual_seed(1)
    thetas = [torch.randn(6, generator=g) for _ in range(3)]
    owner = torch.tensor([0, 1, 2, 0, 1, 2])
    fishers = [(owner == i).float() for i in range(3)]
    out = METHODS["fisher"](inputs(torch.zeros(6), thetas, fishers=fishers))
    expected = torch.stack(thetas)[owner, torch.arange(6)]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fisher_missing_everywhere_is_the_average():
    thetas = [torch.ones(3), 3 * torch.ones(3)]
    out = METHODS["fisher"](inputs(torch.zeros(3), thetas, fishers=[None, None]))
    torch.testing.assert_close(out, 2 * torch.ones(3))


def test_regmean_recovers_pooled_least_squares():
    """N datasets of a linear regression; each contribution is its own least-squares fit; RegMean
    (alpha=1, weights proportional to dataset size) equals least squares on the pooled data."""
    g = torch.Generator().manual_seed(2)
    d_in, d_out = 6, 4
    sizes = [40, 25, 60]
    xs, ys, ws, grams = [], [], [], []
    for i, n in enumerate(sizes):
        x = torch.randn(n, d_in, generator=g, dtype=torch.float64) + 0.3 * i  # different input distributions
        w_true = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        y = x @ w_true.T + 0.1 * torch.randn(n, d_out, generator=g, dtype=torch.float64)
        w_i = torch.linalg.lstsq(x, y).solution.T  # (out, in)
        xs.append(x)
        ys.append(y)
        ws.append(w_i.float())
        grams.append((x.T @ x / n).float())  # mean of x^T x, as collect_gram stores it
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    pooled = torch.linalg.lstsq(x_all, y_all).solution.T.float()
    out = METHODS["regmean"](
        inputs(torch.zeros(d_out, d_in), ws, weights=sizes, grams=grams), RegMeanConfig(alpha=1.0)
    )
    torch.testing.assert_close(out, pooled, atol=1e-4, rtol=1e-4)
    # with the default alpha=0.9 it is between the pooled solution and the average, not equal to either
    out9 = METHODS["regmean"](inputs(torch.zeros(d_out, d_in), ws, weights=sizes, grams=grams))
    assert not torch.allclose(out9, pooled, atol=1e-3)


def _regmean_closed_form(ws, grams, weights, alpha, ridge=0.0):
    """sum_i w_i G~_i W*^T = sum_i w_i G~_i W_i^T solved in float64 (the reference)."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)

    def tilde(g):
        t = g.double() * alpha
        t.diagonal().copy_(g.double().diagonal())
        return t

    a = sum(wi * tilde(g) for wi, g in zip(w, grams, strict=True))
    b = sum(wi * tilde(g) @ t.double().T for wi, g, t in zip(w, grams, ws, strict=True))
    if ridge:
        lam = ridge * a.diagonal().mean()
        a.diagonal().add_(lam)
        b = b + lam * sum(wi * t.double() for wi, t in zip(w, ws, strict=True)).T
    return torch.linalg.solve(a, b).T


def _correlated_grams(d_in, n, rank, seed):
    """Grams of rank-deficient, correlated inputs with a decaying spectrum (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        z = torch.randn(4 * d_in, rank, generator=g, dtype=torch.float64)
        m = torch.randn(rank, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -3, rank)[:, None]
        x = z @ m + 1e-3 * torch.randn(4 * d_in, d_in, generator=g, dtype=torch.float64)
        out.append((x.T @ x / x.shape[0]).float())
    return out


def test_regmean_fp32_solve_agrees_with_the_fp64_closed_form(monkeypatch):
    """Well-conditioned layers are solved in fp32 and agree with the fp64 closed form at the tolerance
    of the pooled least-squares test; ill-conditioned ones fall back to fp64 (where fp32 would miss)."""
    import coldswarm.fusion.methods as methods

    g = torch.Generator().manual_seed(11)
    grams = _correlated_grams(256, 4, rank=48, seed=4)
    ws = [0.05 * torch.randn(96, 256, generator=g) for _ in range(4)]
    weights = [1.0, 2.0, 1.0, 3.0]
    for alpha in (0.9, 0.5):  # well conditioned once Jacobi-scaled: the fp32 path
        x = inputs(torch.zeros(96, 256), ws, weights=weights, grams=grams)
        out = METHODS["regmean"](x, RegMeanConfig(alpha=alpha))
        assert methods._regmean_fp32(x, RegMeanConfig(alpha=alpha), out) is not None
        want = _regmean_closed_form(ws, grams, weights, alpha).float()
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    # alpha=1 with a tiny ridge: condition ~1e5; fp32 alone would miss, the fallback matches tightly
    cfg = RegMeanConfig(alpha=1.0, ridge=1e-5)
    want = _regmean_closed_form(ws, grams, weights, 1.0, ridge=1e-5).float()
    x = inputs(torch.zeros(96, 256), ws, weights=weights, grams=grams)
    torch.testing.assert_close(METHODS["regmean"](x, cfg), want, atol=1e-6, rtol=1e-5)
    assert methods._regmean_fp32(x, cfg, want) is None
    monkeypatch.setattr(methods, "REGMEAN_FP32_MAX_COND", float("inf"))  # force fp32: it does miss
    assert not torch.allclose(METHODS["regmean"](x, cfg), want, atol=1e-6, rtol=1e-5)


def test_regmean_non_linear_or_missing_grams_average():
    thetas = [torch.ones(4), 3 * torch.ones(4)]
    out = METHODS["regmean"](inputs(torch.zeros(4), thetas, grams=[None, None]))
    torch.testing.assert_close(out, 2 * torch.ones(4))
    w = [torch.ones(2, 3), 3 * torch.ones(2, 3)]
    out = METHODS["regmean"](inputs(torch.zeros(2, 3), w, grams=[torch.eye(3), None]))
    torch.testing.assert_close(out, 2 * torch.ones(2, 3))


def test_regmean_dead_input_dims_take_the_average_and_singular_systems_fail_clearly():
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(2, 3, generator=g) for _ in range(2)]
    gram = torch.diag(torch.tensor([1.0, 2.0, 0.0]))  # input 2 is never non-zero
    out = METHODS["regmean"](inputs(torch.zeros(2, 3), w, grams=[gram, gram]))
    torch.testing.assert_close(out[:, 2], (w[0][:, 2] + w[1][:, 2]) / 2)
    torch.testing.assert_close(out[:, :2], (w[0][:, :2] + w[1][:, :2]) / 2)  # equal Grams -> average
    # two perfectly collinear inputs with alpha=1: the system is singular
    v = torch.tensor([1.0, 1.0, 0.5])
    sing = torch.outer(v, v)
    with pytest.raises(MergeError, match="ridge"):
        METHODS["regmean"](inputs(torch.zeros(2, 3), w, grams=[sing, sing]), RegMeanConfig(alpha=1.0))
    out = METHODS["regmean"](
        inputs(torch.zeros(2, 3), w, grams=[sing, sing]), RegMeanConfig(alpha=1.0, ridge=1e-3)
    )
    assert torch.isfinite(out).all()


def test_task_arithmetic_is_scaled_sum_of_deltas():
    base = torch.ones(3)
    thetas = [base + torch.tensor([1.0, 0, 0]), base + torch.tensor([0, 2.0, 0])]
    out = METHODS["task_arithmetic"](
        inputs(base, thetas), METHODS["task_arithmetic"].make_config({"scaling": 0.5})
    )
    torch.testing.assert_close(out, torch.tensor([1.5, 2.0, 1.0]))


def test_ties_hand_worked_3x3():
    t1 = torch.tensor([[1, -2, 0.5], [3, 0.1, -1], [0, 2, -0.2]])
    t2 = torch.tensor([[-1, -1, 2], [1, 0.3, 0.4], [-3, 0.2, 1]])
    t3 = torch.tensor([[2, 1, -0.5], [-2, 0.4, 0.1], [1, -1, 0.05]])
    # density 2/3 keeps 6 of 9 per delta; elected signs from the sum of the trimmed deltas
    # [[2,-2,2],[2,0,-1],[-2,1,1]]; disjoint means worked by hand:
    expected = torch.tensor([[1.5, -1.5, 1.25], [2.0, 0.0, -1.0], [-3.0, 2.0, 1.0]])
    base = torch.full((3, 3), 10.0)
    out = METHODS["ties"](inputs(base, [base + t for t in (t1, t2, t3)]), TiesConfig(density=2 / 3))
    torch.testing.assert_close(out, base + expected)


def test_dare_expectation_seeding_and_density_one():
    base = torch.zeros(20000)
    delta = torch.linspace(-1, 1, 20000)
    x = inputs(base, [base + delta], name="w")
    a = METHODS["dare"](x, DareConfig(density=0.3, seed=7))
    b = METHODS["dare"](x, DareConfig(density=0.3, seed=7))
    c = METHODS["dare"](x, DareConfig(density=0.3, seed=8))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02
    nz = a != 0
    torch.testing.assert_close(a[nz], delta[nz] / 0.3)  # survivors rescaled by 1/density
    # unbiased: the mean over many seeds approaches the delta
    mean = torch.stack([METHODS["dare"](x, DareConfig(density=0.5, seed=s)) for s in range(200)]).mean(0)
    assert (mean - delta).abs().mean() < 0.05
    torch.testing.assert_close(METHODS["dare"](x, DareConfig(density=1.0)), delta)
    # ties combination with density 1 is the TIES disjoint mean without trimming
    y = inputs(base[:3], [torch.tensor([1.0, -1, 2]), torch.tensor([3.0, 1, -1])])
    out = METHODS["dare"](y, DareConfig(density=1.0, combination="ties"))
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0, 2.0]))  # 1 + -1: no sign, 0


def test_median_and_trimmed_mean():
    thetas = [
        torch.tensor([1.0, 5.0]),
        torch.tensor([2.0, -1.0]),
        torch.tensor([100.0, 0.0]),
        torch.tensor([3.0, 2.0]),
    ]
    torch.testing.assert_close(METHODS["median"](inputs(torch.zeros(2), thetas)), torch.tensor([2.5, 1.0]))
    torch.testing.assert_close(
        METHODS["median"](inputs(torch.zeros(2), thetas[:3])), torch.tensor([2.0, 0.0])
    )
    out = METHODS["trimmed_mean"](inputs(torch.zeros(2), thetas), TrimmedMeanConfig(trim=0.25))
    torch.testing.assert_close(out, torch.tensor([2.5, 1.0]))
    out = METHODS["trimmed_mean"](inputs(torch.zeros(2), thetas), TrimmedMeanConfig(trim=0.0))
    torch.testing.assert_close(out, torch.tensor([26.5, 1.5]))


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(sorted(METHODS)),
    n=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    perm_seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_every_method_is_invariant_to_contribution_order(method, n, seed, perm_seed):
    g = torch.Generator().manual_seed(seed)
    shape = (4, 3)
    base = torch.randn(shape, generator=g)
    thetas = [base + torch.randn(shape, generator=g) for _ in range(n)]
    weights = (torch.rand(n, generator=g) + 0.1).tolist()
    fishers = [torch.rand(shape, generator=g) for _ in range(n)]
    grams = []
    for _ in range(n):
        x = torch.randn(10, 3, generator=g)
        grams.append(x.T @ x / 10)
    keys = [f"contribution-{i}" for i in range(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed)).tolist()

    def run(order):
        x = inputs(
            base,
            [thetas[i] for i in order],
            weights=[weights[i] for i in order],
            fishers=[fishers[i] for i in order],
            grams=[grams[i] for i in order],
            keys=[keys[i] for i in order],
        )
        return METHODS[method](x)

    torch.testing.assert_close(run(list(range(n))), run(perm), atol=1e-5, rtol=1e-5)


def test_screen_norms_flag_clip_drop():
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 10.0}
    flag = screen_norms(norms, ScreenConfig(action="flag", threshold=3))
    assert [k for k, d in flag.items() if d.outlier] == ["d"] and flag["d"].factor == 1.0
    clip = screen_norms(norms, ScreenConfig(action="clip", threshold=3))
    assert clip["d"].action == "clip"
    assert clip["d"].factor == pytest.approx(3 * 1.1 / 10.0)  # median of 4 = 1.1
    drop = screen_norms(norms, ScreenConfig(action="drop"))
    assert drop["d"].factor == 0.0 and drop["a"].action == "keep"
    few = screen_norms({"a": 1.0, "b": 100.0}, ScreenConfig(action="drop"))
    assert not any(d.outlier for d in few.values())
    with pytest.raises(MergeConfigError):
        ScreenConfig(action="ban")


def test_dare_draws_do_not_depend_on_chunking_even_across_the_32_bit_index_boundary():
    from coldswarm.fusion.methods import dare_bits

    for start in (0, 2**31 - 5, 2**32 - 5, 3 * 2**32 + 7):  # int32 fast path, wrapped low half, both halves
        whole = dare_bits(1, "c0", "w", start, 10)
        assert torch.equal(whole, torch.cat([dare_bits(1, "c0", "w", start + i, 1) for i in range(10)]))
        assert int(whole.min()) >= 0 and int(whole.max()) < 2**24
    draws = dare_bits(0, "c0", "w", 0, 1 << 18).float() / 2**24
    assert abs(float(draws.mean()) - 0.5) < 0.01 and abs(float((draws < 0.3).float().mean()) - 0.3) < 0.01
    assert not torch.equal(dare_bits(0, "c0", "w", 0, 64), dare_bits(0, "c1", "w", 0, 64))  # keyed
    assert not torch.equal(
        dare_bits(0, "c0", "w", 0, 64), dare_bits(0, "c0", "w", 2**32, 64)
    )  # high half too


def _lowbias32_reference(seed: int, key: str, name: str, index: int) -> int:
    """dare_bits' definition in plain unsigned 32-bit arithmetic, one element at a time."""
    import hashlib

    mask = 0xFFFFFFFF
    digest = hashlib.sha256(f"{seed}\0{key}\0{name}\0{index >> 32}".encode()).digest()
    z = ((index & mask) * 0x9E3779B9 & mask) ^ int.from_bytes(digest[:4], "little")
    z = (z ^ (z >> 16)) * 0x7FEB352D & mask
    z = (z ^ (z >> 15)) * 0x846CA68B & mask
    return (z ^ (z >> 16)) >> 8


def test_dare_bits_equal_the_unsigned_reference_of_the_hash():
    from coldswarm.fusion.methods import dare_bits

    for start in (0, 1000, 2**31 - 3, 2**32 - 3, 5 * 2**32 - 2):  # fast path, wrapped low half, both halves
        want = [_lowbias32_reference(3, "key", "enc.w", start + i) for i in range(6)]
        assert dare_bits(3, "key", "enc.w", start, 6).tolist() == want


@pytest.mark.parametrize("combination", ["linear", "ties"])
def test_dare_equals_drop_and_rescale_per_contribution(monkeypatch, combination):
    """The blocked, in-place DARE equals the textbook one: each contribution's delta dropped by its own
    draws (dare_uniform < density) and rescaled by 1/density, then combined (float64 reference)."""
    import coldswarm.fusion.methods as methods
    from coldswarm.fusion.methods import dare_drop, dare_uniform

    g = torch.Generator().manual_seed(21)
    base = torch.randn(23, 19, generator=g)
    thetas = [base + torch.randn(23, 19, generator=g) for _ in range(4)]
    weights = [1.0, 2.0, 0.5, 0.5]  # relative weights 1, 2, .5, .5 (exact in fp32)
    rel = torch.tensor(weights, dtype=torch.float64) * 4 / sum(weights)
    cfg = DareConfig(density=0.3, seed=5, combination=combination, scaling=0.7)
    dropped = []
    for i, t in enumerate(thetas):
        d = t - base
        u = dare_uniform(cfg.seed, f"c{i}", "layer.weight", 40, d.numel())  # offset 40: a later chunk
        dropped.append(dare_drop(d, cfg.density, u).double())
    if combination == "linear":
        merged = sum(w * d for w, d in zip(rel, dropped, strict=True))
    else:
        elected = torch.sign(sum(w * d for w, d in zip(rel, dropped, strict=True)))
        agree = [(torch.sign(d) == elected) & (d != 0) for d in dropped]
        num = sum(w * torch.where(a, d, 0) for w, d, a in zip(rel, dropped, agree, strict=True))
        den = sum(w * a for w, a in zip(rel, agree, strict=True))
        merged = torch.where(den > 0, num / den.clamp_min(1e-30), 0)
    want = (base.double() + cfg.scaling * merged).float()
    for block in (None, 4 * 37):  # one block, then blocks of 37 entries
        if block:
            monkeypatch.setattr(methods, "TIES_BLOCK_ENTRIES", block)
        out = METHODS["dare"](inputs(base, thetas, weights=weights, offset=40), cfg)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_fisher_equals_the_closed_form_in_blocks(monkeypatch):
    """sum_i w_i F_i theta_i / sum_i w_i F_i with F_i floored at eps (a missing Fisher counts as 0),
    in float64, whether the Fishers come as a list or in the driver's stacked buffer, in any block size."""
    import coldswarm.fusion.methods as methods

    g = torch.Generator().manual_seed(8)
    thetas = [torch.randn(13, 11, generator=g) for _ in range(4)]
    fishers = [torch.rand(13, 11, generator=g) ** 3 for _ in range(4)]
    fishers[1][fishers[1] < 0.2] = 0.0  # exact zeros: the floor decides there
    fishers[2] = None
    weights = [1.0, 2.0, 0.5, 3.0]
    eps = 1e-3
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    floored = [
        torch.full((13, 11), eps, dtype=torch.float64) if f is None else f.double().clamp_min(eps)
        for f in fishers
    ]
    num = sum(wi * f * t.double() for wi, f, t in zip(w, floored, thetas, strict=True))
    den = sum(wi * f for wi, f in zip(w, floored, strict=True))
    want = (num / den).float()
    cfg = FisherConfig(eps=eps)
    for block in (None, 4 * 10):
        if block:
            monkeypatch.setattr(methods, "TIES_BLOCK_ENTRIES", block)
        out = METHODS["fisher"](inputs(torch.zeros(13, 11), thetas, weights=weights, fishers=fishers), cfg)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        stacked = torch.stack([torch.zeros(13, 11) if f is None else f.clone() for f in fishers])
        x = inputs(torch.zeros(13, 11), thetas, weights=weights, fishers=fishers, fisher_stacked=stacked)
        torch.testing.assert_close(METHODS["fisher"](x, cfg), want, rtol=1e-5, atol=1e-6)
