"""The merge driver: base checkpoint + N contribution files -> a new model directory, streamed.

:func:`merge_checkpoints` is the coordinator's entry point for closing a fusion round::

    report = merge_checkpoints("versions/3", ["c11.safetensors", "c12.safetensors"], "fisher",
                               {"weighting": "examples", "screen": {"action": "clip"}}, "versions/.cand-4")

It never holds N models: for each base tensor (in file order) it reads the base's rows, asks each
contribution for its version of those rows (materialising LoRA/IA3/delta/full on the fly), calls
the method from :data:`~coldswarm.fusion.methods.METHODS`, and writes the result at its offset in
the output file. Large tensors are processed in row chunks sized by ``chunk_mb`` (methods that
need a whole tensor -- RegMean's solve -- get it whole). Tensors no contribution changes are
copied from the base without arithmetic. Peak memory is therefore about
``chunk_mb`` + one tensor's prepare pass + the largest RegMean layer, independent of N and of
the model's size; and the output directory appears atomically (temp dir, fsync, rename).

The driver only coordinates; each stage is its own module, as mergekit keeps ``plan.py``, its
executor and ``io/`` apart: :mod:`~coldswarm.fusion.merge_plan` (what each tensor needs, from names,
shapes and the method's registry flags), :mod:`~coldswarm.fusion.merge_prepass` (delta norms for
screening, Fisher norms, a method's whole-tensor ``prepare``), :mod:`~coldswarm.fusion.merge_step`
(one tensor's chunks through the method into the writer) and :func:`merge_report`.

Options (a mapping or :class:`MergeOptions`) mix driver options with the method's own options,
e.g. ``{"weighting": "examples", "density": 0.2}`` for ``ties``: keys that are fields of
:class:`MergeOptions` go to the driver, all others to the method's config dataclass (unknown keys
are refused with the list of valid ones).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coldswarm.common.options import split_known

from .checkpoint import CheckpointReader, ModelDirWriter, dtype_from_name
from .contribution import Contribution, open_contribution
from .errors import MergeConfigError
from .merge_plan import Adjustments, MergeContext, MergePlan, open_context, output_layout, plan_merge
from .merge_prepass import contribution_prepasses, global_pass
from .merge_step import TensorMerger, Timings
from .methods import get_method
from .screening import ScreenConfig


@dataclass
class MergeOptions:
    """Driver options of :func:`merge_checkpoints` (the method's own options live in ``method``)."""

    weighting: str = field(
        default="uniform",
        metadata={
            "help": "'uniform', or 'examples' to weight each contribution by its num_examples (methods that take weights)"
        },
    )
    screen: ScreenConfig | None = field(
        default=None,
        metadata={
            "help": "delta-norm screening before the merge: a ScreenConfig, a mapping of its fields, or an action name ('flag', 'clip', 'drop'); None disables it"
        },
    )
    out_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of the merged weights ('float32', 'bfloat16', ...); default: each tensor's base dtype"
        },
    )
    chunk_mb: float = field(
        default=64.0,
        metadata={
            "help": "working-set budget (MiB) for one chunk of one tensor across all contributions; lower it to cap memory, raise it for fewer, larger reads"
        },
    )
    validate: str = field(
        default="structure",
        metadata={
            "help": "'structure' (names, shapes, metadata; values are checked as they stream), 'full' (also scan every value first), or 'none'"
        },
    )
    check_finite: bool = field(
        default=True,
        metadata={"help": "refuse NaN/Inf in any contribution's materialised tensor or the merged result"},
    )
    method: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "the method's options (see its config dataclass in coldswarm.fusion.methods)"},
    )

    def __post_init__(self):
        if self.weighting not in ("uniform", "examples"):
            raise MergeConfigError(f"weighting must be 'uniform' or 'examples' (got {self.weighting!r})")
        if self.validate not in ("structure", "full", "none"):
            raise MergeConfigError(f"validate must be 'structure', 'full' or 'none' (got {self.validate!r})")
        if not self.chunk_mb > 0:
            raise MergeConfigError(f"chunk_mb must be > 0 (got {self.chunk_mb})")
        self.screen = ScreenConfig.from_options(self.screen)
        if self.out_dtype is not None:
            dtype_from_name(self.out_dtype)

    @classmethod
    def parse(cls, options: MergeOptions | Mapping[str, Any] | None) -> MergeOptions:
        """Split a flat mapping into driver fields and method options."""
        if isinstance(options, MergeOptions):
            return options
        options = dict(options or {})
        method = dict(options.pop("method", None) or {})
        own, rest = split_known(options, cls)  # the method refuses what is neither its nor ours
        return cls(**own, method={**method, **rest})


