"""Merge methods: pure functions over fp32 tensors, in one registry table (:data:`METHODS`).

Each method combines the N contributions' versions of *one* tensor. It never loads anything: the
driver (:func:`coldswarm.fusion.merge.merge_checkpoints`) streams a checkpoint tensor by tensor,
materialises every contribution's version of the tensor (full weights, deltas, LoRA, IA3 all become
a full fp32 tensor ``theta_i``), and calls the method with a :class:`TensorInputs`.

A method is a registry entry (:class:`MergeMethod`) named after its config key, with the paper it
comes from, a typed config dataclass (every field has ``metadata["help"]``), and flags saying which
statistics it needs so that the driver reads Fisher or Gram tensors only when they are used.

Conventions shared by every method:

* ``weights`` are the per-contribution weights, non-negative and normalised to sum to 1 (uniform,
  or proportional to ``num_examples`` with ``weighting="examples"`` in the merge options).
* Methods that combine *task vectors* (``task_arithmetic``, ``ties``, ``dare``) work on
  ``delta_i = theta_i - base`` and return ``base + scaling * combined_delta``. Their ``scaling`` is
  the paper's lambda; they use relative weights ``N * w_i`` (1 each when uniform), so that
  ``task_arithmetic`` with uniform weights is the paper's plain sum.
* Every method is invariant to the order of contributions (up to float rounding); randomised methods
  (``dare``) seed from each contribution's stable key, never from its position.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from coldswarm.common.options import build

from . import sortnet
from .errors import MergeConfigError, MergeError
from .topk import GlobalTopK, TrimThreshold, keep_count, tensor_threshold, trim_into

Tensor = torch.Tensor


@dataclass
class TensorInputs:
    """Everything a method may use to merge one tensor (all fp32, same shape as ``base``)."""

    name: str  #: the base parameter's name, e.g. ``encoder.block.0.layer.0.SelfAttention.q.weight``
    base: Tensor  #: the base model's tensor
    thetas: list[Tensor]  #: each contribution's full (materialised) tensor
    weights: Tensor  #: shape (N,), non-negative, sums to 1
    keys: list[str] = field(default_factory=list)  #: stable per-contribution ids (seed DARE)
    fishers: list[Tensor | None] | None = None  #: diagonal Fisher per contribution (None: missing)
    grams: list[Tensor | None] | None = None  #: RegMean Gram (in, in) per contribution (None: missing)
    #: flat index of this chunk's first element in the whole tensor (the driver merges big tensors
    #: in row chunks; elementwise randomness such as DARE's masks is keyed by the global index so
    #: the result does not depend on the chunk size)
    offset: int = 0
    #: per-contribution values a method's ``prepare`` computed on the whole tensor (TIES thresholds)
    prepared: list[Any] | None = None
    #: optional (N, *base.shape) tensor whose rows are ``thetas`` (the driver's buffer); methods may
    #: use it to reduce over contributions in one pass (a matrix-vector product for the average),
    #: and may overwrite it (``ties`` turns it into the deltas): the driver refills it for every chunk
    stacked: Tensor | None = None
    #: optional (N, *base.shape) tensor whose rows are ``fishers`` (0 where a Fisher is None); may be
    #: overwritten like ``stacked``
    fisher_stacked: Tensor | None = None

    def deltas(self) -> list[Tensor]:
        return [t - self.base for t in self.thetas]

    def relative_weights(self) -> Tensor:
        """Weights scaled so they average to 1 (all ones when uniform)."""
        return self.weights * len(self.thetas)


# ---------------------------------------------------------------------------------------------
# configs


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class AverageConfig:
    """``average`` has no options; weighting (uniform or by examples) is a merge option."""


@dataclass
class FisherConfig:
    eps: float = field(
        default=1e-6,
        metadata=_help(
            "floor applied to every Fisher value (Matena & Raffel use 1e-6); keeps the division defined where all Fishers are zero"
        ),
    )
    normalize: bool = field(
        default=False,
        metadata=_help(
            "divide each contribution's Fisher by its global L2 norm (over all tensors) before merging, so one contributor with larger gradients does not dominate"
        ),
    )

    def __post_init__(self):
        if not self.eps > 0:
            raise MergeConfigError(f"fisher: eps must be > 0 (got {self.eps}); use e.g. 1e-6")


@dataclass
class RegMeanConfig:
    alpha: float = field(
        default=0.9,
        metadata=_help(
            "scale of the Gram matrices' off-diagonal entries (Jin et al. use 0.9); 1.0 is exact least squares, smaller is closer to the plain average"
        ),
    )
    ridge: float = field(
        default=0.0,
        metadata=_help(
            "ridge lambda, relative to the mean diagonal of the summed Gram: solves (G + lambda I) W^T = sum G_i W_i^T + lambda * mean(W_i)^T, i.e. shrinks towards the plain average. Set e.g. 1e-4 if a merge fails as singular"
        ),
    )

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise MergeConfigError(f"regmean: alpha must be in [0, 1] (got {self.alpha}); the paper uses 0.9")
        if self.ridge < 0:
            raise MergeConfigError(f"regmean: ridge must be >= 0 (got {self.ridge})")


@dataclass
class TaskArithmeticConfig:
    scaling: float = field(
        default=1.0,
        metadata=_help(
            "lambda in base + lambda * sum_i delta_i; with N similar contributions start around 1/N .. 0.5 and tune on validation loss"
        ),
    )


@dataclass
class TiesConfig:
    density: float = field(
        default=0.2,
        metadata=_help(
            "fraction of each delta's entries kept (largest magnitude; exactly round(density * n), ties at the threshold kept in index order) before sign election; TIES uses 0.2"
        ),
    )
    scaling: float = field(
        default=1.0, metadata=_help("lambda applied to the disjoint mean of the kept deltas")
    )
    trim: str = field(
        default="tensor",
        metadata=_help(
            "'tensor': keep the top density of each delta tensor (as mergekit does); 'global': the top density of each contribution's whole task vector, as the paper does (a streaming pre-pass over every tensor: two or three extra reads)"
        ),
    )

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise MergeConfigError(f"ties: density must be in (0, 1] (got {self.density})")
        if self.trim not in ("tensor", "global"):
            raise MergeConfigError(f"ties: trim must be 'tensor' or 'global' (got {self.trim!r})")


@dataclass
class DareConfig:
    density: float = field(
        default=0.5,
        metadata=_help(
            "probability of keeping each delta entry; survivors are rescaled by 1/density so the expectation is unchanged"
        ),
    )
    combination: str = field(
        default="linear",
        metadata=_help(
            "'linear': base + scaling * sum_i w_i delta_i after dropping; 'ties': sign election and disjoint mean after dropping"
        ),
    )
    scaling: float = field(default=1.0, metadata=_help("lambda applied to the combined delta"))
    seed: int = field(
        default=0,
        metadata=_help(
            "seed of the drop masks; each contribution's mask also depends on its key and the tensor name, never on the order"
        ),
    )

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise MergeConfigError(f"dare: density must be in (0, 1] (got {self.density})")
        if self.combination not in ("linear", "ties"):
            raise MergeConfigError(f"dare: combination must be 'linear' or 'ties' (got {self.combination!r})")


@dataclass
class MedianConfig:
    """``median`` has no options (coordinate-wise median; the mean of the two middle values for even N)."""


@dataclass
class TrimmedMeanConfig:
    trim: float = field(
        default=0.1,
        metadata=_help(
            "fraction of contributions dropped at each end, per coordinate (floor(trim * N) each side); 0 is the plain mean"
        ),
    )

    def __post_init__(self):
        if not 0.0 <= self.trim < 0.5:
            raise MergeConfigError(f"trimmed_mean: trim must be in [0, 0.5) (got {self.trim})")


# ---------------------------------------------------------------------------------------------
# the math


def _weighted_sum(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    ws = weights.tolist()
    out = tensors[0] * ws[0]  # not zeros + add: one pass fewer over each chunk
    for t, w in zip(tensors[1:], ws[1:], strict=True):
        out.add_(t, alpha=w)
    return out


def average(x: TensorInputs, cfg: AverageConfig) -> Tensor:
    """ColD Fusion (Don-Yehiya et al. 2023): theta* = sum_i w_i theta_i."""
    if x.stacked is not None and x.base.numel():
        # one gemv over the (N, numel) buffer reads every input once, instead of N axpy passes
        flat = x.stacked.reshape(len(x.thetas), -1)
        return torch.mv(flat.T, x.weights.to(flat.dtype)).reshape(x.base.shape)
    return _weighted_sum(x.thetas, x.weights)


def fisher(x: TensorInputs, cfg: FisherConfig) -> Tensor:
    """Matena & Raffel 2021: theta* = sum_i w_i F_i theta_i / sum_i w_i F_i, elementwise, F_i >= eps.

    A contribution without a Fisher for this tensor counts as F_i = 0 (so, after the floor, it defers
    to the contributions that have one); with no Fisher anywhere this is the weighted average.
    Normalisation (``cfg.normalize``) is global per contribution, so the driver applies it before
    calling (it needs a pass over all tensors).
    """
    n = len(x.thetas)
    if x.fisher_stacked is not None:
        f = x.fisher_stacked.reshape(n, -1)
    else:
        fishers = x.fishers or [None] * n
        f = torch.stack([torch.zeros_like(x.base) if fi is None else fi for fi in fishers]).reshape(n, -1)
    thetas = (x.stacked if x.stacked is not None else torch.stack(x.thetas)).reshape(n, -1)
    w = x.weights.to(torch.float32)
    m = thetas.shape[1]
    out = torch.empty(m, dtype=torch.float32)
    block = max(1, min(m, TIES_BLOCK_ENTRIES // n))
    for s in range(0, m, block):  # per cache-sized block: floor, two matrix-vector products, divide
        e = min(m, s + block)
        fb = f[:, s:e].clamp_min_(cfg.eps)
        den = torch.mv(fb.T, w)  # >= eps * min(w) > 0 wherever some weight is positive
        torch.mv(fb.mul_(thetas[:, s:e]).T, w, out=out[s:e]).div_(den)
    return out.reshape(x.base.shape)


def _regmean_tilde(g: Tensor, alpha: float) -> Tensor:
    diag = torch.diagonal(g).clone()
    out = g * alpha
    out.diagonal().copy_(diag)
    return out


#: RegMean solves in fp32 (products and a Cholesky factorisation, 2x faster than fp64) only where the
#: Jacobi-scaled system's estimated condition number is at most this; elsewhere in fp64. Measured on
#: Grams of correlated, rank-deficient inputs (512-1024 wide, alpha 0.5-1): the fp32 result's max
#: relative deviation from the fp64 closed form stays below 5e-8 x the estimate, so <= 5e-5 here --
#: within the 1e-4 the closed-form tests allow.
REGMEAN_FP32_MAX_COND = 1e3


def regmean(x: TensorInputs, cfg: RegMeanConfig) -> Tensor:
    """Jin et al. 2022 (RegMean): W*^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T for a linear weight W (out, in).

    G~_i keeps G_i's diagonal and scales its off-diagonal by ``alpha``; each G~_i is weighted by w_i.
    Tensors that are not 2-D linear weights, or that lack a Gram for any contribution, are averaged.
    Input dimensions no contribution ever saw a non-zero input on (zero diagonal in every Gram) are
    undetermined by the data: their columns take the weighted average and the rest is solved exactly.
    Well-conditioned systems are solved in fp32 (see :data:`REGMEAN_FP32_MAX_COND`), the rest in fp64.
    """
    grams = x.grams
    if x.base.dim() != 2 or not grams or any(g is None for g in grams):
        return average(x, AverageConfig())
    avg = average(x, AverageConfig())
    out = _regmean_fp32(x, cfg, avg)
    return out if out is not None else _regmean_fp64(x, cfg, avg)


def _condition_estimate(a: Tensor, chol: Tensor, steps: int = 3) -> float:
    """An over-estimate of cond(a) for a symmetric positive definite ``a`` with unit diagonal:
    lambda_max <= the largest absolute row sum; lambda_min from inverse iteration with its Cholesky
    factor, from a fixed start so that the decision is deterministic. O(n^2) per step; on the Grams
    the fp32 threshold was measured on, 3 steps are within 10% of 8 and the estimate is 3-5x the
    true condition number."""
    lam_max = float(a.abs().sum(1).max())
    v = torch.cos(torch.arange(a.shape[0], dtype=a.dtype) * 0.7548776662).unsqueeze(1)  # not an eigenvector
    for _ in range(steps):
        v = torch.cholesky_solve(v / v.norm(), chol)
    return lam_max * float(v.norm())


def _regmean_fp32(x: TensorInputs, cfg: RegMeanConfig, avg: Tensor) -> Tensor | None:
    """The fp32 solve, or None where the system is not well conditioned enough for it (the products
    are then computed again in fp64: a waste only for the layers that need it)."""
    alpha = cfg.alpha
    d_in, d_out = x.base.shape[1], x.base.shape[0]
    a = torch.zeros(d_in, d_in, dtype=torch.float32)
    b = torch.zeros(d_in, d_out, dtype=torch.float32)
    gt = torch.empty(d_in, d_in, dtype=torch.float32)
    for theta, g, w in zip(x.thetas, x.grams, x.weights.tolist(), strict=True):
        torch.mul(g, alpha, out=gt).diagonal().copy_(g.diagonal())  # G~ = alpha G + (1 - alpha) diag(G)
        a.add_(gt, alpha=w)
        b.addmm_(gt, theta.T, alpha=w)
    del gt
    if cfg.ridge > 0:
        lam = cfg.ridge * float(torch.diagonal(a).mean().clamp_min(1e-30))
        a.diagonal().add_(lam)
        b.add_(avg.T, alpha=lam)
    live = torch.diagonal(a) > 0
    if not bool(live.any()):
        return avg.clone()
    idx = None if bool(live.all()) else live.nonzero().squeeze(1)
    if idx is not None:
        a, b = a.index_select(0, idx).index_select(1, idx), b.index_select(0, idx)
    scale = torch.diagonal(a).rsqrt()  # Jacobi scaling: unit diagonal, far better conditioned in fp32
    a.mul_(scale[:, None]).mul_(scale[None, :])
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0 or _condition_estimate(a, chol) > REGMEAN_FP32_MAX_COND:
        return None
    sol = torch.cholesky_solve(b.mul_(scale[:, None]), chol).mul_(scale[:, None])
    if not bool(torch.isfinite(sol).all()):
        return None
    out = avg.clone()
    if idx is None:
        out.copy_(sol.T)
    else:
        out[:, idx] = sol.T
    return out


def _regmean_fp64(x: TensorInputs, cfg: RegMeanConfig, avg32: Tensor) -> Tensor:
    """The fp64 solve (LU): for systems the fp32 path declines; raises MergeError when singular."""
    grams = x.grams
    d_in = x.base.shape[1]
    a = torch.zeros(d_in, d_in, dtype=torch.float64)
    b = torch.zeros(d_in, x.base.shape[0], dtype=torch.float64)
    for theta, g, w in zip(x.thetas, grams, x.weights.tolist(), strict=True):
        gt = _regmean_tilde(g.to(torch.float64), cfg.alpha) * w
        a += gt
        b += gt @ theta.to(torch.float64).T
    avg = avg32.to(torch.float64)
    if cfg.ridge > 0:
        lam = cfg.ridge * float(torch.diagonal(a).mean().clamp_min(1e-30))
        a.diagonal().add_(lam)
        b += lam * avg.T
    live = torch.diagonal(a) > 0
    out = avg.clone()
    if not bool(live.any()):
        return out.to(torch.float32)
    idx = live.nonzero().squeeze(1)
    a_l = a.index_select(0, idx).index_select(1, idx)
    b_l = b.index_select(0, idx)
    try:
        sol = torch.linalg.solve(a_l, b_l)  # solve, never invert: stabler and cheaper
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise MergeError(
            f"regmean: the summed Gram matrix of {x.name!r} is singular ({e}); merge with the option "
            "ridge=1e-4 (shrinks towards the average) or use another method"
        ) from e
    if not bool(torch.isfinite(sol).all()):
        raise MergeError(f"regmean: non-finite solution for {x.name!r}; merge with the option ridge=1e-4")
    out[:, idx] = sol.T
    return out.to(torch.float32)


def task_arithmetic(x: TensorInputs, cfg: TaskArithmeticConfig) -> Tensor:
    """Ilharco et al. 2023 (task arithmetic): theta* = base + scaling * sum_i (N w_i) delta_i.

    The deltas are formed in place in ``x.stacked`` when given, then summed by one matrix-vector product."""
    n = len(x.thetas)
    if x.stacked is None:
        return x.base + cfg.scaling * _weighted_sum(x.deltas(), x.relative_weights())
    deltas = x.stacked.reshape(n, -1).sub_(x.base.reshape(-1))
    combined = torch.mv(deltas.T, x.relative_weights().to(deltas.dtype)).reshape(x.base.shape)
    return combined.mul_(cfg.scaling).add_(x.base)


def ties_prepare(delta: Tensor, cfg: TiesConfig) -> TrimThreshold | None:
    """TIES step 1 on one contribution's whole delta of one tensor (``trim="tensor"``): which entries
    survive, exactly k = round(density * n) of them (see :mod:`coldswarm.fusion.topk`)."""
    return tensor_threshold(delta, keep_count(cfg.density, delta.numel()))


def ties_global_selector(cfg: TiesConfig, total: int) -> GlobalTopK | None:
    """With ``trim="global"``: a streaming top-k over one contribution's whole task vector of ``total``
    entries (the driver feeds it every merged tensor); None with ``trim="tensor"``."""
    return GlobalTopK(keep_count(cfg.density, total), total) if cfg.trim == "global" else None


#: entries per block of TIES' combine step: the trimmed block of all N contributions (N x block fp32)
#: (1 MiB) stays in the L2 cache through the six passes over it (a measured optimum: 2x faster than 4 MiB)
TIES_BLOCK_ENTRIES = 1 << 18


def _elect_and_disjoint_mean(deltas: Sequence[Tensor], rel_weights: Tensor) -> Tensor:
    """TIES steps 2-3: sign per coordinate from the weighted sum; mean over agreeing non-zero entries."""
    elected = torch.sign(_weighted_sum(deltas, rel_weights))
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, rel_weights.tolist(), strict=True):
        agree = (torch.sign(d) == elected) & (d != 0)
        num.add_(torch.where(agree, d, 0.0), alpha=w)
        den.add_(agree.to(d.dtype), alpha=w)
    return torch.where(den > 0, num / den.clamp_min(1e-30), 0.0)


def ties_combine(
    deltas: Tensor, rel_weights: Tensor, thresholds: Sequence[TrimThreshold | None], offset: int = 0
) -> Tensor:
    """TIES steps 1-3 on (N, m) deltas (flat entries ``offset .. offset + m`` of their tensor): trim
    each row by its threshold, elect a sign per coordinate from the weighted sum of the trimmed rows,
    and average, with the weights, the trimmed entries that agree with it (0 where none does).

    Blocked so that every pass after the trim runs on cache-resident data: per block, the trim
    (``hardshrink``), one matrix-vector product for the elected sign, ``relu(sign * trimmed)`` (the
    agreeing magnitudes), one product for their weighted sum and one for the weights of the agreeing
    entries (``sign`` of those magnitudes is the 0/1 agreement mask).
    """
    n_c, m = deltas.shape
    out = torch.empty(m, dtype=torch.float32)
    block = max(1, min(m, TIES_BLOCK_ENTRIES // n_c))
    trimmed = torch.empty(n_c, block, dtype=torch.float32)
    w = rel_weights.to(torch.float32)
    for s in range(0, m, block):
        e = min(m, s + block)
        t = trimmed[:, : e - s]
        for i, thr in enumerate(thresholds):
            trim_into(deltas[i, s:e], thr, offset + s, t[i])
        sign = torch.mv(t.T, w).sign_()
        t.mul_(sign).clamp_min_(0)
        num = torch.mv(t.T, w)
        den = torch.mv(t.sign_().T, w).clamp_min_(1e-30)
        torch.div(num.mul_(sign), den, out=out[s:e])
    return out


def ties(x: TensorInputs, cfg: TiesConfig) -> Tensor:
    """Yadav et al. 2023 (TIES-Merging): trim each delta to its top-``density`` magnitudes, elect a sign
    per coordinate from the weighted sum of trimmed deltas, take the weighted mean of the entries that
    agree with it (disjoint mean), and add ``scaling`` times that to the base.

    Thresholds come from ``x.prepared`` (the driver's pre-pass: the whole tensor when it is merged in
    chunks, the whole task vector with ``trim="global"``), else from this tensor. Overwrites
    ``x.stacked`` with the deltas when given (the driver's scratch buffer).
    """
    n_c = len(x.thetas)
    deltas = (x.stacked if x.stacked is not None else torch.stack(x.thetas)).reshape(n_c, -1)
    base = x.base.reshape(-1)
    deltas.sub_(base)
    if x.prepared is not None:
        thresholds = x.prepared
    elif cfg.trim == "global":
        raise MergeConfigError(
            "ties: trim='global' needs the thresholds of the whole task vector; merge with "
            "coldswarm.fusion.merge.merge_checkpoints, which computes them in a pre-pass"
        )
    else:
        k = keep_count(cfg.density, base.numel())
        scratch = torch.empty(base.numel(), dtype=torch.float32)
        thresholds = [tensor_threshold(deltas[i], k, scratch) for i in range(n_c)]
    merged = ties_combine(deltas, x.relative_weights(), thresholds, x.offset)
    return merged.mul_(cfg.scaling).add_(base).reshape(x.base.shape)


def _i32(v: int) -> int:
    """An unsigned 32-bit constant as the int32 lane value with the same bits."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _lsr32(z: Tensor, k: int) -> Tensor:
    """Logical shift right of int32 lanes (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (32 - k)) - 1)


_GOLDEN32 = _i32(0x9E3779B9)
_LOWBIAS32 = ((16, _i32(0x7FEB352D)), (15, _i32(0x846CA68B)))  # Wellons' "lowbias32" finaliser


def dare_bits(seed: int, key: str, name: str, start: int, n: int, z: Tensor | None = None) -> Tensor:
    """24 random bits (int32 in [0, 2^24)) for elements start..start+n-1 of tensor ``name`` of
    contribution ``key``; the uniform draw is bits / 2^24.

    A counter-based generator (Wellons' lowbias32 hash of the element index, keyed by a hash of
    seed/key/name and the index's high 32 bits): any chunk of a tensor gets the same values as the
    whole tensor would, and the values depend on the contribution's key, never on its position in
    the round. 32-bit lanes: about 20x faster per draw than the int64 SplitMix64 finaliser used
    before (1.1 vs 22 ms per million, one thread), so the masks of a given seed changed with it. In place on ``z`` (an int32 buffer of n entries) when given.
    """
    z = torch.empty(n, dtype=torch.int32) if z is None else z
    boundary = (start // (1 << 32) + 1) << 32
    if start + n > boundary:  # the index's high half changes inside: two keyed runs
        dare_bits(seed, key, name, start, boundary - start, z[: boundary - start])
        dare_bits(seed, key, name, boundary, start + n - boundary, z[boundary - start :])
        return z
    digest = hashlib.sha256(f"{seed}\0{key}\0{name}\0{start >> 32}".encode()).digest()
    low = start & 0xFFFFFFFF
    if low + n <= 1 << 31:
        torch.arange(low, low + n, dtype=torch.int32, out=z)
    else:  # int32 lanes hold the low half of the index with its bits (two's complement)
        z.copy_(torch.arange(low, low + n, dtype=torch.int64))
    z.mul_(_GOLDEN32).bitwise_xor_(_i32(int.from_bytes(digest[:4], "little")))  # int32 wraps mod 2^32
    for shift, mult in _LOWBIAS32:
        z.bitwise_xor_(_lsr32(z, shift)).mul_(mult)
    z.bitwise_xor_(_lsr32(z, 16))
    return z.bitwise_right_shift_(8).bitwise_and_((1 << 24) - 1)


def dare_uniform(seed: int, key: str, name: str, start: int, n: int) -> Tensor:
    """U[0,1) values for elements start..start+n-1 (see :func:`dare_bits`)."""
    return dare_bits(seed, key, name, start, n).to(torch.float32) * (1.0 / (1 << 24))


def _dare_cut(density: float) -> int:
    """Draws below this are kept: ``bits < cut`` is exactly ``bits / 2^24 < density`` in float32."""
    return math.ceil(float(np.float32(density)) * (1 << 24))


def dare_drop(delta: Tensor, density: float, uniform: Tensor) -> Tensor:
    """DARE's drop-and-rescale: keep entries whose uniform draw is < density, divide survivors by it."""
    if density >= 1.0:
        return delta
    keep = uniform.reshape(delta.shape) < density
    return torch.where(keep, delta / density, 0.0)


def dare(x: TensorInputs, cfg: DareConfig) -> Tensor:
    """Yu et al. 2024 (DARE, "Language Models are Super Mario"): drop delta entries at rate
    1 - density, rescale survivors by 1/density, then combine linearly or with TIES' sign election.

    Blocked like ``ties``: per block of columns, each contribution's draws, drop and rescale in place
    on its delta row (``x.stacked`` is overwritten), then the combination while the block is cached.
    """
    n_c = len(x.thetas)
    if len(x.keys) != n_c:
        raise MergeConfigError(
            "dare needs one stable key per contribution (TensorInputs.keys) to seed its masks"
        )
    deltas = (x.stacked if x.stacked is not None else torch.stack(x.thetas)).reshape(n_c, -1)
    base = x.base.reshape(-1)
    deltas.sub_(base)
    m = base.numel()
    block = max(1, min(m, TIES_BLOCK_ENTRIES // n_c))
    bits = torch.empty(block, dtype=torch.int32)
    cut = _dare_cut(cfg.density)
    rel = x.relative_weights()
    ws = rel.tolist()
    out = torch.empty(m, dtype=torch.float32)
    for s in range(0, m, block):
        e = min(m, s + block)
        for i, key in enumerate(x.keys):
            if cfg.density < 1.0:
                drawn = dare_bits(cfg.seed, key, x.name, x.offset + s, e - s, z=bits[: e - s])
                deltas[i, s:e].div_(cfg.density).masked_fill_(drawn >= cut, 0.0)
        if cfg.combination == "ties":
            out[s:e] = ties_combine(deltas[:, s:e], rel, [None] * n_c)
        else:  # the weighted sum, contribution by contribution (as _weighted_sum: the same rounding)
            torch.mul(deltas[0, s:e], ws[0], out=out[s:e])
            for i in range(1, n_c):
                out[s:e].add_(deltas[i, s:e], alpha=ws[i])
    return out.mul_(cfg.scaling).add_(base).reshape(x.base.shape)


def _order_statistic_blocks(x: TensorInputs, positions: tuple[int, ...], reduce: Callable) -> Tensor:
    """``reduce(sorted_rows, out)`` per block of columns of the (N, m) thetas, where ``sorted_rows``
    holds the ``positions`` of the coordinate-wise sorted values (a pruned sorting network, see
    :mod:`coldswarm.fusion.sortnet`; ``torch.sort`` above ``sortnet.MAX_ROWS`` rows). Overwrites
    ``x.stacked``."""
    n = len(x.thetas)
    data = (x.stacked if x.stacked is not None else torch.stack(x.thetas)).reshape(n, -1)
    m = data.shape[1]
    out = torch.empty(m, dtype=torch.float32)
    if n > sortnet.MAX_ROWS:
        reduce(list(data.sort(dim=0).values), out)
        return out.reshape(x.base.shape)
    pairs = sortnet.network_for(n, positions)
    block = max(1, min(m, TIES_BLOCK_ENTRIES // n))
    spare = torch.empty(block, dtype=torch.float32)
    for s in range(0, m, block):
        e = min(m, s + block)
        rows = sortnet.sort_rows([data[i, s:e] for i in range(n)], pairs, spare[: e - s])
        reduce(rows, out[s:e])
    return out.reshape(x.base.shape)


def median(x: TensorInputs, cfg: MedianConfig) -> Tensor:
    """Coordinate-wise median (Yin et al. 2018, Byzantine-robust aggregation); ignores weights."""
    n = len(x.thetas)
    if n % 2:
        return _order_statistic_blocks(x, (n // 2,), lambda rows, out: out.copy_(rows[n // 2]))
    return _order_statistic_blocks(
        x, (n // 2 - 1, n // 2), lambda rows, out: torch.add(rows[n // 2 - 1], rows[n // 2], out=out).div_(2)
    )


def trimmed_mean(x: TensorInputs, cfg: TrimmedMeanConfig) -> Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the floor(trim*N) smallest and largest values
    per coordinate, average the rest; ignores weights."""
    n = len(x.thetas)
    k = int(cfg.trim * n)

    def mean_of_middle(rows, out):
        out.copy_(rows[k])
        for r in rows[k + 1 : n - k]:
            out.add_(r)
        return out.div_(n - 2 * k)

    return _order_statistic_blocks(x, tuple(range(k, n - k)), mean_of_middle)


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class MergeMethod:
    """One registry entry: the config key, the math, its options and where it comes from."""

    name: str
    fn: Callable[[TensorInputs, Any], Tensor]
    config: type
    paper: str
    summary: str
    needs_fisher: bool = False
    needs_gram: bool = False
    uses_weights: bool = True
    #: elementwise methods can be run on row chunks of a tensor (bounded memory for big tensors)
    chunkable: bool = True
    #: per contribution, computed on the whole delta before chunking (see TensorInputs.prepared)
    prepare: Callable[[Tensor, Any], Any] | None = None
    #: (config, entries of the task vector) -> a streaming selector over one contribution's whole task
    #: vector, or None when the config needs none; the driver feeds it every merged tensor in passes
    #: and puts ``selector.threshold(tensor index, numel)`` in TensorInputs.prepared (TIES, trim="global")
    global_prepare: Callable[[Any, int], Any] | None = None
    #: fp32 working copies of a chunk the method holds per contribution (inputs included); the
    #: driver sizes chunks with it so that ``chunk_mb`` bounds the real working set
    work_copies: int = 1
    #: the result can be finite although an input is not (a sort moves a NaN to an end, where it is
    #: trimmed away): the driver then checks every materialised input, not only the output
    hides_nonfinite: bool = False
    #: registry name of the method run on tensors this method's statistics do not cover (RegMean:
    #: anything but a linear weight every contribution has a Gram for); it is chunked and reads no Gram
    fallback: str | None = None

    def make_config(self, options: Mapping[str, Any] | None = None) -> Any:
        """Build this method's config from a plain mapping, refusing unknown keys ("did you mean")."""
        return build(self.config, options, f"option(s) of method {self.name!r}", MergeConfigError)

    def __call__(self, inputs: TensorInputs, config: Any = None) -> Tensor:
        return self.fn(inputs, config if config is not None else self.config())


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod("average", average, AverageConfig, "https://arxiv.org/abs/2212.01378",
                    "ColD Fusion: (weighted) average of the contributions' weights"),
        MergeMethod("fisher", fisher, FisherConfig, "https://arxiv.org/abs/2111.09832",
                    "Fisher-weighted averaging (Matena & Raffel 2021), elementwise, diagonal Fisher",
                    needs_fisher=True, work_copies=2),  # thetas and Fishers
        MergeMethod("regmean", regmean, RegMeanConfig, "https://arxiv.org/abs/2212.09849",
                    "RegMean (Jin et al. 2022): per linear layer, least squares on the pooled inputs' Gram",
                    needs_gram=True, chunkable=False, fallback="average"),
        MergeMethod("task_arithmetic", task_arithmetic, TaskArithmeticConfig, "https://arxiv.org/abs/2212.04089",
                    "Task arithmetic (Ilharco et al. 2023): base + scaling * sum of task vectors"),
        MergeMethod("ties", ties, TiesConfig, "https://arxiv.org/abs/2306.01708",
                    "TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean", prepare=ties_prepare,
                    global_prepare=ties_global_selector),
        MergeMethod("dare", dare, DareConfig, "https://arxiv.org/abs/2311.03099",
                    "DARE (Yu et al. 2024): random drop + rescale of task vectors, then linear or TIES"),
        MergeMethod("median", median, MedianConfig, "https://arxiv.org/abs/1803.01498",
                    "coordinate-wise median: robust to a minority of arbitrary contributions", uses_weights=False,
                    hides_nonfinite=True),
        MergeMethod("trimmed_mean", trimmed_mean, TrimmedMeanConfig, "https://arxiv.org/abs/1803.01498",
                    "coordinate-wise trimmed mean: drops the extremes per coordinate", uses_weights=False,
                    hides_nonfinite=True),
    ]
}  # fmt: skip


def get_method(name: str) -> MergeMethod:
    """The registry entry for ``name``, or a MergeConfigError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise MergeConfigError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}") from None
