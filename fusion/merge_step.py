"""Executing a merge plan: one base tensor at a time, in row chunks, from the inputs to the writer.

:class:`TensorMerger` holds what every tensor's step shares (the context, the plan, reused read
buffers, the timings); :meth:`TensorMerger.run` copies or merges one :class:`TensorPlan`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .checkpoint import ModelDirWriter
from .errors import ContributionError, MergeError
from .merge_plan import F32, Adjustments, MergeContext, MergePlan, TensorPlan, row_numel, rows_of
from .merge_prepass import prepare_pass, theta_into
from .methods import TensorInputs
from .validate import all_finite


@dataclass
class Timings:
    """Seconds spent per stage, summed over tensors (the report's ``timings``)."""

    read_s: float = 0.0
    math_s: float = 0.0
    write_s: float = 0.0
    prepass_s: float = 0.0
    per_tensor: dict[str, float] = field(default_factory=dict)  #: merged tensors only


class TensorMerger:
    def __init__(self, ctx: MergeContext, plan: MergePlan, adj: Adjustments, writer: ModelDirWriter):
        self.ctx, self.plan, self.adj, self.writer = ctx, plan, adj, writer
        self.timings = Timings(prepass_s=adj.prepass_s)
        # Reused buffers (base rows, then one row per contribution): no fresh pages per chunk,
        # and the (N, m) block lets a method reduce over contributions in one pass.
        self._pool = torch.empty(0, dtype=F32)

    def run(self, tp: TensorPlan) -> None:
        if tp.copied:
            self._copy(tp)
        else:
            t0 = time.perf_counter()
            self._merge(tp)
            self.timings.per_tensor[tp.name] = time.perf_counter() - t0

    def _copy(self, tp: TensorPlan) -> None:
        base, t = self.ctx.base, self.timings
        rows = rows_of(tp.shape)
        t0 = time.perf_counter()
        for s in range(0, rows, tp.step):
            chunk = base.get_rows(tp.name, s, min(rows, s + tp.step))
            t1 = time.perf_counter()
            t.read_s += t1 - t0
            self.writer.write_rows(tp.name, s, chunk)
            t0 = time.perf_counter()
            t.write_s += t0 - t1

    def _merge(self, tp: TensorPlan) -> None:
        ctx, active = self.ctx, self.plan.active
        grams = None
        if tp.use_grams:
            module = tp.name[: -len(".weight")]
            grams = [ctx.contribs[i].get(ctx.mats[i].grams[module]) for i in active]
        t0 = time.perf_counter()
        prepared = self.plan.prepared.get(tp.name)
        if prepared is None:
            prepared = prepare_pass(ctx, tp, active, self.adj.factors)
            if prepared is not None:
                self.timings.prepass_s += time.perf_counter() - t0
        rows = rows_of(tp.shape)
        for s in range(0, rows, tp.step):
            self._merge_chunk(tp, s, min(rows, s + tp.step), grams, prepared)

    def _read_thetas(self, tp: TensorPlan, s: int, e: int) -> tuple[torch.Tensor, list, torch.Tensor]:
        """Base rows s:e and each active contribution's materialised rows (as screening scales them)."""
        ctx, active, factors = self.ctx, self.plan.active, self.adj.factors
        chunk_shape = (e - s, *tp.shape[1:]) if tp.shape else ()
        m = (e - s) * row_numel(tp.shape)
        need = (len(active) + 1) * m
        if self._pool.numel() < need:
            self._pool = torch.empty(need, dtype=F32)
        b = ctx.base.get_rows(tp.name, s, e, F32, out=self._pool[:m].view(chunk_shape))
        stacked = self._pool[m:need].view(len(active), *chunk_shape)
        check_inputs = ctx.opts.check_finite and tp.method.hides_nonfinite
        thetas = []
        for j, i in enumerate(active):
            th = theta_into(ctx, i, tp.name, b, s, e, factors[i], stacked[j])
            # Methods that can hide a NaN input (sorting pushes it to an end) have their inputs
            # checked here; for the others a NaN/Inf input reaches the output, which is checked
            # after the math (one pass instead of N).
            if check_inputs and not all_finite(th):
                raise ContributionError(
                    ctx.contribs[i].label, "NaN/Inf in its materialised value", tensor=tp.name
                )
            thetas.append(th)
        return b, thetas, stacked

    def _read_fishers(self, tp: TensorPlan, s: int, e: int) -> list | None:
        if not tp.method.needs_fisher:
            return None
        ctx, scale = self.ctx, self.adj.fisher_scale
        fishers = []
        for i in self.plan.active:
            fname = ctx.mats[i].fishers.get(tp.name)
            f = ctx.contribs[i].get_rows(fname, s, e) if fname else None
            if f is not None and scale[i] != 1.0:
                f.mul_(scale[i])
            fishers.append(f)
        return fishers

    def _merge_chunk(self, tp: TensorPlan, s: int, e: int, grams, prepared) -> None:
        ctx, t = self.ctx, self.timings
        t0 = time.perf_counter()
        b, thetas, stacked = self._read_thetas(tp, s, e)
        fishers = self._read_fishers(tp, s, e)
        t1 = time.perf_counter()
        t.read_s += t1 - t0
        x = TensorInputs(name=tp.name, base=b, thetas=thetas, weights=self.plan.weights, keys=self.plan.keys,
                         fishers=fishers, grams=grams, offset=s * row_numel(tp.shape), prepared=prepared,
                         stacked=stacked)  # fmt: skip
        out = tp.method(x, tp.cfg)
        if ctx.opts.check_finite and not all_finite(out):
            # name the culprit; re-read its inputs, since a method may overwrite the buffer (TIES)
            _, thetas, _ = self._read_thetas(tp, s, e)
            for i, th in zip(self.plan.active, thetas, strict=True):
                if not all_finite(th):
                    raise ContributionError(
                        ctx.contribs[i].label, "NaN/Inf in its materialised value", tensor=tp.name
                    )
            raise MergeError(f"{ctx.entry.name} produced NaN/Inf for {tp.name!r}; check the method's options")
        t2 = time.perf_counter()
        t.math_s += t2 - t1
        self.writer.write_rows(tp.name, s, out)
        t.write_s += time.perf_counter() - t2
