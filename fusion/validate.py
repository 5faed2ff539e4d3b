"""Validation of a contribution against the base it claims to extend, before any arithmetic.

:func:`validate_contribution` is what the coordinator runs on every upload (and what
``merge_checkpoints`` re-runs structurally before merging). It checks, in this order:

1. the metadata parses (format, form, LoRA/IA3 sections) and, if asked, names the expected base version;
2. every tensor's namespace and target exist in the base: ``weight/``, ``delta/`` and ``fisher/``
   name a base parameter of the same shape; ``lora_A``/``lora_B`` come in pairs whose product has
   the module weight's shape; ``ia3`` vectors match the dimension they scale; ``gram/`` is
   (in, in) for a 2-D module weight;
3. no parameter is given two values (e.g. ``weight/p`` and a LoRA on p's module);
4. the form is consistent with the tensors (a 'lora' contribution has LoRA tensors, ...);
5. with ``check_values`` (default): every tensor is finite and every Fisher / Gram diagonal is
   non-negative -- read tensor by tensor, so the memory used is one tensor.

Any violation raises :class:`~coldswarm.fusion.errors.ContributionError` naming the contribution
and the tensor, with what to do about it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .checkpoint import CheckpointReader
from .contribution import Contribution, open_contribution
from .errors import ContributionError


@dataclass
class ValidationReport:
    label: str
    form: str
    num_examples: int
    base_version: int | None
    num_tensors: int
    params_touched: list[str] = field(default_factory=list)
    fisher_params: int = 0
    gram_modules: int = 0


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN/Inf. Fast path: one reduction (a NaN or Inf anywhere makes the sum
    non-finite); only a non-finite sum (or an overflow of huge finite values) pays the exact check."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def validate_contribution(
    contribution: Contribution | str | os.PathLike,
    base: CheckpointReader | str | os.PathLike,
    *,
    base_version: int | None = None,
    check_values: bool = True,
    require_fisher: bool = False,
    require_gram: bool = False,
) -> ValidationReport:
    """Check that ``contribution`` fits ``base``; raise ContributionError naming what does not.

    ``base_version``: if given, the contribution's ``base_version`` must equal it (a contribution
    trained from another version must never be merged silently). ``require_fisher`` /
    ``require_gram``: the method to be used needs these statistics for every parameter/module the
    contribution changes. Returns a :class:`ValidationReport` summary.
    """
    own_c = not isinstance(contribution, Contribution)
    own_b = not isinstance(base, CheckpointReader)
    c = open_contribution(contribution) if own_c else contribution
    try:
        b = CheckpointReader(base) if own_b else base
        try:
            return _validate(c, b, base_version, check_values, require_fisher, require_gram)
        finally:
            if own_b:
                b.close()
    finally:
        if own_c:
            c.close()


def _validate(
    c: Contribution,
    base: CheckpointReader,
    base_version: int | None,
    check_values: bool,
    require_fisher: bool,
    require_gram: bool,
) -> ValidationReport:
    meta = c.meta
    check = _Checks(c, base)
    if base_version is not None and meta.base_version != base_version:
        raise check.fail(
            f"was trained from base version {meta.base_version}, not the current base {base_version}; "
            "download the current base and train again"
        )
    check.weights_and_deltas()
    check.lora()
    check.ia3()
    fishers, grams = check.statistics()
    check.form()
    check.required_statistics(fishers, grams, require_fisher, require_gram)
    if check_values:
        check.values()
    return ValidationReport(
        label=c.label,
        form=meta.form,
        num_examples=meta.num_examples,
        base_version=meta.base_version,
        num_tensors=len(c.names()),
        params_touched=sorted(check.touched),
        fisher_params=len(fishers),
        gram_modules=len(grams),
    )


class _Checks:
    """The checks of one contribution against one base, one method per kind of tensor or rule, run in the
    module docstring's order. ``touched`` maps each base parameter given a value to the tensor giving it."""

    def __init__(self, c: Contribution, base: CheckpointReader):
        self.c, self.base = c, base
        self.touched: dict[str, str] = {}

    def fail(self, msg: str, tensor: str | None = None) -> ContributionError:
        return ContributionError(self.c.label, msg, tensor=tensor)

    def base_param(self, name: str, param: str) -> tuple[int, ...]:
        if param not in self.base:
            raise self.fail(
                f"the base has no parameter {param!r}; names must be the base model's parameter names", name
            )
        return self.base.shape(param)

    def same_shape(self, name: str, param: str) -> None:
        want = self.base_param(name, param)
        if self.c.shape(name) != want:
            raise self.fail(f"shape {self.c.shape(name)} does not match the base parameter's {want}", name)

    def need_float(self, name: str) -> None:
        if not _float(self.c.dtype(name)):
            raise self.fail(f"dtype {self.c.dtype(name)} is not a floating-point type", name)

    def claim(self, param: str, name: str) -> None:
        if param in self.touched:
            raise self.fail(
                f"gives {param!r} two values (also via {self.touched[param]!r}); send one form per parameter",
                name,
            )
        self.touched[param] = name

    def weights_and_deltas(self) -> None:
        for ns in ("weight", "delta"):
            for p, name in self.c.entries(ns).items():
                self.same_shape(name, p)
                self.need_float(name)
                self.claim(p, name)

    def lora(self) -> None:
        c, meta = self.c, self.c.meta
        lora_a, lora_b = c.entries("lora_A"), c.entries("lora_B")
        if set(lora_a) != set(lora_b):
            odd = sorted(set(lora_a) ^ set(lora_b))[0]
            present = lora_a.get(odd) or lora_b[odd]
            raise self.fail(
                "LoRA tensors come in pairs lora_A/<module> and lora_B/<module>; its partner is missing",
                present,
            )
        if lora_a and meta.lora is None:
            raise self.fail(
                "has LoRA tensors but no 'lora' metadata (r, alpha); save it with from_peft_model's meta"
            )
        for m, a_name in lora_a.items():
            b_name = lora_b[m]
            w = self.base_param(a_name, f"{m}.weight")
            if len(w) != 2:
                raise self.fail(
                    f"LoRA targets {m}.weight of shape {w}; only 2-D (linear) weights are supported", a_name
                )
            a_shape, b_shape = c.shape(a_name), c.shape(b_name)
            out_dim, in_dim = (w[1], w[0]) if meta.lora.fan_in_fan_out else w
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] < 1:
                raise self.fail(
                    f"lora_A {a_shape} and lora_B {b_shape} are not (r, in) and (out, r) with one rank r",
                    a_name,
                )
            if a_shape[1] != in_dim or b_shape[0] != out_dim:
                raise self.fail(
                    f"lora_A {a_shape} / lora_B {b_shape} do not fit the weight {w} "
                    f"(need (r, {in_dim}) and ({out_dim}, r){' with fan_in_fan_out' if meta.lora.fan_in_fan_out else ''})",
                    a_name,
                )
            self.need_float(a_name)
            self.need_float(b_name)
            self.claim(f"{m}.weight", a_name)

    def ia3(self) -> None:
        c, meta = self.c, self.c.meta
        ia3 = c.entries("ia3")
        if ia3 and meta.ia3 is None:
            raise self.fail("has IA3 tensors but no 'ia3' metadata (feedforward_modules)")
        ff = set(meta.ia3.feedforward_modules) if meta.ia3 else set()
        for m, name in ia3.items():
            w = self.base_param(name, f"{m}.weight")
            if len(w) != 2:
                raise self.fail(
                    f"IA3 targets {m}.weight of shape {w}; only 2-D (linear) weights are supported", name
                )
            scale_dim1 = (m in ff) != meta.ia3.fan_in_fan_out
            want = w[1] if scale_dim1 else w[0]
            shape = c.shape(name)
            n = 1
            for s in shape:
                n *= s
            if n != want or sum(s != 1 for s in shape) > 1:
                kind = (
                    "feedforward (scales the input dim)"
                    if m in ff
                    else "non-feedforward (scales the output dim)"
                )
                raise self.fail(
                    f"IA3 vector of shape {shape} does not fit {m}.weight {w} as a {kind} module; need {want} values",
                    name,
                )
            self.need_float(name)
            self.claim(f"{m}.weight", name)
            if m not in ff and f"{m}.bias" in self.base:
                self.claim(f"{m}.bias", name)
        unknown_ff = ff - set(ia3)
        if ia3 and unknown_ff:
            raise self.fail(
                f"ia3.feedforward_modules names modules without an IA3 vector: {sorted(unknown_ff)[:3]}"
            )

    def statistics(self) -> tuple[dict[str, str], dict[str, str]]:
        """Check the Fisher and Gram tensors' shapes; returns them (``{param: name}``, ``{module: name}``)."""
        c = self.c
        fishers = c.entries("fisher")
        for p, name in fishers.items():
            self.same_shape(name, p)
            self.need_float(name)
        grams = c.entries("gram")
        for m, name in grams.items():
            w = self.base_param(name, f"{m}.weight")
            if len(w) != 2:
                raise self.fail(f"a Gram matrix needs a 2-D module weight; {m}.weight is {w}", name)
            if c.shape(name) != (w[1], w[1]):
                raise self.fail(
                    f"Gram shape {c.shape(name)} should be ({w[1]}, {w[1]}) for {m}.weight {w}", name
                )
            self.need_float(name)
        return fishers, grams

    def form(self) -> None:
        meta = self.c.meta
        forms = {"full": ("weight",), "delta": ("delta",), "lora": ("lora_A",), "ia3": ("ia3",)}
        if not any(self.c.entries(ns) for ns in forms[meta.form]):
            raise self.fail(f"form is {meta.form!r} but it holds no {forms[meta.form][0]}/ tensors")

    def required_statistics(
        self, fishers: dict[str, str], grams: dict[str, str], require_fisher: bool, require_gram: bool
    ) -> None:
        touched = self.touched
        if require_fisher:
            missing = sorted(p for p in touched if p not in fishers)
            if missing:
                raise self.fail(
                    "the merge method needs a Fisher for every changed parameter; run collect_fisher",
                    f"fisher/{missing[0]}",
                )
        if require_gram:
            missing = sorted(
                p[: -len(".weight")] for p in touched
                if p.endswith(".weight") and len(self.base.shape(p)) == 2 and p[: -len(".weight")] not in grams
            )  # fmt: skip
            if missing:
                raise self.fail(
                    "the merge method needs a Gram for every changed linear module; run collect_gram",
                    f"gram/{missing[0]}",
                )

    def values(self) -> None:
        """Every tensor finite, every Fisher and Gram diagonal non-negative: one tensor in memory at a time."""
        c = self.c
        for name in c.names():
            t = c.get(name, dtype=None)
            if not all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise self.fail(
                    f"{bad} NaN/Inf value(s); the training run diverged -- lower the learning rate and retrain",
                    name,
                )
            ns = name.split("/", 1)[0]
            if ns == "fisher" and bool((t < 0).any()):
                raise self.fail(
                    "Fisher values must be non-negative (it is a mean of squared gradients)", name
                )
            if ns == "gram" and bool((torch.diagonal(t) < 0).any()):
                raise self.fail("a Gram matrix (mean of x^T x) must have a non-negative diagonal", name)
