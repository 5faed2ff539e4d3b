"""Executing a merge plan: one base tensor at a time, in row chunks, from the inputs to the writer.

:class:`TensorMerger` holds what every tensor's step shares (the context, the plan, reused read
buffers, the timings); :meth:`TensorMerger.run` copies or merges one :class:`TensorPlan`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
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
    """Runs the plan's tensors in order. Close it (or use ``with``): it may own a reader thread."""

    def __init__(self, ctx: MergeContext, plan: MergePlan, adj: Adjustments, writer: ModelDirWriter):
        self.ctx, self.plan, self.adj, self.writer = ctx, plan, adj, writer
        self.timings = Timings(prepass_s=adj.prepass_s)
        # Reused buffers (base rows, then one row per contribution): no fresh pages per chunk,
        # and the (N, m) block lets a method reduce over contributions in one pass.
        self._pool = torch.empty(0, dtype=F32)
        # RegMean reads N whole Grams per layer and then computes for a long time: one reader thread
        # fetches the next layer's Grams meanwhile (preadv and the matrix products release the GIL).
        order = [tp for tp in plan.tensors if tp.use_grams]
        self._after = dict(zip((tp.name for tp in order), order[1:], strict=False))  # name -> next layer
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="coldswarm-grams") if order else None
        self._next_grams: tuple[str, Future] | None = None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None

    def __enter__(self) -> TensorMerger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_grams(self, tp: TensorPlan) -> list[torch.Tensor]:
        module = tp.name[: -len(".weight")]
        return [self.ctx.contribs[i].get(self.ctx.mats[i].grams[module]) for i in self.plan.active]

    def _grams(self, tp: TensorPlan) -> list[torch.Tensor]:
        """``tp``'s Grams (prefetched when the previous layer asked for them); asks for the next layer's."""
        if self._next_grams is not None and self._next_grams[0] == tp.name:
            grams = self._next_grams[1].result()
        else:
            grams = self._read_grams(tp)
        nxt = self._after.get(tp.name)
        self._next_grams = (nxt.name, self._reader.submit(self._read_grams, nxt)) if nxt else None
        return grams

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
        grams = self._grams(tp) if tp.use_grams else None
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
        # one pool for all of a chunk's reads: base, thetas, then (fisher) the Fishers
        pool_size = need + (len(active) * m if tp.method.needs_fisher else 0)
        if self._pool.numel() < pool_size:
            self._pool = torch.empty(pool_size, dtype=F32)
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

    def _read_fishers(self, tp: TensorPlan, s: int, e: int) -> tuple[list | None, torch.Tensor | None]:
        """Each active contribution's Fisher rows s:e (None: it has none; its row of the stacked
        buffer is 0, which the method's floor turns into eps), scaled by normalisation."""
        if not tp.method.needs_fisher:
            return None, None
        ctx, scale, n = self.ctx, self.adj.fisher_scale, len(self.plan.active)
        chunk_shape = (e - s, *tp.shape[1:]) if tp.shape else ()
        m = (e - s) * row_numel(tp.shape)
        stacked = self._pool[(n + 1) * m : (2 * n + 1) * m].view(n, *chunk_shape)
        fishers = []
        for j, i in enumerate(self.plan.active):
            fname = ctx.mats[i].fishers.get(tp.name)
            if fname is None:
                stacked[j].zero_()
                fishers.append(None)
                continue
            f = ctx.contribs[i].get_rows(fname, s, e, out=stacked[j])
            if scale[i] != 1.0:
                f.mul_(scale[i])
            fishers.append(f)
        return fishers, stacked

    def _merge_chunk(self, tp: TensorPlan, s: int, e: int, grams, prepared) -> None:
        ctx, t = self.ctx, self.timings
        t0 = time.perf_counter()
        b, thetas, stacked = self._read_thetas(tp, s, e)
        fishers, fisher_stacked = self._read_fishers(tp, s, e)
        t1 = time.perf_counter()
        t.read_s += t1 - t0
        x = TensorInputs(name=tp.name, base=b, thetas=thetas, weights=self.plan.weights, keys=self.plan.keys,
                         fishers=fishers, grams=grams, offset=s * row_numel(tp.shape), prepared=prepared,
                         stacked=stacked, fisher_stacked=fisher_stacked)  # fmt: skip
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
