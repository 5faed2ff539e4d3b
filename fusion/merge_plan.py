"""Planning a merge: what each base tensor needs, decided from names, shapes and the registry alone.

The driver (:mod:`coldswarm.fusion.merge`) works in three stages, as mergekit keeps ``plan.py``, its
executor and ``io/`` apart:

1. **plan** (this module): open the inputs as a :class:`MergeContext`, then, once the pre-passes
   (:mod:`coldswarm.fusion.merge_prepass`) have fixed the per-contribution factors, a
   :class:`TensorPlan` per base tensor -- copy it, or merge it with which registry entry, whether its
   Grams are read, in how many rows per chunk;
2. **execute** (:mod:`coldswarm.fusion.merge_step`): stream each tensor through its plan;
3. **report** (:func:`coldswarm.fusion.merge.merge_checkpoints`).

Nothing here reads a tensor's values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import CheckpointReader, dtype_from_name
from .contribution import Contribution
from .errors import ContributionError, MergeError
from .materialise import Materialiser
from .methods import METHODS, MergeMethod
from .screening import ScreenDecision
from .validate import validate_contribution

if TYPE_CHECKING:
    from .merge import MergeOptions

F32 = torch.float32


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows along dimension 0 (a 0-d tensor is one row): the unit every chunk is cut in."""
    return shape[0] if shape else 1


def row_numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if shape else 1


@dataclass
class MergeContext:
    """The opened inputs of one merge and its resolved method and options (fixed once built)."""

    base: CheckpointReader
    contribs: list[Contribution]  #: every contribution, in the caller's order
    keys: list[str]  #: one stable key per contribution (seeds DARE, names it in the report)
    entry: MergeMethod  #: the method the caller asked for
    cfg: Any  #: its config dataclass
    opts: MergeOptions
    mats: list[Materialiser] = field(default_factory=list)  #: filled by :func:`open_context`

    @property
    def chunk_budget(self) -> int:
        """``chunk_mb`` in bytes: the working set of one chunk across all contributions."""
        return int(self.opts.chunk_mb * 2**20)

    @property
    def names(self) -> list[str]:
        return self.base.names()


def open_context(ctx: MergeContext, base_version: int | None) -> MergeContext:
    """Check every contribution against the base (as ``opts.validate`` says) and build the materialisers."""
    if ctx.opts.validate != "none":
        for c in ctx.contribs:
            validate_contribution(
                c, ctx.base, base_version=base_version, check_values=ctx.opts.validate == "full"
            )
    elif base_version is not None:
        for c in ctx.contribs:
            if c.meta.base_version != base_version:
                raise ContributionError(
                    c.label, f"was trained from base version {c.meta.base_version}, not {base_version}"
                )
    names = ctx.names
    ctx.mats = [Materialiser(c, names) for c in ctx.contribs]
    return ctx


@dataclass
class Adjustments:
    """What the pre-passes decided per contribution (indices into ``MergeContext.contribs``)."""

    norms: list[float] | None = None  #: global delta norms (None: not screened)
    decisions: dict[str, ScreenDecision] = field(default_factory=dict)  #: by key, when screened
    factors: list[float] = field(default_factory=list)  #: delta multiplier (1 kept, <1 clipped, 0 dropped)
    fisher_scale: list[float] = field(default_factory=list)  #: 1 / global Fisher norm, or 1
    prepass_s: float = 0.0

    @property
    def active(self) -> list[int]:
        return [i for i, f in enumerate(self.factors) if f > 0]


def contribution_weights(ctx: MergeContext, active: list[int]) -> torch.Tensor:
    """The active contributions' weights (uniform or by ``num_examples``), fp32, summing to 1."""
    if ctx.opts.weighting == "examples":
        raw = [float(ctx.contribs[i].meta.num_examples) for i in active]
        if min(raw) <= 0:
            bad = next(ctx.contribs[i].label for i in active if ctx.contribs[i].meta.num_examples <= 0)
            raise ContributionError(
                bad, "num_examples is 0; weighting='examples' needs every contribution's count"
            )
    else:
        raw = [1.0] * len(active)
    weights = torch.tensor(raw, dtype=torch.float64)
    return (weights / weights.sum()).to(F32)


