"""The round-options schema: what a round's options may say, read the same way by both roles.

The admin opens a round with a JSON object of options (``coldswarm-admin round open --options``). The
coordinator turns it into each worker's task (:func:`fusion_task`; a pretrain task carries the round's
``hyperparameters`` as JSON), and the worker reads the task back into typed settings
(:func:`fusion_hyperparameters`, :func:`pretrain_hyperparameters`). :func:`check_round_options` runs the
worker's reading at OpenRound, so a round every worker would refuse (a typo, an impossible
combination) is refused at once rather than failing each assignment until its deadline. It needs no
training stack (torch, PEFT, hivemind): facts owned below the roles come in as arguments, namely the
codec names (``coldswarm.fusion.codecs.CODECS``) and the statistics the round's merge method needs (from
the flags of fusion's method registry).

The keys a round's options may have, per kind, are :data:`ROUND_OPTION_KEYS` (the one place they are
listed); any other key is refused with the closest known one, as hyperparameter names are.
Fusion round options: ``peft_method``, ``hyperparameters`` (the :class:`FusionHyperparameters` fields),
``statistics``, ``codec``, ``shard_prefix`` (and ``merge``, the merge's own options).
Pretrain round options: ``epochs``, ``target_batch_size``, ``run_id``, ``corpus_prefix``,
``collect_timeout_s``, ``algorithm`` (shorthand for ``hyperparameters.algorithm``) and ``hyperparameters``: the
:class:`PretrainDataOptions` fields plus the worker's
``SwarmConfig`` fields.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coldswarm.common.options import build, refuse_unknown, split_known
from coldswarm.proto import coldswarm_pb2 as pb

KINDS = ("fusion", "pretrain")
PEFT_METHODS = ("lora", "ia3", "full")
#: the statistics a worker collects, by the name a round asks for them
STATISTICS = {"fisher": "diagonal Fisher information", "regmean": "RegMean Gram matrices of linear inputs"}
#: learning rate per ``peft_method`` when the round names none
DEFAULT_LR = {"lora": 1e-3, "ia3": 5e-3, "full": 3e-4}
#: keys of a pretrain round's ``hyperparameters`` that are PretrainTask's own fields, not swarm options
PRETRAIN_TASK_FIELDS = ("epochs", "target_batch_size")
#: the keys a round's options may have, per kind, with what each holds (anything else is refused)
ROUND_OPTION_KEYS: dict[str, dict[str, str]] = {
    "fusion": {
        "peft_method": "lora, ia3 or full",
        "hyperparameters": "the FusionHyperparameters fields",
        "statistics": "fisher and/or regmean (default: what the merge method needs)",
        "codec": "the codec workers encode their contribution with",
        "shard_prefix": "which data shards name: default (the embedded tasks, a group of tasks each),"
        " default-mixed (a slice of every embedded task each) or local (the worker's own)",
        "merge": "the merge's own options (the method's config fields and the merge driver's)",
        "gate": "the publication gate: policy, metric, tolerance, higher_is_better (the coordinator's)",
    },
    "pretrain": {
        "epochs": "optimizer epochs the round trains for",
        "target_batch_size": "samples the whole swarm accumulates per optimizer epoch",
        "run_id": "the hivemind run id (default coldswarm-r<round id>)",
        "corpus_prefix": "which corpus shards name (default corpus)",
        "collect_timeout_s": "seconds the checkpointer tries to collect the swarm's state (default 120)",
        "algorithm": "sync or diloco: how the swarm trains together (shorthand for hyperparameters.algorithm)",
        "hyperparameters": "the PretrainDataOptions fields and the worker's SwarmConfig fields",
        "gate": "the publication gate: policy, metric, tolerance, higher_is_better (the coordinator's)",
    },
}
#: the largest ``epochs`` / ``target_batch_size`` (PretrainTask carries them as uint32)
MAX_TASK_INT = 2**31 - 1
#: the longest ``collect_timeout_s``
MAX_COLLECT_TIMEOUT_S = 7 * 86400.0
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RoundOptionsError(ValueError):
    """A round's options that every worker would refuse; the message says which and why."""


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class FusionHyperparameters:
    """Hyperparameters of a fusion (instruction-shard) assignment; the round's options set them.

    Build with :meth:`from_options`, which refuses unknown names and impossible combinations."""

    peft_method: str = field(default="lora", metadata=_h("lora, ia3 or full"))
    steps: int = field(default=60, metadata=_h("optimizer steps"))
    batch_size: int = field(default=16, metadata=_h("examples per step"))
    lr: float = field(default=0.0, metadata=_h("learning rate; 0 picks the method's default"))
    weight_decay: float = field(default=0.0, metadata=_h("AdamW weight decay"))
    warmup_steps: int = field(default=5, metadata=_h("linear warm-up steps"))
    max_input_length: int = field(default=128, metadata=_h("inputs are truncated to this many tokens"))
    max_target_length: int = field(default=32, metadata=_h("targets are truncated to this many tokens"))
    lora_r: int = field(default=8, metadata=_h("LoRA rank"))
    lora_alpha: int = field(default=16, metadata=_h("LoRA scaling numerator (scale = alpha / r)"))
    lora_dropout: float = field(default=0.0, metadata=_h("dropout on the LoRA path"))
    target_modules: list[str] = field(
        default_factory=list, metadata=_h("modules to adapt; empty: all T5 ones")
    )
    load_in_4bit: bool = field(default=False, metadata=_h("QLoRA: load the base in 4-bit NF4 (CUDA only)"))
    statistics: list[str] = field(default_factory=list, metadata=_h("fisher and/or regmean"))
    fisher_examples: int = field(default=64, metadata=_h("examples the diagonal Fisher is averaged over"))
    fisher_kind: str = field(default="expected", metadata=_h("expected (sampled targets) or empirical"))
    regmean_batches: int = field(
        default=8, metadata=_h("batches the RegMean Gram matrices are averaged over")
    )
    eval_examples: int = field(default=64, metadata=_h("validation examples scored before and after"))
    codec: str = field(default="bytegroup", metadata=_h("codec the payload is encoded with"))
    seed: int = field(default=0, metadata=_h("seed for shuffling and dropout"))

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], *, codecs: Collection[str] | None = None
    ) -> FusionHyperparameters:
        """Build from a round's options, refusing names it does not know (a typo must not be ignored).

        ``codecs``: the codec names the worker can encode with (``coldswarm.fusion.codecs.CODECS``); an
        unknown ``codec`` is refused here, before any training. None leaves the codec unchecked."""
        hp = build(cls, options, "fusion hyperparameter(s)")
        if hp.peft_method not in PEFT_METHODS:
            raise ValueError(f"peft_method must be lora, ia3 or full, not {hp.peft_method!r}")
        if hp.steps < 1 or hp.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if hp.fisher_kind not in ("expected", "empirical"):
            raise ValueError(f"fisher_kind must be expected or empirical, not {hp.fisher_kind!r}")
        unknown_stats = sorted(set(hp.statistics) - set(STATISTICS))
        if unknown_stats:
            raise ValueError(f"unknown statistics {unknown_stats}: the worker collects fisher and regmean")
        if codecs is not None and hp.codec not in codecs:
            raise ValueError(f"unknown codec {hp.codec!r}; choose one of {sorted(codecs)}")
        if hp.load_in_4bit and hp.peft_method == "full":
            raise ValueError(
                "4-bit weights cannot be finetuned directly: use peft_method lora (QLoRA) or ia3"
            )
        if hp.load_in_4bit and "fisher" in hp.statistics:
            raise ValueError(
                "a diagonal Fisher needs floating-point merged weights, which a 4-bit base (load_in_4bit) "
                "does not have: merge QLoRA rounds with regmean, average, task_arithmetic or ties"
            )
        if not hp.lr:
            hp.lr = DEFAULT_LR[hp.peft_method]
        return hp

    @classmethod
    def from_json(cls, text: str, *, codecs: Collection[str] | None = None) -> FusionHyperparameters:
        options = json.loads(text) if text else {}
        if not isinstance(options, dict):
            raise ValueError("fusion hyperparameters must be a JSON object")
        return cls.from_options(options, codecs=codecs)


