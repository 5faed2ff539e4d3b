"""The lineage as data: metrics flattened from manifests, the gate's record, and the charts' points and edges."""

from __future__ import annotations

import json
import math

from coldswarm.coordinator import lineage
from coldswarm.coordinator.lineage import charts, entry, flat_metrics


def test_metrics_flatten_to_dotted_names_with_the_mean_of_a_mapping_of_numbers():
    flat = flat_metrics(
        {
            "mod_loss": {"R": 6.0, "S": 8.0, "X": 7.0},
            "seen": {"reverse": {"exact_match": 0.5, "token_loss": 2.0}},
            "seen_exact_match": 0.25,
            "eval_config": {"steps": 30},
            "eval_seconds": 3,
            "flags": True,
            "note": "text",
            "broken": math.nan,
            "tasks": [1, 2],
        }
    )
    assert flat == {
        "mod_loss": 7.0,
        "mod_loss.R": 6.0,
        "mod_loss.S": 8.0,
        "mod_loss.X": 7.0,
        "seen.reverse.exact_match": 0.5,
        "seen.reverse.token_loss": 2.0,
        "seen_exact_match": 0.25,
        "eval_seconds": 3.0,
    }


def manifest(**kw) -> str:
    base = {"kind": "fusion", "method": "fisher", "metrics": {}, "contributions": []}
    return json.dumps({**base, **kw})


def make(number, parent, state="published", current=False, metrics=None, worker_of=None, **kw):
    return entry(
        number=number,
        parent=parent,
        round_id=number or None,
        method="fisher",
        state=state,
        is_current=current,
        created_at=1.0,
        manifest=manifest(metrics=metrics or {}, **kw),
        worker_of=worker_of,
    )


def test_an_entry_carries_the_gates_scores_and_the_contributors():
    e = make(
        3,
        2,
        state="rejected",
        metrics={"seen_token_loss": 5.1},
        gate={
            "decision": "rejected",
            "metric": "seen_token_loss",
            "candidate": {"seen_token_loss": 5.1},
            "parent": {"seen_token_loss": 4.9},
            "tolerance": 0.01,
            "passed": False,
        },
        # manifests name contributions by id; the coordinator's database names their workers
        contributions=[{"id": 7, "num_examples": 10}, {"id": 9, "num_examples": 22}],
        worker_of={7: "w-1", 9: "w-2"},
    )
    assert e.gate == {
        "decision": "rejected",
        "metric": "seen_token_loss",
        "candidate.seen_token_loss": 5.1,
        "parent.seen_token_loss": 4.9,
        "tolerance": 0.01,
        "passed": "no",
    }
    assert (e.contributions, e.examples, e.contributors) == (2, 32, ("w-1", "w-2"))
    assert e.as_dict(with_contributors=False)["contributors"] is None
    assert (
        entry(
            number=0,
            parent=None,
            round_id=None,
            method="init",
            state="published",
            is_current=True,
            created_at=0,
            manifest="not json",
        ).metrics
        == {}
    )


def test_charts_join_each_version_to_its_parent_and_mark_its_state():
    entries = [
        make(0, None, metrics={"mod_loss": {"R": 9.0}, "heldout_exact_match": 0.1}),
        make(1, 0, metrics={"mod_loss": {"R": 7.0}, "heldout_exact_match": 0.2, "swarm_loss": 6.5}),
        make(2, 1, state="rejected", metrics={"mod_loss": {"R": 8.0}}),
        make(3, 1, current=True, metrics={"mod_loss": {"R": 6.5}, "heldout_exact_match": 0.3}),
        make(4, 3, state="frozen", metrics={"mod_loss": {"R": 6.4}}),
    ]
    out = {c["id"]: c for c in charts(entries)}
    mod = out["mod_loss"]["lines"][0]
    assert mod["metric"] == "mod_loss" and [p["x"] for p in mod["points"]] == [0, 1, 2, 3, 4]
    assert [[a[0], b[0]] for a, b in mod["edges"]] == [[0, 1], [1, 2], [1, 3], [3, 4]]
    em = out["exact_match"]["lines"][0]
    assert [[a[0], b[0]] for a, b in em["edges"]] == [[0, 1], [1, 3]]  # 2 and 4 lack it
    assert "token_loss" not in out  # no version has it
    more = [c["title"] for c in charts(entries) if c["more"]]
    assert more == ["mod_loss.R", "swarm_loss"]  # most versions first
    assert lineage.style("rejected", False)["mpl"] == "X"
    assert lineage.style("frozen", False) == lineage.OTHER_STATE_STYLE
    assert lineage.style("published", True)["chartjs"] == lineage.CURRENT_STYLE["chartjs"]
    assert charts([make(0, None)]) == []