@dataclass
class TensorPlan:
    """How one base tensor is produced."""

    name: str
    shape: tuple[int, ...]
    who: list[int]  #: active contributions that change it; empty: copied from the base
    method: MergeMethod | None = None  #: the entry run on it (the requested one or its fallback)
    cfg: Any = None
    use_grams: bool = False  #: read every active contribution's Gram for it (RegMean)
    step: int = 1  #: rows per chunk

    @property
    def copied(self) -> bool:
        return not self.who


@dataclass
class MergePlan:
    active: list[int]  #: contributions that take part (not dropped by screening)
    weights: torch.Tensor  #: theirs, aligned with ``active``
    keys: list[str]  #: theirs, aligned with ``active``
    tensors: list[TensorPlan]
    #: linear weights the method (RegMean) could not cover because some contribution lacks a Gram
    fallbacks: list[str] = field(default_factory=list)
    #: {tensor name: per-active-contribution values} from a pre-pass over the whole task vector
    #: (TIES trim="global"); tensors not in it get their method's per-tensor ``prepare``, if any
    prepared: dict[str, list[Any]] = field(default_factory=dict)


def plan_tensor(ctx: MergeContext, name: str, active: list[int]) -> tuple[TensorPlan, bool]:
    """The plan for ``name`` and whether the method had to fall back for it (missing statistics)."""
    base = ctx.base
    shape = base.shape(name)
    rows = rows_of(shape)
    who = [i for i in active if name in ctx.mats[i].plan]
    if not who:
        # Unchanged by everyone: every method returns the base here; copy without arithmetic.
        step = max(1, ctx.chunk_budget // max(1, base.nbytes(name) // max(rows, 1)))
        return TensorPlan(name, shape, who, step=step), False
    if not base.dtype(name).is_floating_point:
        raise MergeError(
            f"{name!r} has dtype {base.dtype(name)} in the base; only float tensors can be merged"
        )
    entry, cfg = ctx.entry, ctx.cfg
    use_grams = fell_back = False
    if entry.needs_gram and len(shape) == 2 and name.endswith(".weight"):
        module = name[: -len(".weight")]
        use_grams = all(module in ctx.mats[i].grams for i in active)
        fell_back = not use_grams
    if entry.needs_gram and not use_grams and entry.fallback is not None:
        entry = METHODS[entry.fallback]
        cfg = entry.config()
    chunkable = entry.chunkable and not use_grams
    # live fp32 copies per row: thetas (+ Fishers) per contribution, base, output, temporaries
    per_row = 4 * row_numel(shape) * (len(active) * entry.work_copies + 4)
    step = max(1, ctx.chunk_budget // per_row) if chunkable else rows
    return TensorPlan(name, shape, who, entry, cfg, use_grams, step), fell_back


def plan_merge(ctx: MergeContext, adj: Adjustments) -> MergePlan:
    """Plan every base tensor, in file order, for the contributions the pre-passes kept."""
    active = adj.active
    if not active:
        raise MergeError("screening dropped every contribution; nothing left to merge")
    weights = contribution_weights(ctx, active)
    tensors, fallbacks = [], []
    for name in ctx.names:
        tp, fell_back = plan_tensor(ctx, name, active)
        tensors.append(tp)
        if fell_back:
            fallbacks.append(name)
    return MergePlan(active, weights, [ctx.keys[i] for i in active], tensors, fallbacks)


def output_layout(ctx: MergeContext) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """The output's files and tensor specs: the base's sharding, float tensors in ``out_dtype`` if set."""
    base = ctx.base
    out_dt = dtype_from_name(ctx.opts.out_dtype) if ctx.opts.out_dtype else None
    return {
        fname: {
            n: (out_dt if out_dt and base.dtype(n).is_floating_point else base.dtype(n), base.shape(n))
            for n in names
        }
        for fname, names in base.layout().items()
    }
