"""The contribution payload: one safetensors file of namespaced tensors plus ``coldswarm`` JSON metadata.

Tensor names (docs/INTERFACES.md):

==========================  ==================  =============================================
name                        holds               shape
==========================  ==================  =============================================
``weight/<param>``          full weights        the base parameter's
``delta/<param>``           task vector         the base parameter's
``lora_A/<module>``         LoRA A              (r, in) as PEFT stores it
``lora_B/<module>``         LoRA B              (out, r) as PEFT stores it
``ia3/<module>``            IA3 scaling vector  (n,) (PEFT's (1, in) / (out, 1) also accepted)
``fisher/<param>``          diagonal Fisher     the base parameter's
``gram/<module>``           RegMean Gram        (in, in)
==========================  ==================  =============================================

``<param>`` is a base parameter name; ``<module>`` a module path whose weight is ``<module>.weight``.
Parameters a contribution does not name are the base's. A LoRA/IA3 contribution may also carry
``weight/`` or ``delta/`` tensors for modules PEFT trains fully (``modules_to_save``).

Typical use on a worker::

    tensors, meta = from_peft_model(peft_model, num_examples=1200, base_version=3)
    tensors.update(collect_fisher(model, batches, ...)); tensors.update(collect_gram(model, batches))
    save_contribution("contribution.safetensors", tensors, meta)

and on the coordinator::

    with open_contribution(path) as c:
        validate_contribution(c, base_reader)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coldswarm.common.durable import fsync_dir

from .checkpoint import SafetensorsFile, SafetensorsWriter
from .errors import CheckpointError, ContributionError

FORMAT = 1
FORMS = ("full", "delta", "lora", "ia3")
NAMESPACES = ("weight", "delta", "lora_A", "lora_B", "ia3", "fisher", "gram")
METADATA_KEY = "coldswarm"


def split_name(name: str) -> tuple[str, str]:
    """('lora_A', 'encoder.block.0...q') from 'lora_A/encoder.block.0...q'; ValueError if not namespaced."""
    ns, sep, rest = name.partition("/")
    if not sep or ns not in NAMESPACES or not rest:
        raise ValueError(f"tensor name {name!r} is not '<namespace>/<name>' with a namespace in {NAMESPACES}")
    return ns, rest


@dataclass
class LoraMeta:
    r: int = field(metadata={"help": "LoRA rank (the default; a module's actual rank is its A's first dim)"})
    alpha: float = field(
        metadata={"help": "lora_alpha; the scaling is alpha/r (alpha/sqrt(r) with use_rslora)"}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "the base stores weights as (in, out) (GPT-2 Conv1D)"}
    )
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r)"})
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "per-module alpha where it differs from alpha (exact module paths)"},
    )


@dataclass
class IA3Meta:
    feedforward_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "modules whose IA3 vector scales the input dim (PEFT's feedforward); all others scale the output dim"
        },
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "the base stores weights as (in, out)"})


@dataclass
class ContributionMeta:
    """The ``coldswarm`` metadata of a contribution (JSON in the safetensors header)."""

    form: str = field(metadata={"help": "'full', 'delta', 'lora' or 'ia3'"})
    base_version: int | None = field(
        default=None,
        metadata={"help": "the base version this was trained from; the coordinator refuses a mismatch"},
    )
    num_examples: int = field(
        default=0, metadata={"help": "training examples seen; used by weighting='examples'"}
    )
    lora: LoraMeta | None = field(default=None, metadata={"help": "required when form == 'lora'"})
    ia3: IA3Meta | None = field(default=None, metadata={"help": "required when form == 'ia3'"})
    statistics: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "e.g. {'fisher': {'kind': 'expected', 'num_examples': 256}, 'regmean': {'num_tokens': 40960}}"
        },
    )
    metrics: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "free-form training metrics, e.g. val_loss_before/after"}
    )
    format: int = FORMAT
    extra: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "unknown keys, kept so a newer worker's metadata round-trips"}
    )

    def to_json(self) -> str:
        d: dict[str, Any] = {"format": self.format, "form": self.form, "base_version": self.base_version,
                             "num_examples": self.num_examples}  # fmt: skip
        if self.lora is not None:
            d["lora"] = dataclasses.asdict(self.lora)
            if not d["lora"]["alpha_pattern"]:
                del d["lora"]["alpha_pattern"]
        if self.ia3 is not None:
            d["ia3"] = dataclasses.asdict(self.ia3)
        if self.statistics:
            d["statistics"] = self.statistics
        if self.metrics:
            d["metrics"] = self.metrics
        d.update(self.extra)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, label: str = "<contribution>") -> ContributionMeta:
        def bad(msg: str) -> ContributionError:
            return ContributionError(label, f"metadata '{METADATA_KEY}': {msg}")

        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise bad(f"not JSON ({e})") from e
        if not isinstance(d, dict):
            raise bad("not a JSON object")
        d = dict(d)
        fmt = d.pop("format", None)
        if fmt != FORMAT:
            raise bad(f"format {fmt!r} is not {FORMAT}; upgrade coldswarm or re-save the contribution")
        form = d.pop("form", None)
        if form not in FORMS:
            raise bad(f"form {form!r} must be one of {FORMS}")
        num = d.pop("num_examples", 0)
        if not isinstance(num, int) or isinstance(num, bool) or num < 0:
            raise bad(f"num_examples must be a non-negative integer (got {num!r})")
        bv = d.pop("base_version", None)
        if bv is not None and (not isinstance(bv, int) or isinstance(bv, bool)):
            raise bad(f"base_version must be an integer or null (got {bv!r})")
        lora = ia3 = None
        try:
            if (raw := d.pop("lora", None)) is not None:
                lora = LoraMeta(**raw)
                if not isinstance(lora.r, int) or lora.r <= 0 or not isinstance(lora.alpha, (int, float)):
                    raise ValueError("r must be a positive integer and alpha a number")
            if (raw := d.pop("ia3", None)) is not None:
                ia3 = IA3Meta(**raw)
        except (TypeError, ValueError) as e:
            raise bad(f"bad lora/ia3 section: {e}") from e
        if form == "lora" and lora is None:
            raise bad("form 'lora' needs a 'lora' section with r and alpha")
        if form == "ia3" and ia3 is None:
            raise bad("form 'ia3' needs an 'ia3' section with feedforward_modules")
        stats = d.pop("statistics", {}) or {}
        metrics = d.pop("metrics", {}) or {}
        if not isinstance(stats, dict) or not isinstance(metrics, dict):
            raise bad("statistics and metrics must be JSON objects")
        return cls(form=form, base_version=bv, num_examples=num, lora=lora, ia3=ia3, statistics=stats,
                   metrics=metrics, format=fmt, extra=d)  # fmt: skip


def save_contribution(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: ContributionMeta
) -> Path:
    """Write a contribution atomically (temp file, fsync, rename). Names must be namespaced."""
    path = Path(path)
    for name in tensors:
        try:
            split_name(name)
        except ValueError as e:
            raise ContributionError(str(path), str(e), tensor=name) from None
    ContributionMeta.from_json(meta.to_json(), str(path))  # refuse metadata we could not read back
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = SafetensorsWriter(tmp, specs, {METADATA_KEY: meta.to_json()})
        try:
            for name, t in tensors.items():
                w.write(name, t)
            w.close()
        except BaseException:
            w.abort()
            raise
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Contribution:
    """An opened contribution: its metadata and lazy, tensor-by-tensor access to its tensors.

    ``label`` names it in every error (defaults to the file path). Close it (or use ``with``).
    If the file is wrapped by a codec (see :mod:`coldswarm.fusion.codecs`), it is decoded to a
    temporary plain safetensors file first, which ``close`` removes.
    """

    def __init__(self, path: str | os.PathLike, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        self._tmp: Path | None = None
        source = self.path
        try:
            from .codecs import decode_file, sniff_file  # local: codecs import zstandard lazily

            codec = sniff_file(self.path)
            if codec not in (None, "none"):
                fd, tmp = tempfile.mkstemp(prefix=".contribution.", suffix=".safetensors")
                os.close(fd)
                self._tmp = Path(tmp)
                decode_file(self.path, self._tmp)
                source = self._tmp
            self.file = SafetensorsFile(source)
        except (CheckpointError, OSError, ValueError) as e:
            self._cleanup()
            raise ContributionError(self.label, f"cannot be read: {e}") from e
        raw = self.file.metadata.get(METADATA_KEY)
        if raw is None:
            self.close()
            raise ContributionError(
                self.label,
                f"no '{METADATA_KEY}' metadata; write contributions with coldswarm.fusion.contribution.save_contribution",
            )
        try:
            self.meta = ContributionMeta.from_json(raw, self.label)
        except ContributionError:
            self.close()
            raise
        self._parsed: dict[str, tuple[str, str]] = {}
        for name in self.file.names():
            try:
                self._parsed[name] = split_name(name)
            except ValueError as e:
                self.close()
                raise ContributionError(self.label, str(e), tensor=name) from None

    def _cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def close(self) -> None:
        f = getattr(self, "file", None)
        if f is not None:
            f.close()
        self._cleanup()

    def __enter__(self) -> Contribution:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Contribution({self.label!r}, form={self.meta.form!r}, tensors={len(self._parsed)})"

    def names(self) -> list[str]:
        return list(self._parsed)

    def entries(self, namespace: str) -> dict[str, str]:
        """{rest: full name} for the tensors in ``namespace`` (e.g. 'fisher' -> {param: 'fisher/param'})."""
        return {rest: name for name, (ns, rest) in self._parsed.items() if ns == namespace}

    def __contains__(self, name: str) -> bool:
        return name in self._parsed

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.file.dtype(name)

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """A tensor, as fp32 by default (all arithmetic is fp32)."""
        return self.file.get(name, dtype)

    def get_rows(
        self,
        name: str,
        start: int,
        stop: int,
        dtype: torch.dtype | None = torch.float32,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.file.get_rows(name, start, stop, dtype, out)


def open_contribution(path: str | os.PathLike, label: str | None = None) -> Contribution:
    """Open a contribution file (plain safetensors or codec-wrapped) for validation or merging."""
    return Contribution(path, label)


def from_peft_model(
    peft_model: Any,
    adapter_name: str | None = None,
    *,
    num_examples: int = 0,
    base_version: int | None = None,
    statistics: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], ContributionMeta]:
    """Convert a PEFT LoRA or IA3 model's adapter into contribution tensors and metadata.

    Module paths are those of the underlying base model (``peft_model.get_base_model()``), which are
    the base checkpoint's names without the ``.weight`` suffix. Fully trained ``modules_to_save``
    become ``weight/<param>`` tensors. DoRA, LoRA on embeddings/convolutions and other adapter types
    are refused with an explanation (the merge could not reproduce them exactly).
    """
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer

    adapter = adapter_name or getattr(peft_model, "active_adapter", None) or "default"
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    config = peft_model.peft_config[adapter]
    kind = str(getattr(config, "peft_type", "")).split(".")[-1].upper()
    base = peft_model.get_base_model()
    tensors: dict[str, torch.Tensor] = {}
    if kind == "LORA":
        if getattr(config, "use_dora", False):
            raise ValueError("DoRA adapters are not supported: train with use_dora=False")
        default_alpha = float(config.lora_alpha)
        lora = LoraMeta(r=int(config.r), alpha=default_alpha, fan_in_fan_out=bool(config.fan_in_fan_out),
                        use_rslora=bool(getattr(config, "use_rslora", False)))  # fmt: skip
        for mod_name, module in base.named_modules():
            if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
                continue
            if not isinstance(module.lora_A[adapter], torch.nn.Linear):
                raise ValueError(
                    f"{mod_name}: only LoRA on linear layers is supported (got {type(module).__name__})"
                )
            tensors[f"lora_A/{mod_name}"] = module.lora_A[adapter].weight.detach().cpu().contiguous()
            tensors[f"lora_B/{mod_name}"] = module.lora_B[adapter].weight.detach().cpu().contiguous()
            alpha = float(module.lora_alpha[adapter])
            if alpha != default_alpha:
                lora.alpha_pattern[mod_name] = alpha
            if bool(module.use_rslora[adapter]) != lora.use_rslora:
                raise ValueError(f"{mod_name}: mixed use_rslora across modules is not supported")
        meta = ContributionMeta(form="lora", lora=lora)
    elif kind == "IA3":
        ia3 = IA3Meta(fan_in_fan_out=bool(getattr(config, "fan_in_fan_out", False)))
        for mod_name, module in base.named_modules():
            if not isinstance(module, IA3Layer) or adapter not in module.ia3_l:
                continue
            if not isinstance(module.get_base_layer(), torch.nn.Linear) and not ia3.fan_in_fan_out:
                raise ValueError(f"{mod_name}: only IA3 on linear layers is supported")
            tensors[f"ia3/{mod_name}"] = module.ia3_l[adapter].detach().cpu().reshape(-1).contiguous()
            if module.is_feedforward:
                ia3.feedforward_modules.append(mod_name)
        meta = ContributionMeta(form="ia3", ia3=ia3)
    else:
        raise ValueError(f"unsupported PEFT adapter type {kind!r}: coldswarm merges LoRA and IA3 adapters")
    if not tensors:
        raise ValueError(f"adapter {adapter!r} has no LoRA/IA3 layers in this model")
    # modules_to_save: PEFT keeps a trained copy of the whole module; ship its parameters in full.
    for mod_name, module in base.named_modules():
        wrapper_sets = getattr(module, "modules_to_save", None)
        if isinstance(wrapper_sets, torch.nn.ModuleDict) and adapter in wrapper_sets:
            for pname, p in wrapper_sets[adapter].named_parameters():
                tensors[f"weight/{mod_name}.{pname}"] = p.detach().cpu().contiguous()
    meta.num_examples = int(num_examples)
    meta.base_version = base_version
    meta.statistics = dict(statistics or {})
    meta.metrics = dict(metrics or {})
    return tensors, meta