@dataclass
class PretrainDataOptions:
    """The data side of a pretrain round's ``hyperparameters`` (the rest are the worker's SwarmConfig)."""

    batch_size: int = field(default=8, metadata={"help": "MoD examples per local step"})
    inputs_length: int = field(default=128, metadata={"help": "encoder length of MoD examples"})
    serve_state_timeout_s: float = field(
        default=180.0, metadata={"help": "after training, wait this long for the checkpointer to collect"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the MoD collator (masks, denoiser choice)"})

    def __post_init__(self):
        for name in ("batch_size", "inputs_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")


def statistics_needed(*, fisher: bool, gram: bool) -> list[str]:
    """The statistics (names in :data:`STATISTICS`) a merge method needs, from its registry flags
    (``needs_fisher``, ``needs_gram`` in ``coldswarm.fusion.methods``)."""
    return [name for name, needed in (("fisher", fisher), ("regmean", gram)) if needed]


def fusion_task(options: Mapping[str, Any], statistics: Sequence[str], index: int, n: int) -> dict:
    """The ``FusionTask`` fields of shard ``index`` of ``n`` in a fusion round with these options;
    ``statistics`` is what the round's merge method needs (:func:`statistics_needed`), unless the options
    name their own."""
    return {
        "shard": f"{options.get('shard_prefix', 'default')}:{index}-of-{n}",
        "peft_method": options.get("peft_method", "lora"),
        "hyperparameters_json": json.dumps(options.get("hyperparameters", {}), sort_keys=True),
        "statistics": list(options.get("statistics", statistics)),
        "codec": options.get("codec", ""),  # empty: the worker's default (FusionHyperparameters.codec)
    }


def fusion_hyperparameters(task: pb.FusionTask, *, codecs: Collection[str] | None) -> FusionHyperparameters:
    """A fusion task's hyperparameters as the worker reads them, the task's own fields taking precedence."""
    options = json.loads(task.hyperparameters_json) if task.hyperparameters_json else {}
    if not isinstance(options, dict):
        raise ValueError("the round's hyperparameters must be a JSON object")
    if task.peft_method:
        options["peft_method"] = task.peft_method
    if task.statistics:
        options["statistics"] = list(task.statistics)
    if task.codec:
        options["codec"] = task.codec
    return FusionHyperparameters.from_options(options, codecs=codecs)


def pretrain_hyperparameters(
    hyperparameters_json: str, *, swarm_fields: Collection[str] | None = None
) -> tuple[PretrainDataOptions, dict]:
    """A pretrain task's ``hyperparameters_json`` split into the data options and the swarm options (the
    rest, for the worker's ``SwarmConfig``; PretrainTask's own fields are left out). ``swarm_fields``: the
    SwarmConfig field names, to refuse unknown keys here (None leaves that to SwarmConfig)."""
    options = json.loads(hyperparameters_json) if hyperparameters_json else {}
    if not isinstance(options, dict):
        raise ValueError("the round's hyperparameters must be a JSON object")
    data_options, rest = split_known(options, PretrainDataOptions)
    swarm = {k: v for k, v in rest.items() if k not in PRETRAIN_TASK_FIELDS}
    if swarm_fields is not None:
        refuse_unknown(swarm, swarm_fields, "pretrain hyperparameter(s)")
    return build(PretrainDataOptions, data_options, "pretrain data option(s)"), swarm


def _positive_int(options: Mapping[str, Any], name: str) -> None:
    # The coordinator reads these with int() (so "3" and 3.0 pass, as they always have).
    value = options.get(name, 1)
    try:
        number = int(value) if not isinstance(value, bool) else 0
    except (TypeError, ValueError, OverflowError):
        number = 0
    if not 1 <= number <= MAX_TASK_INT:
        raise ValueError(
            f"{name} must be a positive integer (at most {MAX_TASK_INT}), not {str(value)[:40]!r}"
        )


def _name(options: Mapping[str, Any], key: str, default: str) -> None:
    value = options.get(key, default)
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{key} must be 1-64 letters, digits, '-' or '_' (it names shards or DHT keys), not {str(value)[:40]!r}"
        )


def _top_level(kind: str, options: Mapping[str, Any]) -> None:
    """The keys ``options`` may have for ``kind`` (:data:`ROUND_OPTION_KEYS`) and the shapes of the
    generic ones; the schemas below check what is inside."""
    refuse_unknown(options, ROUND_OPTION_KEYS[kind], f"{kind} round option(s)")
    for key in ("hyperparameters", "merge", "gate"):
        if key in options and not isinstance(options[key], dict):
            raise ValueError(f"{key} must be a JSON object, not {type(options[key]).__name__}")
    if kind == "fusion":
        _name(options, "shard_prefix", "default")
        stats = options.get("statistics", [])
        if not isinstance(stats, list) or not all(isinstance(x, str) for x in stats):
            raise ValueError("statistics must be a list of names (fisher, regmean)")
        for key in ("peft_method", "codec"):
            if key in options and not isinstance(options[key], str):
                raise ValueError(f"{key} must be a string")
    else:
        if "algorithm" in options:
            algorithm = options["algorithm"]
            inner = (options.get("hyperparameters") or {}).get("algorithm", algorithm)
            if not isinstance(algorithm, str) or inner != algorithm:
                raise ValueError(
                    "algorithm must be a name (sync, diloco) and agree with hyperparameters.algorithm"
                )
        if "run_id" in options:
            _name(options, "run_id", "")
        _name(options, "corpus_prefix", "corpus")
        timeout = options.get("collect_timeout_s", 120.0)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or not 0 < timeout <= MAX_COLLECT_TIMEOUT_S
        ):
            raise ValueError(
                f"collect_timeout_s must be a number of seconds in (0, {MAX_COLLECT_TIMEOUT_S:g}], "
                f"not {str(timeout)[:40]!r}"
            )