def merge_checkpoints(
    base_dir: str | os.PathLike,
    contributions: Sequence[str | os.PathLike | Contribution],
    method: str = "average",
    options: MergeOptions | Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    keys: Sequence[str] | None = None,
    base_version: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge ``contributions`` into the model at ``base_dir`` with ``method``; write ``out_dir``.

    ``contributions``: contribution files (plain or codec-wrapped safetensors) or opened
    :class:`Contribution` objects (left open). ``keys``: stable ids, one per contribution (the
    coordinator's contribution ids); they seed DARE and name contributions in the report; default:
    the file paths. ``base_version``: if given, every contribution must name it. The output
    directory must not exist unless ``overwrite``; it is written atomically and copies the base's
    config and tokenizer files.

    Returns a JSON-able report: method and resolved options, each contribution's weight, form,
    delta norm and screening decision, which were used / dropped / flagged, tensor counts,
    RegMean fallbacks, and timings (total, read, math, write; the slowest tensors).
    Raises ContributionError (a contribution is bad: names it and the tensor), MergeConfigError
    (bad method/options) or MergeError (the arithmetic failed); nothing is written then.
    """
    if out_dir is None:
        raise MergeConfigError("merge_checkpoints needs out_dir (the directory to write the merged model to)")
    if not contributions:
        raise MergeConfigError("nothing to merge: pass at least one contribution")
    t_start = time.perf_counter()
    entry = get_method(method)
    opts = MergeOptions.parse(options)
    cfg = entry.make_config(opts.method)
    if keys is not None and len(keys) != len(contributions):
        raise MergeConfigError(f"keys has {len(keys)} entries for {len(contributions)} contributions")
    opened: list[Contribution] = []
    owned: list[Contribution] = []
    base = CheckpointReader(base_dir)
    try:
        for i, c in enumerate(contributions):
            if isinstance(c, Contribution):
                opened.append(c)
            else:
                oc = open_contribution(c, label=str(keys[i]) if keys is not None else None)
                owned.append(oc)
                opened.append(oc)
        key_list = [str(k) for k in keys] if keys is not None else [c.label for c in opened]
        if len(set(key_list)) != len(key_list):
            raise MergeConfigError(f"contribution keys must be unique (got {key_list}); pass keys=")
        ctx = open_context(MergeContext(base, opened, key_list, entry, cfg, opts), base_version)
        adj = contribution_prepasses(ctx)
        plan = plan_merge(ctx, adj)
        t0 = time.perf_counter()
        plan.prepared = global_pass(ctx, plan, adj.factors)
        adj.prepass_s += time.perf_counter() - t0
        metadata = {"format": "pt", **base.metadata}
        with ModelDirWriter(
            Path(out_dir), output_layout(ctx), base.model_dir, metadata, overwrite=overwrite
        ) as w:
            with TensorMerger(ctx, plan, adj, w) as step:
                for tp in plan.tensors:
                    step.run(tp)
            t0 = time.perf_counter()
        step.timings.write_s += time.perf_counter() - t0  # commit: fsync + rename
        return merge_report(ctx, plan, adj, step.timings, Path(out_dir), time.perf_counter() - t_start)
    finally:
        for c in owned:
            c.close()
        base.close()


def merge_report(
    ctx: MergeContext, plan: MergePlan, adj: Adjustments, t: Timings, out_dir: Path, total_s: float
) -> dict[str, Any]:
    """The JSON-able report :func:`merge_checkpoints` returns (the coordinator stores it)."""
    contributions = []
    for i, c in enumerate(ctx.contribs):
        key = ctx.keys[i]
        d = adj.decisions.get(key)
        contributions.append({
            "key": key,
            "form": c.meta.form,
            "num_examples": c.meta.num_examples,
            "base_version": c.meta.base_version,
            "weight": float(plan.weights[plan.active.index(i)]) if i in plan.active else 0.0,
            "delta_norm": adj.norms[i] if adj.norms is not None else None,
            "screen": d.action if d else None,
            "norm_ratio": d.ratio if d else None,
        })  # fmt: skip
    merged = sum(1 for tp in plan.tensors if not tp.copied)
    timings = {"read_s": t.read_s, "math_s": t.math_s, "write_s": t.write_s, "prepass_s": t.prepass_s,
               "total_s": total_s}  # fmt: skip
    slowest = sorted(t.per_tensor.items(), key=lambda kv: -kv[1])[:10]
    return {
        "method": ctx.entry.name,
        "paper": ctx.entry.paper,
        "method_options": dataclasses.asdict(ctx.cfg),
        "options": {k: v for k, v in dataclasses.asdict(ctx.opts).items() if k != "method"},
        "out_dir": str(out_dir),
        "contributions": contributions,
        "used": plan.keys,
        "dropped": [ctx.keys[i] for i in range(len(ctx.contribs)) if i not in plan.active],
        "flagged": [k for k, d in adj.decisions.items() if d.outlier],
        "clipped": [k for k, d in adj.decisions.items() if d.action == "clip"],
        "tensors": {"total": len(plan.tensors), "merged": merged, "copied": len(plan.tensors) - merged},
        "regmean_fallback_to_average": plan.fallbacks,
        "timings": {**timings, "slowest_tensors": slowest},
        "per_tensor_s": t.per_tensor,
    }
