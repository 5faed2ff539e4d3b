"""Checks an uploaded contribution before anything records it.

The coordinator's own checks run on every upload (they need only safetensors):
the payload parses as safetensors, every tensor name is ``<namespace>/<name>``
with a known namespace and a ``<name>`` the base has, shapes fit the base,
dtypes are floating point, and no value is NaN or Inf. Then
``coldswarm.fusion.validate.validate_contribution`` runs (it knows the forms'
finer rules). Each failure is an
:class:`InvalidArgument` naming the tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from coldswarm.common.quoting import quote
from coldswarm.coordinator.errors import FailedPrecondition, InvalidArgument
from coldswarm.coordinator.limits import INT64_MAX, UINT32_MAX, check_int
from coldswarm.coordinator.versions import FLOAT_DTYPES, ParamInfo
from coldswarm.fusion.contribution import open_contribution
from coldswarm.fusion.errors import ContributionError
from coldswarm.fusion.validate import validate_contribution

# Namespace -> how the rest of the name relates to the base: a parameter, or a module
# whose `<module>.weight` is a parameter (docs/INTERFACES.md, "Contribution payload").
NAMESPACES = {
    "weight": "param",
    "delta": "param",
    "fisher": "param",
    "lora_A": "module",
    "lora_B": "module",
    "ia3": "module",
    "gram": "module",
}
FORM_OF = {"weight": "full", "delta": "delta", "lora_A": "lora", "lora_B": "lora", "ia3": "ia3"}
#: the longest tensor name taken (a base parameter's name is far shorter)
NAME_CHARS = 512
#: how much of a tensor name a refusal quotes (whole for any real parameter name)
TENSOR_QUOTE = 120
#: how a contribution is named in refusals: never by the file it sits in on the coordinator
LABEL = "upload"


@dataclass
class ContributionSummary:
    form: str
    num_tensors: int
    meta: dict = field(default_factory=dict)
    num_examples: int = 0  # what the metadata says (0 when it says nothing)


def _shape_ok(ns: str, shape: tuple[int, ...], base: tuple[int, ...]) -> bool:
    if NAMESPACES[ns] == "param":
        return shape == base
    if len(base) != 2:  # adapters and Gram matrices attach to linear layers (out, in)
        return False
    out_f, in_f = base
    if ns == "lora_A":
        return len(shape) == 2 and shape[1] == in_f and shape[0] >= 1
    if ns == "lora_B":
        return len(shape) == 2 and shape[0] == out_f and shape[1] >= 1
    if ns == "ia3":
        return (
            len(shape) == 1
            and shape[0] in (out_f, in_f)
            or (len(shape) == 2 and 1 in shape and max(shape) in (out_f, in_f))
        )
    if ns == "gram":
        return shape == (in_f, in_f)
    return False


def _finite(t: torch.Tensor) -> bool:
    # amax/amin propagate NaN and surface +-Inf; two reductions, no temporaries. (torch.isfinite
    # allocates a mask and was ~300x slower on CPU here, the bulk of validating a large upload.)
    return bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))


def check_contribution(
    path: Path,
    base: dict[str, ParamInfo],
    base_version: int,
    base_dir: Path | None = None,
    method: str = "average",
) -> ContributionSummary:
    """Validate the safetensors file at ``path`` against the base's tensors; see the module doc.

    ``base`` is the base version's tensor index; ``base_dir`` its directory, for fusion's
    validator.
    """
    try:
        fh = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = quote(exc if not isinstance(exc, OSError) else exc.strerror, 120)
        raise InvalidArgument(
            f"the payload is not a safetensors file ({reason}); contributions must be safetensors "
            "(docs/WIRE.md, the contribution payload)"
        ) from None
    with fh:
        meta = _read_meta(fh)
        num_examples = _check_meta(meta)
        claimed = meta.get("base_version")
        if claimed is not None and claimed != base_version:
            raise FailedPrecondition(
                f"the contribution says it was trained from version {claimed}, but this round's base is "
                f"version {base_version}: download version {base_version} and train again"
            )
        names = list(fh.keys())
        if not names:
            raise InvalidArgument("the contribution holds no tensors")
        for name in names:  # every name is bounded before any is quoted or looked up
            if len(name) > NAME_CHARS:
                raise InvalidArgument(
                    f"tensor {quote(name, TENSOR_QUOTE)}: the name is {len(name)} characters; the limit is {NAME_CHARS}"
                )
        forms = set()
        lora = {"lora_A": set(), "lora_B": set()}
        for name in names:
            ns, rest = _check_tensor(fh, name, base)
            if ns in lora:
                lora[ns].add(rest)
            if ns in FORM_OF:
                forms.add(FORM_OF[ns])
        if lora["lora_A"] != lora["lora_B"]:
            odd = sorted(lora["lora_A"] ^ lora["lora_B"])[0]
            raise InvalidArgument(f"module {quote(odd, TENSOR_QUOTE)} has only one of lora_A/lora_B")
    if len(forms) > 1:
        raise InvalidArgument(f"the contribution mixes forms {sorted(forms)}; send one form per contribution")
    form = meta.get("form") or (forms.pop() if forms else "statistics")
    if base_dir is not None:
        _fusion_validate(path, base_dir, base_version, method)
    return ContributionSummary(form=str(form), num_tensors=len(names), meta=meta, num_examples=num_examples)


def _read_meta(fh) -> dict:
    """The file's ``coldswarm`` metadata as a dict (empty when absent); refused unless a JSON object."""
    raw_meta = (fh.metadata() or {}).get("coldswarm")
    if raw_meta is None:
        return {}
    try:
        meta = json.loads(raw_meta)
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise InvalidArgument(f"the `coldswarm` metadata is not a JSON object: {quote(exc, 120)}") from None
    return meta