def pretrain_task_hyperparameters(options: Mapping[str, Any]) -> dict:
    """A pretrain round's ``hyperparameters`` as its workers get them: the top-level ``algorithm`` shorthand
    folded in (the workers' ``SwarmConfig`` reads it from there)."""
    hyperparameters = dict(options.get("hyperparameters") or {})
    if "algorithm" in options:
        hyperparameters.setdefault("algorithm", options["algorithm"])
    return hyperparameters


def check_round_options(
    kind: str,
    options: Mapping[str, Any],
    *,
    codecs: Collection[str],
    statistics: Sequence[str] = (),
    swarm_fields: Collection[str] | None = None,
) -> None:
    """Refuse (:class:`RoundOptionsError`, ``"<kind> round options: ..."``) what every worker would refuse.

    :param codecs: the codec names workers encode contributions with (fusion rounds).
    :param statistics: the statistics the round's merge method needs (:func:`statistics_needed`).
    :param swarm_fields: the worker's SwarmConfig field names; without them a pretrain round's swarm
      options are checked only by the workers.
    """
    if kind not in KINDS:
        raise RoundOptionsError(f"round kind {str(kind)[:40]!r} is not one of {list(KINDS)}")
    try:
        _top_level(kind, options)
        if kind == "fusion":
            fusion_hyperparameters(pb.FusionTask(**fusion_task(options, statistics, 0, 1)), codecs=codecs)
        else:
            for name in PRETRAIN_TASK_FIELDS:
                _positive_int(options, name)
            if not isinstance(options.get("hyperparameters", {}), dict):
                raise ValueError("hyperparameters must be a JSON object")
            hyperparameters = pretrain_task_hyperparameters(options)
            pretrain_hyperparameters(json.dumps(hyperparameters), swarm_fields=swarm_fields)
    except (ValueError, TypeError) as exc:
        raise RoundOptionsError(f"{kind} round options: {exc}") from None
