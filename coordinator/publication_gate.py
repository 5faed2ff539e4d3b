"""The publication gate: whether a round's candidate becomes the published version.

Every round's result (a fusion merge, or the pretrain swarm's collected state) is evaluated by the
coordinator's evaluator (``--evaluator``) and compared with its parent's scores from the same evaluator, so
on the same examples. The round's ``gate`` option says how::

    coldswarm-admin round open --kind fusion \\
        --options '{"gate": {"policy": "if-better", "metric": "seen_token_loss", "tolerance": 0.01}}'

* ``policy``: ``if-better`` (the default where the coordinator has an evaluator) publishes the candidate
  only if its ``metric`` is no worse than the parent's by more than ``tolerance``; ``always`` publishes every
  result (the only policy without an evaluator).
* ``metric``: a number in the evaluator's metrics, by its dotted path (``seen.upper.token_loss``); a mapping
  named in :data:`~coldswarm.coordinator.lineage.MEAN_OF` (``mod_loss``) stands for the mean of its values.
  Defaults: :data:`DEFAULT_METRIC` (the seen tasks' token loss for fusion, the MoD loss for pretrain).
* ``higher_is_better``: the metric's direction; by default a name containing ``loss`` or ``perplexity`` is
  lower-is-better, any other higher-is-better.
* ``tolerance``: how much worse (absolute, in the metric's units) still passes; default 0.

A candidate that fails stays a version in state ``rejected`` with both sets of scores in its manifest's
``gate`` record (never deleted; ``coldswarm-admin publish N`` still publishes it by hand), and its round ends
``rejected``. A candidate without the metric fails; so does one whose parent has none to compare with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from coldswarm.coordinator.lineage import flat_metrics
from coldswarm.coordinator.states import RoundKind, VersionState, _Constants


class PublishPolicy(_Constants):
    """How a round's candidate is published (the round option ``gate.policy``)."""

    ALWAYS = "always"  # every result is published (unless the coordinator runs with --no-auto-publish)
    IF_BETTER = "if-better"  # published only if the gate metric is no worse than the parent's


POLICIES = (PublishPolicy.ALWAYS, PublishPolicy.IF_BETTER)
#: the gate metric per round kind when the round names none
DEFAULT_METRIC = {RoundKind.FUSION: "seen_token_loss", RoundKind.PRETRAIN: "mod_loss"}
#: the keys a round's ``gate`` option may have
GATE_KEYS = ("policy", "metric", "tolerance", "higher_is_better")


class Decision(_Constants):
    """A gate record's ``decision``."""

    PUBLISHED = VersionState.PUBLISHED  # the candidate becomes a published version
    REJECTED = VersionState.REJECTED  # it stays a rejected version


@dataclass(frozen=True)
class GateConfig:
    """A round's gate, from its ``gate`` option (:meth:`for_round`)."""

    policy: str
    metric: str
    tolerance: float = 0.0
    higher_is_better: bool = False

    @classmethod
    def for_round(
        cls,
        kind: str,
        options: Mapping,
        *,
        has_evaluator: bool,
        default_policy: str = PublishPolicy.IF_BETTER,
    ) -> GateConfig:
        """The gate of a round of ``kind`` with these round options (``default_policy``: the coordinator's
        ``--publish-policy``); raises ValueError (a short message) for an option it cannot honour. Without an
        evaluator there are no scores: the default is then ``always``, and an explicit ``if-better`` is
        refused."""
        gate = options.get("gate", {})
        if not isinstance(gate, Mapping):
            raise ValueError("gate must be a JSON object")
        unknown = sorted(set(gate) - set(GATE_KEYS))
        if unknown:
            raise ValueError(f"unknown gate option(s) {unknown[:4]}; known: {list(GATE_KEYS)}")
        policy = gate.get("policy", default_policy if has_evaluator else PublishPolicy.ALWAYS)
        if policy not in POLICIES:
            raise ValueError(f"gate.policy must be one of {list(POLICIES)}, not {str(policy)[:40]!r}")
        if policy == PublishPolicy.IF_BETTER and not has_evaluator:
            raise ValueError(
                "gate.policy if-better needs scores: start the coordinator with --evaluator module:function"
            )
        metric = gate.get("metric", DEFAULT_METRIC.get(kind, "seen_token_loss"))
        if not isinstance(metric, str) or not 0 < len(metric) <= 128:
            raise ValueError("gate.metric must be a metric's name (1-128 characters)")
        tolerance = gate.get("tolerance", 0.0)
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not math.isfinite(tolerance)
        ):
            raise ValueError("gate.tolerance must be a finite number")
        if tolerance < 0:
            raise ValueError("gate.tolerance must be at least 0")
        higher = gate.get("higher_is_better", _higher_is_better(metric))
        if not isinstance(higher, bool):
            raise ValueError("gate.higher_is_better must be true or false")
        return cls(policy=policy, metric=metric, tolerance=float(tolerance), higher_is_better=higher)


