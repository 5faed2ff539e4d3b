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

Options (a mapping or :class:`MergeOptions`) mix driver options with the method's own options,
e.g. ``{"weighting": "examples", "density": 0.2}`` for ``ties``: keys that are fields of
:class:`MergeOptions` go to the driver, all others to the method's config dataclass (unknown keys
are refused with the list of valid ones).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coldswarm.common.options import split_known

from .checkpoint import CheckpointReader, ModelDirWriter, dtype_from_name
from .contribution import Contribution, open_contribution
from .errors import ContributionError, MergeConfigError, MergeError
from .materialise import Materialiser
from .methods import METHODS, TensorInputs, get_method
from .screening import ScreenConfig, screen_norms
from .validate import all_finite, validate_contribution

F32 = torch.float32


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


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def _row_numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if shape else 1


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
        return _merge(
            base, opened, key_list, entry, cfg, opts, Path(out_dir), base_version, overwrite, t_start
        )
    finally:
        for c in owned:
            c.close()
        base.close()


def _merge(base, contribs, key_list, entry, cfg, opts, out_dir, base_version, overwrite, t_start):
    if opts.validate != "none":
        for c in contribs:
            validate_contribution(c, base, base_version=base_version, check_values=opts.validate == "full")
    elif base_version is not None:
        for c in contribs:
            if c.meta.base_version != base_version:
                raise ContributionError(
                    c.label, f"was trained from base version {c.meta.base_version}, not {base_version}"
                )
    base_names = base.names()
    mats = [Materialiser(c, base_names) for c in contribs]
    n_all = len(contribs)
    chunk_budget = int(opts.chunk_mb * 2**20)
    timings = {"read_s": 0.0, "math_s": 0.0, "write_s": 0.0, "prepass_s": 0.0}

    # ---- pre-passes: delta norms (screening) and Fisher norms (normalisation), tensor by tensor
    norms = [0.0] * n_all
    screen = opts.screen
    decisions = {}
    factors = [1.0] * n_all
    t0 = time.perf_counter()
    if screen is not None:
        sq = [0.0] * n_all
        for name in base_names:
            who = [i for i in range(n_all) if name in mats[i].plan]
            if not who:
                continue
            shape = base.shape(name)
            step = max(1, chunk_budget // (4 * _row_numel(shape) * 4))
            for s in range(0, _rows(shape), step):
                e = min(_rows(shape), s + step)
                b = base.get_rows(name, s, e, F32)
                for i in who:
                    d = mats[i].delta_rows(name, b, s, e)
                    sq[i] += float(d.double().pow(2).sum())
        norms = [math.sqrt(v) for v in sq]
        decisions = screen_norms(dict(zip(key_list, norms, strict=True)), screen)
        factors = [decisions[k].factor for k in key_list]
    active = [i for i in range(n_all) if factors[i] > 0]
    if not active:
        raise MergeError("screening dropped every contribution; nothing left to merge")

    fisher_scale = [1.0] * n_all
    if entry.needs_fisher and getattr(cfg, "normalize", False):
        for i in active:
            total = 0.0
            for name in mats[i].fishers.values():
                shape = contribs[i].shape(name)
                step = max(1, chunk_budget // (4 * _row_numel(shape) * 2))
                for s in range(0, _rows(shape), step):
                    total += float(
                        contribs[i].get_rows(name, s, min(_rows(shape), s + step)).double().pow(2).sum()
                    )
            fisher_scale[i] = 1.0 / math.sqrt(total) if total > 0 else 1.0
    timings["prepass_s"] = time.perf_counter() - t0

    # ---- weights
    if opts.weighting == "examples":
        raw = [float(contribs[i].meta.num_examples) for i in active]
        if min(raw) <= 0:
            bad = next(contribs[i].label for i in active if contribs[i].meta.num_examples <= 0)
            raise ContributionError(
                bad, "num_examples is 0; weighting='examples' needs every contribution's count"
            )
    else:
        raw = [1.0] * len(active)
    weights = torch.tensor(raw, dtype=torch.float64)
    weights = (weights / weights.sum()).to(F32)
    keys = [key_list[i] for i in active]

    out_dt = dtype_from_name(opts.out_dtype) if opts.out_dtype else None
    layout = {
        fname: {
            n: (out_dt if out_dt and base.dtype(n).is_floating_point else base.dtype(n), base.shape(n))
            for n in names
        }
        for fname, names in base.layout().items()
    }
    metadata = {"format": "pt", **base.metadata}
    copied = merged = 0
    per_tensor: dict[str, float] = {}
    fallbacks: list[str] = []

    check_inputs = entry.name in ("median", "trimmed_mean")
    pool = torch.empty(0, dtype=F32)
    with ModelDirWriter(out_dir, layout, base.model_dir, metadata, overwrite=overwrite) as writer:
        for name in base_names:
            shape = base.shape(name)
            rows, row_numel = _rows(shape), _row_numel(shape)
            who = [i for i in active if name in mats[i].plan]
            if not who:
                # Unchanged by everyone: every method returns the base here; copy without arithmetic.
                t0 = time.perf_counter()
                step = max(1, chunk_budget // max(1, base.nbytes(name) // max(rows, 1)))
                for s in range(0, rows, step):
                    e = min(rows, s + step)
                    chunk = base.get_rows(name, s, e)
                    t1 = time.perf_counter()
                    timings["read_s"] += t1 - t0
                    writer.write_rows(name, s, chunk)
                    t0 = time.perf_counter()
                    timings["write_s"] += t0 - t1
                copied += 1
                continue
            if not base.dtype(name).is_floating_point:
                raise MergeError(
                    f"{name!r} has dtype {base.dtype(name)} in the base; only float tensors can be merged"
                )
            tensor_t0 = time.perf_counter()
            fn, fn_cfg = entry, cfg
            grams_full = None
            if entry.needs_gram and len(shape) == 2 and name.endswith(".weight"):
                module = name[: -len(".weight")]
                if all(module in mats[i].grams for i in active):
                    grams_full = [contribs[i].get(mats[i].grams[module]) for i in active]
                else:
                    fallbacks.append(name)
            if entry.needs_gram and grams_full is None:
                fn = METHODS["average"]
                fn_cfg = fn.config()
            chunkable = fn.chunkable and grams_full is None
            # live fp32 copies per row: thetas (+ Fishers) per contribution, base, output, temporaries
            per_row = 4 * row_numel * (len(active) * fn.work_copies + 4)
            step = max(1, chunk_budget // per_row) if chunkable else rows
            prepared = None
            if fn.prepare is not None and step < rows:
                # TIES' threshold is over the whole tensor; compute it one contribution at a time.
                t0 = time.perf_counter()
                full_base = base.get(name, F32)
                prepared = []
                for i in active:
                    d = mats[i].delta_rows(name, full_base.reshape(rows, *shape[1:]), 0, rows)
                    d = d if d is not None else torch.zeros_like(full_base)
                    value = fn.prepare(d, fn_cfg)
                    # a clipped contribution's delta is d * factor; TIES' threshold scales with it
                    if factors[i] != 1.0 and isinstance(value, float):
                        value *= factors[i]
                    prepared.append(value)
                    del d
                del full_base
                timings["prepass_s"] += time.perf_counter() - t0
            for s in range(0, rows, step):
                e = min(rows, s + step)
                t0 = time.perf_counter()
                chunk_shape = (e - s, *shape[1:]) if shape else ()
                m = (e - s) * row_numel
                # Reused buffers (base rows, then one row per contribution): no fresh pages per chunk,
                # and the (N, m) block lets a method reduce over contributions in one pass.
                need = (len(active) + 1) * m
                if pool.numel() < need:
                    pool = torch.empty(need, dtype=F32)
                b = base.get_rows(name, s, e, F32, out=pool[:m].view(chunk_shape))
                stacked = pool[m:need].view(len(active), *chunk_shape)
                thetas = []
                for j, i in enumerate(active):
                    th = mats[i].theta_rows(name, b, s, e, out=stacked[j])
                    if factors[i] != 1.0:
                        th.sub_(b).mul_(factors[i]).add_(b)
                    # Robust methods can hide a NaN input (sorting pushes it to an end), so their
                    # inputs are checked here; for the others a NaN/Inf input reaches the output,
                    # which is checked below (one pass instead of N).
                    if opts.check_finite and check_inputs and not all_finite(th):
                        raise ContributionError(
                            contribs[i].label, "NaN/Inf in its materialised value", tensor=name
                        )
                    thetas.append(th)
                fishers = None
                if entry.needs_fisher and fn is entry:
                    fishers = []
                    for i in active:
                        fname = mats[i].fishers.get(name)
                        f = contribs[i].get_rows(fname, s, e) if fname else None
                        if f is not None and fisher_scale[i] != 1.0:
                            f.mul_(fisher_scale[i])
                        fishers.append(f)
                t1 = time.perf_counter()
                timings["read_s"] += t1 - t0
                x = TensorInputs(name=name, base=b, thetas=thetas, weights=weights, keys=keys, fishers=fishers,
                                 grams=grams_full, offset=s * row_numel, prepared=prepared,
                                 stacked=stacked)  # fmt: skip
                out = fn(x, fn_cfg)
                if opts.check_finite and not all_finite(out):
                    for i, th in zip(active, thetas, strict=True):  # name the culprit
                        if not all_finite(th):
                            raise ContributionError(
                                contribs[i].label, "NaN/Inf in its materialised value", tensor=name
                            )
                    raise MergeError(
                        f"{entry.name} produced NaN/Inf for {name!r}; check the method's options"
                    )
                t2 = time.perf_counter()
                timings["math_s"] += t2 - t1
                writer.write_rows(name, s, out)
                timings["write_s"] += time.perf_counter() - t2
                del thetas, fishers, out, x, stacked, b
            per_tensor[name] = time.perf_counter() - tensor_t0
            merged += 1
        t0 = time.perf_counter()
    timings["write_s"] += time.perf_counter() - t0  # commit: fsync + rename
    timings["total_s"] = time.perf_counter() - t_start

    contrib_report = []
    for i, c in enumerate(contribs):
        d = decisions.get(key_list[i])
        contrib_report.append({
            "key": key_list[i],
            "form": c.meta.form,
            "num_examples": c.meta.num_examples,
            "base_version": c.meta.base_version,
            "weight": float(weights[active.index(i)]) if i in active else 0.0,
            "delta_norm": norms[i] if screen is not None else None,
            "screen": d.action if d else None,
            "norm_ratio": d.ratio if d else None,
        })  # fmt: skip
    slowest = sorted(per_tensor.items(), key=lambda kv: -kv[1])[:10]
    return {
        "method": entry.name,
        "paper": entry.paper,
        "method_options": dataclasses.asdict(cfg),
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "method"},
        "out_dir": str(out_dir),
        "contributions": contrib_report,
        "used": keys,
        "dropped": [key_list[i] for i in range(n_all) if i not in active],
        "flagged": [k for k, d in decisions.items() if d.outlier],
        "clipped": [k for k, d in decisions.items() if d.action == "clip"],
        "tensors": {"total": len(base_names), "merged": merged, "copied": copied},
        "regmean_fallback_to_average": fallbacks,
        "timings": {**timings, "slowest_tensors": slowest},
        "per_tensor_s": per_tensor,
    }