def _check_tensor(fh, name: str, base: dict[str, ParamInfo]) -> tuple[str, str]:
    """Refuse tensor ``name`` unless its namespace, target parameter, dtype, shape and values fit the base;
    returns (namespace, the rest of the name)."""
    ns, sep, rest = name.partition("/")
    if not sep or ns not in NAMESPACES:
        raise InvalidArgument(
            f"tensor {quote(name, TENSOR_QUOTE)}: names must start with one of {sorted(NAMESPACES)} and '/' "
            "(docs/WIRE.md, the contribution payload)"
        )
    target = rest if NAMESPACES[ns] == "param" else f"{rest}.weight"
    info = base.get(target)
    if info is None:
        raise InvalidArgument(
            f"tensor {quote(name, TENSOR_QUOTE)}: the base model has no parameter {quote(target, TENSOR_QUOTE)}"
        )
    sl = fh.get_slice(name)
    shape = tuple(sl.get_shape())
    dtype = str(sl.get_dtype())
    if dtype not in FLOAT_DTYPES:
        raise InvalidArgument(
            f"tensor {quote(name, TENSOR_QUOTE)}: dtype {dtype} is not floating point (F16/BF16/F32/F64)"
        )
    if not _shape_ok(ns, shape, info.shape):
        raise InvalidArgument(
            f"tensor {quote(name, TENSOR_QUOTE)}: shape {list(shape)} does not fit the base parameter "
            f"{quote(target, TENSOR_QUOTE)} of shape {list(info.shape)}"
        )
    tensor = fh.get_tensor(name)
    if tensor.numel() and not _finite(tensor):
        raise InvalidArgument(f"tensor {quote(name, TENSOR_QUOTE)} holds NaN or Inf values")
    return ns, rest


def _check_meta(meta: dict) -> int:
    """The metadata fields the coordinator stores or compares, in range before they reach SQLite; returns
    ``num_examples``. (fusion's validator checks the rest; its messages then quote only bounded values.)"""
    form = meta.get("form")
    if form is not None and (not isinstance(form, str) or form not in (*FORM_OF.values(), "statistics")):
        raise InvalidArgument(
            f"the metadata's form {quote(form)} is not one of {sorted({*FORM_OF.values(), 'statistics'})}"
        )
    if meta.get("base_version") is not None:
        check_int(meta["base_version"], "the metadata's base_version", 0, UINT32_MAX)
    num_examples = meta.get("num_examples")
    return 0 if num_examples is None else check_int(num_examples, "the metadata's num_examples", 0, INT64_MAX)


def _fusion_validate(path: Path, base_dir: Path, base_version: int, method: str) -> None:
    """fusion's own validation (it names the contribution, here by :data:`LABEL`, and the tensor)."""
    try:
        with open_contribution(path, label=LABEL) as contribution:
            validate_contribution(
                contribution,
                str(base_dir),
                base_version=base_version,
                require_fisher=method == "fisher",
                require_gram=method == "regmean",
            )
    except ContributionError as exc:
        raise InvalidArgument(str(exc)) from None