def _higher_is_better(metric: str) -> bool:
    name = metric.lower()
    return not ("loss" in name or "perplexity" in name)


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided, and the record of it kept in the candidate's manifest (``gate``)."""

    passed: bool
    reason: str
    record: dict

    @property
    def decision(self) -> str:
        return Decision.PUBLISHED if self.passed else Decision.REJECTED

    @classmethod
    def held_back(cls, reason: str) -> GateDecision:
        """A result the gate cannot judge (its round's gate cannot be honoured any more): held back."""
        return cls(
            passed=False,
            reason=reason,
            record={"decision": Decision.REJECTED, "passed": False, "reason": reason},
        )


def metric_value(metrics: Mapping, metric: str) -> float | None:
    """``metric`` (a dotted path) in an evaluator's ``metrics``, or None where it has no finite number."""
    return flat_metrics(metrics).get(metric)


def decide(config: GateConfig, candidate: Mapping, parent: Mapping | None) -> GateDecision:
    """The gate's decision on a candidate scored ``candidate`` whose parent scored ``parent`` (the same
    evaluator's metrics, or None where the parent has none). ``always`` passes whatever the scores."""
    cand = metric_value(candidate, config.metric)
    par = None if parent is None else metric_value(parent, config.metric)
    if config.policy == PublishPolicy.ALWAYS:
        passed, reason = True, "policy always"
    elif cand is None:
        passed, reason = False, f"the candidate has no {config.metric}"
    elif par is None:
        passed, reason = False, f"the parent has no {config.metric} to compare with"
    else:
        # How much worse the candidate is, in the metric's units (negative: better).
        worse_by = (par - cand) if config.higher_is_better else (cand - par)
        passed = worse_by <= config.tolerance
        word = "higher" if config.higher_is_better else "lower"
        reason = (
            f"{config.metric} {cand:.6g} vs parent {par:.6g} ({word} is better, tolerance {config.tolerance:g}): "
            + ("no worse" if passed else f"worse by {worse_by:.6g}")
        )
    record = {
        "decision": Decision.PUBLISHED if passed else Decision.REJECTED,
        "passed": passed,
        "policy": config.policy,
        "metric": config.metric,
        "higher_is_better": config.higher_is_better,
        "tolerance": config.tolerance,
        "candidate": {config.metric: cand} if cand is not None else {},
        "parent": {config.metric: par} if par is not None else {},
        "reason": reason,
    }
    return GateDecision(passed=passed, reason=reason, record=record)


def summary(record) -> str:
    """A manifest's gate record in a table cell: ``kept`` or ``HELD BACK``, and what it compared."""
    if not isinstance(record, Mapping) or not record:
        return "-"
    verdict = "kept" if record.get("passed") else "HELD BACK"
    metric = record.get("metric")
    cand, par = ((record.get(side) or {}).get(metric) for side in ("candidate", "parent"))
    if isinstance(cand, float) and isinstance(par, float):
        return f"{verdict} ({metric} {cand:.3f} vs {par:.3f})"
    return f"{verdict} ({str(record.get('reason') or record.get('policy') or '')[:80]})"
