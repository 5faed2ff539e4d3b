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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coldswarm.common.options import build

from .errors import MergeConfigError, MergeError

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
    #: use it to reduce over contributions in one pass (a matrix-vector product for the average)
    stacked: Tensor | None = None

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
            "fraction of each delta's entries kept (largest magnitude) before sign election; TIES uses 0.2"
        ),
    )
    scaling: float = field(
        default=1.0, metadata=_help("lambda applied to the disjoint mean of the kept deltas")
    )

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise MergeConfigError(f"ties: density must be in (0, 1] (got {self.density})")


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
    fishers = x.fishers or [None] * len(x.thetas)
    num = torch.zeros_like(x.base)
    den = torch.zeros_like(x.base)
    floor = None
    for theta, f, w in zip(x.thetas, fishers, x.weights.tolist(), strict=True):
        if f is None:
            floor = torch.full_like(x.base, cfg.eps) if floor is None else floor
            fi = floor
        else:
            fi = f.clamp_min(cfg.eps)
        den.add_(fi, alpha=w)
        num.addcmul_(fi, theta, value=w)
    # den >= eps * min(w) > 0 wherever some weight is positive.
    return num.div_(den)


def _regmean_tilde(g: Tensor, alpha: float) -> Tensor:
    diag = torch.diagonal(g).clone()
    out = g * alpha
    out.diagonal().copy_(diag)
    return out


def regmean(x: TensorInputs, cfg: RegMeanConfig) -> Tensor:
    """Jin et al. 2022 (RegMean): W*^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T for a linear weight W (out, in).

    G~_i keeps G_i's diagonal and scales its off-diagonal by ``alpha``; each G~_i is weighted by w_i.
    Tensors that are not 2-D linear weights, or that lack a Gram for any contribution, are averaged.
    Input dimensions no contribution ever saw a non-zero input on (zero diagonal in every Gram) are
    undetermined by the data: their columns take the weighted average and the rest is solved exactly.
    """
    grams = x.grams
    if x.base.dim() != 2 or not grams or any(g is None for g in grams):
        return average(x, AverageConfig())
    d_in = x.base.shape[1]
    # fp64: the system can be ill-conditioned and the Gram sum has d_in^2 entries only.
    a = torch.zeros(d_in, d_in, dtype=torch.float64)
    b = torch.zeros(d_in, x.base.shape[0], dtype=torch.float64)
    for theta, g, w in zip(x.thetas, grams, x.weights.tolist(), strict=True):
        gt = _regmean_tilde(g.to(torch.float64), cfg.alpha) * w
        a += gt
        b += gt @ theta.to(torch.float64).T
    avg = average(x, AverageConfig()).to(torch.float64)
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
    """Ilharco et al. 2023 (task arithmetic): theta* = base + scaling * sum_i (N w_i) delta_i."""
    return x.base + cfg.scaling * _weighted_sum(x.deltas(), x.relative_weights())


def ties_threshold(delta: Tensor, cfg: TiesConfig) -> float | None:
    """TIES step 1 on a whole tensor: the magnitude of the k-th largest entry, k = round(density * n).

    Entries with |delta| >= threshold are kept (ties at the threshold all kept: deterministic). None
    means keep everything. Computed on the whole tensor even when the driver merges it in chunks.
    """
    n = delta.numel()
    k = int(round(cfg.density * n))
    if k >= n:
        return None
    if k <= 0:
        return float("inf")
    # numpy's in-place introselect on one |delta| copy: faster than torch.kthvalue, and it does not
    # copy again (this runs on whole tensors, e.g. a 32k x 1k embedding per contribution)
    mag = delta.detach().abs().flatten().numpy()
    mag.partition(n - k)
    return float(mag[n - k])


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


def ties(x: TensorInputs, cfg: TiesConfig) -> Tensor:
    """Yadav et al. 2023 (TIES-Merging): trim each delta to its top-``density`` magnitudes, elect a sign
    per coordinate from the weighted sum of trimmed deltas, take the weighted mean of the entries that
    agree with it (disjoint mean), and add ``scaling`` times that to the base."""
    deltas = x.deltas()
    thresholds = x.prepared or [ties_threshold(d, cfg) for d in deltas]
    trimmed = [d if thr is None else d * (d.abs() >= thr) for d, thr in zip(deltas, thresholds, strict=True)]
    return x.base + cfg.scaling * _elect_and_disjoint_mean(trimmed, x.relative_weights())


_MASK64 = (1 << 64) - 1


