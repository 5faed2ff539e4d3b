"""Pre-passes of a merge: what must be known about whole contributions (or whole tensors) first.

* :func:`screen_pass` -- each contribution's global delta norm, then the screening decision
  (:mod:`coldswarm.fusion.screening`): keep, flag, clip (a factor < 1) or drop (factor 0);
* :func:`fisher_norm_pass` -- each contribution's global Fisher norm, for ``fisher`` with
  ``normalize=True``;
* :func:`prepare_pass` -- a method's per-contribution value over one whole tensor before that
  tensor is merged in chunks (TIES' magnitude threshold);
* :func:`global_pass` -- a method's selection over each contribution's whole task vector (TIES
  with ``trim="global"``), streamed in as many passes as its selector asks for.

Each reads tensor by tensor, in chunks of ``chunk_mb``, so memory stays bounded.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .merge_plan import F32, Adjustments, MergeContext, MergePlan, TensorPlan, row_numel, rows_of
from .screening import screen_norms


def screen_pass(ctx: MergeContext) -> tuple[list[float], dict, list[float]]:
    """Global ||theta_i - base||_2 per contribution; the screening decisions and delta factors."""
    n = len(ctx.contribs)
    sq = [0.0] * n
    base = ctx.base
    for name in ctx.names:
        who = [i for i in range(n) if name in ctx.mats[i].plan]
        if not who:
            continue
        shape = base.shape(name)
        step = max(1, ctx.chunk_budget // (4 * row_numel(shape) * 4))
        for s in range(0, rows_of(shape), step):
            e = min(rows_of(shape), s + step)
            b = base.get_rows(name, s, e, F32)
            for i in who:
                d = ctx.mats[i].delta_rows(name, b, s, e)
                sq[i] += float(d.double().pow(2).sum())
    norms = [math.sqrt(v) for v in sq]
    decisions = screen_norms(dict(zip(ctx.keys, norms, strict=True)), ctx.opts.screen)
    return norms, decisions, [decisions[k].factor for k in ctx.keys]


def fisher_norm_pass(ctx: MergeContext, active: list[int]) -> list[float]:
    """1 / (global L2 norm of contribution i's Fishers) for each active i (1.0 elsewhere or if zero)."""
    scale = [1.0] * len(ctx.contribs)
    for i in active:
        c = ctx.contribs[i]
        total = 0.0
        for name in ctx.mats[i].fishers.values():
            shape = c.shape(name)
            step = max(1, ctx.chunk_budget // (4 * row_numel(shape) * 2))
            for s in range(0, rows_of(shape), step):
                total += float(c.get_rows(name, s, min(rows_of(shape), s + step)).double().pow(2).sum())
        scale[i] = 1.0 / math.sqrt(total) if total > 0 else 1.0
    return scale


def contribution_prepasses(ctx: MergeContext) -> Adjustments:
    """Screening, then Fisher normalisation (for the contributions screening kept), as the options say."""
    n = len(ctx.contribs)
    adj = Adjustments(factors=[1.0] * n, fisher_scale=[1.0] * n)
    t0 = time.perf_counter()
    if ctx.opts.screen is not None:
        adj.norms, adj.decisions, adj.factors = screen_pass(ctx)
    if ctx.entry.needs_fisher and getattr(ctx.cfg, "normalize", False) and adj.active:
        adj.fisher_scale = fisher_norm_pass(ctx, adj.active)
    adj.prepass_s = time.perf_counter() - t0
    return adj


def theta_into(ctx: MergeContext, i: int, name: str, b: torch.Tensor, s: int, e: int, factor: float,
               out: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Contribution i's rows s:e of ``name`` into ``out``, its delta scaled by ``factor`` (screening's clip).

    The merge step and every pre-pass materialise through here, in the same row chunks, so that a
    pre-pass sees bit for bit the deltas the method will see (TIES keeps exactly k of them).
    """
    th = ctx.mats[i].theta_rows(name, b, s, e, out=out)
    if factor != 1.0:
        th.sub_(b).mul_(factor).add_(b)
    return th


def _chunks(tp: TensorPlan):
    rows = rows_of(tp.shape)
    for s in range(0, rows, tp.step):
        yield s, min(rows, s + tp.step)


def prepare_pass(
    ctx: MergeContext, tp: TensorPlan, active: list[int], factors: list[float]
) -> list[Any] | None:
    """The method's ``prepare`` value per active contribution over the whole of ``tp``'s tensor, or
    None when the tensor is merged in one piece (the method then computes it itself).

    One contribution's delta at a time, materialised in the merge's own row chunks: memory is the
    base tensor, one delta and the method's scratch, not N tensors.
    """
    fn = tp.method
    if fn is None or fn.prepare is None or tp.step >= rows_of(tp.shape):
        return None
    full_base = ctx.base.get(tp.name, F32).reshape(rows_of(tp.shape), *tp.shape[1:])
    delta = torch.empty_like(full_base)
    prepared = []
    for i in active:
        for s, e in _chunks(tp):
            theta_into(ctx, i, tp.name, full_base[s:e], s, e, factors[i], delta[s:e]).sub_(full_base[s:e])
        prepared.append(fn.prepare(delta, tp.cfg))
    return prepared


def global_pass(ctx: MergeContext, plan: MergePlan, factors: list[float]) -> dict[str, list[Any]]:
    """A method's selection over each contribution's whole task vector (TIES ``trim="global"``).

    Returns {tensor name: per-active-contribution values} for every merged tensor, or {} when the
    method's config needs no such pass. Each pass streams every merged tensor in plan order, in the
    merge's row chunks, reading only the contributions whose selector still wants a pass.
    """
    entry = ctx.entry
    merged = [tp for tp in plan.tensors if not tp.copied and tp.method is entry]
    total = sum(math.prod(tp.shape) for tp in merged)
    if entry.global_prepare is None or entry.global_prepare(ctx.cfg, total) is None:
        return {}
    selectors = {i: entry.global_prepare(ctx.cfg, total) for i in plan.active}
    buf = torch.empty(0, dtype=F32)
    while any(sel.wants_pass for sel in selectors.values()):
        feeding = [i for i, sel in selectors.items() if sel.wants_pass]
        for j, tp in enumerate(merged):
            who = [i for i in feeding if i in tp.who and selectors[i].wants_pass]
            for s, e in _chunks(tp) if who else ():
                b = ctx.base.get_rows(tp.name, s, e, F32)
                if buf.numel() < b.numel():
                    buf = torch.empty(b.numel(), dtype=F32)
                for i in who:
                    if selectors[i].wants_pass:
                        d = theta_into(ctx, i, tp.name, b, s, e, factors[i], buf[: b.numel()].view(b.shape))
                        selectors[i].feed(j, s * row_numel(tp.shape), d.sub_(b))
        for i in feeding:
            selectors[i].end_pass()
    return {
        tp.name: [selectors[i].threshold(j, math.prod(tp.shape)) for i in plan.active]
        for j, tp in enumerate(merged)
    }
