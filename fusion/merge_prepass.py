"""Pre-passes of a merge: what must be known about whole contributions (or whole tensors) first.

* :func:`screen_pass` -- each contribution's global delta norm, then the screening decision
  (:mod:`coldswarm.fusion.screening`): keep, flag, clip (a factor < 1) or drop (factor 0);
* :func:`fisher_norm_pass` -- each contribution's global Fisher norm, for ``fisher`` with
  ``normalize=True``;
* :func:`prepare_pass` -- a method's per-contribution value over one whole tensor before that
  tensor is merged in chunks (TIES' magnitude threshold).

Each reads tensor by tensor, in chunks of ``chunk_mb``, so memory stays bounded.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .merge_plan import F32, Adjustments, MergeContext, TensorPlan, row_numel, rows_of
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


def prepare_pass(
    ctx: MergeContext, tp: TensorPlan, active: list[int], factors: list[float]
) -> list[Any] | None:
    """The method's ``prepare`` value per active contribution over the whole of ``tp``'s tensor, or
    None when the tensor is merged in one piece (the method then computes it itself).

    One contribution's delta at a time: memory is one tensor plus its delta, not N tensors.
    """
    fn = tp.method
    rows = rows_of(tp.shape)
    if fn is None or fn.prepare is None or tp.step >= rows:
        return None
    full_base = ctx.base.get(tp.name, F32)
    prepared = []
    for i in active:
        d = ctx.mats[i].delta_rows(tp.name, full_base.reshape(rows, *tp.shape[1:]), 0, rows)
        d = d if d is not None else torch.zeros_like(full_base)
        value = fn.prepare(d, tp.cfg)
        # a clipped contribution's delta is d * factor; a magnitude threshold scales with it
        if factors[i] != 1.0 and isinstance(value, float):
            value *= factors[i]
        prepared.append(value)
        del d
    return prepared