def _signed(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _lsr(z: Tensor, k: int) -> Tensor:
    """Logical shift right of int64 lanes (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def dare_uniform(seed: int, key: str, name: str, start: int, n: int) -> Tensor:
    """U[0,1) values for elements start..start+n-1 of tensor ``name`` of contribution ``key``.

    A counter-based generator (SplitMix64 finaliser over the element index, keyed by a hash of
    seed/key/name): any chunk of a tensor gets the same values as the whole tensor would, and
    the values depend on the contribution's key, never on its position in the round.
    """
    digest = hashlib.sha256(f"{seed}\0{key}\0{name}".encode()).digest()
    stream = _signed(int.from_bytes(digest[:8], "little"))
    z = torch.arange(start, start + n, dtype=torch.int64)
    z = z * _signed(0x9E3779B97F4A7C15) + stream  # int64 arithmetic wraps modulo 2^64
    z = (z ^ _lsr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _lsr(z, 27)) * _signed(0x94D049BB133111EB)
    z = z ^ _lsr(z, 31)
    return _lsr(z, 40).to(torch.float32) * (1.0 / (1 << 24))


def dare_drop(delta: Tensor, density: float, uniform: Tensor) -> Tensor:
    """DARE's drop-and-rescale: keep entries whose uniform draw is < density, divide survivors by it."""
    if density >= 1.0:
        return delta
    keep = uniform.reshape(delta.shape) < density
    return torch.where(keep, delta / density, 0.0)


def dare(x: TensorInputs, cfg: DareConfig) -> Tensor:
    """Yu et al. 2024 (DARE, "Language Models are Super Mario"): drop delta entries at rate
    1 - density, rescale survivors by 1/density, then combine linearly or with TIES' sign election."""
    if len(x.keys) != len(x.thetas):
        raise MergeConfigError(
            "dare needs one stable key per contribution (TensorInputs.keys) to seed its masks"
        )
    dropped = [
        dare_drop(d, cfg.density, dare_uniform(cfg.seed, k, x.name, x.offset, d.numel()))
        for d, k in zip(x.deltas(), x.keys, strict=True)
    ]
    if cfg.combination == "ties":
        combined = _elect_and_disjoint_mean(dropped, x.relative_weights())
    else:
        combined = _weighted_sum(dropped, x.relative_weights())
    return x.base + cfg.scaling * combined


def median(x: TensorInputs, cfg: MedianConfig) -> Tensor:
    """Coordinate-wise median (Yin et al. 2018, Byzantine-robust aggregation); ignores weights."""
    s = (x.stacked if x.stacked is not None else torch.stack(x.thetas)).sort(dim=0).values
    n = s.shape[0]
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(x: TensorInputs, cfg: TrimmedMeanConfig) -> Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the floor(trim*N) smallest and largest values
    per coordinate, average the rest; ignores weights."""
    n = len(x.thetas)
    k = int(cfg.trim * n)
    s = (x.stacked if x.stacked is not None else torch.stack(x.thetas)).sort(dim=0).values
    return s[k : n - k].mean(dim=0)


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
                    needs_fisher=True, work_copies=2),
        MergeMethod("regmean", regmean, RegMeanConfig, "https://arxiv.org/abs/2212.09849",
                    "RegMean (Jin et al. 2022): per linear layer, least squares on the pooled inputs' Gram",
                    needs_gram=True, chunkable=False, fallback="average"),
        MergeMethod("task_arithmetic", task_arithmetic, TaskArithmeticConfig, "https://arxiv.org/abs/2212.04089",
                    "Task arithmetic (Ilharco et al. 2023): base + scaling * sum of task vectors", work_copies=2),
        MergeMethod("ties", ties, TiesConfig, "https://arxiv.org/abs/2306.01708",
                    "TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean", prepare=ties_threshold, work_copies=4),
        MergeMethod("dare", dare, DareConfig, "https://arxiv.org/abs/2311.03099",
                    "DARE (Yu et al. 2024): random drop + rescale of task vectors, then linear or TIES",
                    work_copies=4),
        MergeMethod("median", median, MedianConfig, "https://arxiv.org/abs/1803.01498",
                    "coordinate-wise median: robust to a minority of arbitrary contributions", uses_weights=False,
                    work_copies=3, hides_nonfinite=True),
        MergeMethod("trimmed_mean", trimmed_mean, TrimmedMeanConfig, "https://arxiv.org/abs/1803.01498",
                    "coordinate-wise trimmed mean: drops the extremes per coordinate", uses_weights=False,
                    work_copies=3, hides_nonfinite=True),
    ]
}  # fmt: skip


def get_method(name: str) -> MergeMethod:
    """The registry entry for ``name``, or a MergeConfigError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise MergeConfigError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}") from None
