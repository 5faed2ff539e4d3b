"""The swarm's curves per pretrain round: durable, bounded, spaced, and deaf to unbelievable values."""

from __future__ import annotations

import math

import pytest

from coldswarm.coordinator.series import SeriesSource, SwarmSeries
from coldswarm.coordinator.states import AssignmentState, RoundKind, RoundState
from coldswarm.coordinator.store import Store

DHT, BEATS = SeriesSource.DHT, SeriesSource.HEARTBEATS


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.sqlite")
    with s.tx() as c:
        c.execute("INSERT INTO runs(id, created_at) VALUES ('default', 0)")
        for rid, kind in ((1, RoundKind.PRETRAIN), (2, RoundKind.FUSION)):
            c.execute(
                "INSERT INTO rounds(id, run_id, kind, base_version, state, quorum, deadline, method, options_json, "
                "opened_at) VALUES (?, 'default', ?, 0, ?, 2, 0, '', '{}', 0)",
                (rid, kind, RoundState.OPEN),
            )
        for wid in ("w-a", "w-b", "w-c"):
            c.execute(
                "INSERT INTO workers(id, name, capabilities, token_id, session_hash, registered_at, last_seen) "
                "VALUES (?, ?, x'', 'tok', ?, 0, 0)",
                (wid, wid, f"h-{wid}"),
            )
        for aid, wid, rid in (("a-a", "w-a", 1), ("a-b", "w-b", 1), ("a-c", "w-c", 2)):
            c.execute(
                "INSERT INTO assignments(id, round_id, worker_id, shard_index, state, created_at, deadline) "
                "VALUES (?, ?, ?, 0, ?, 0, 0)",
                (aid, rid, wid, AssignmentState.ACTIVE),
            )
    yield s
    s.close()


def test_points_are_durable_and_ordered(store, tmp_path):
    series = SwarmSeries(store, min_interval_s=0)
    for t in (1.0, 2.0, 3.0):
        assert series.record(1, DHT, {"loss": t, "peers": 2}, t=t)
    assert not series.record(1, DHT, {"loss": 9.0}, t=0.5)  # a curve goes forward in time
    again = SwarmSeries(Store(tmp_path / "state.sqlite"), min_interval_s=0)
    points = again.points(1)[DHT]
    assert [p.t for p in points] == [1.0, 2.0, 3.0] and [p.loss for p in points] == [1.0, 2.0, 3.0]
    assert again.latest(1, DHT).t == 3.0 and again.rounds() == [1] and again.points(2) == {}


def test_points_keep_their_spacing(store):
    series = SwarmSeries(store, min_interval_s=2.0)
    stored = [series.record(1, DHT, {"loss": 1.0}, t=t) for t in (0.0, 1.0, 2.0, 3.0, 4.5)]
    assert stored == [True, False, True, False, True]
    assert series.record(1, BEATS, {"loss": 1.0}, t=1.0)  # each source keeps its own spacing


def test_a_long_curve_stays_bounded_evenly_and_keeps_its_ends(store):
    series = SwarmSeries(store, max_points=40, min_interval_s=0)
    for t in range(5000):
        series.record(1, DHT, {"loss": 10.0 - t / 1000}, t=float(t))
    ts = [p.t for p in series.points(1)[DHT]]
    # The newest point lags the newest reading by at most the spacing: the span over half the points.
    assert len(ts) <= 40 and ts[0] == 0.0 and ts[-1] >= 4999 * (1 - 2 / 40)
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
    assert max(gaps) <= 4 * (ts[-1] / 40), gaps  # spread over the whole round, no hole


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 1e16, "x", None])
def test_unbelievable_values_are_left_out(store, bad):
    series = SwarmSeries(store, min_interval_s=0)
    assert not series.record(1, BEATS, {"loss": bad, "samples_per_s": bad, "peers": bad, "epoch": bad}, t=1)
    assert series.record(1, BEATS, {"loss": bad, "peers": 3}, t=2)
    (point,) = series.points(1)[BEATS]
    assert point.loss is None and point.peers == 3
    with pytest.raises(ValueError):
        series.record(1, "rumours", {"loss": 1.0})


def beat(
    assignment: str, phase: str = "training", step: int = 5, loss: float = 4.0, rate: float = 10.0, epoch=1.0
):
    return {
        "assignment_id": assignment,
        "phase": phase,
        "step": step,
        "loss": loss,
        "samples_per_s": rate,
        "metrics": {"epoch": epoch},
    }


def test_heartbeats_make_one_point_per_flush_over_the_workers_training(store):
    series = SwarmSeries(store, min_interval_s=0, heartbeat_window_s=30)
    series.on_heartbeat("w-a", beat("a-a", loss=4.0, rate=10.0, epoch=1.0), t=100.0)
    series.on_heartbeat("w-b", beat("a-b", loss=6.0, rate=30.0, epoch=2.0), t=101.0)
    series.on_heartbeat("w-c", beat("a-c", loss=1.0, rate=99.0), t=101.0)  # a fusion round's worker
    series.flush(now=102.0)
    (point,) = series.points(1)[BEATS]
    assert (point.t, point.loss, point.samples_per_s, point.peers, point.epoch) == (
        102.0,
        5.0,
        40.0,
        2.0,
        2.0,
    )
    assert series.points(2) == {}
    series.flush(now=103.0)  # nothing new heard: no new point
    assert len(series.points(1)[BEATS]) == 1

    # b stops training (serving its state); a's step 0 has no loss yet; then a goes silent.
    series.on_heartbeat("w-b", beat("a-b", phase="serving_state"), t=110.0)
    series.on_heartbeat("w-a", beat("a-a", step=0, loss=0.0, rate=5.0), t=110.0)
    series.flush(now=111.0)
    last = series.points(1)[BEATS][-1]
    assert (last.loss, last.samples_per_s, last.peers) == (None, 5.0, 1.0)
    series.on_heartbeat("w-b", beat("a-b"), t=150.0)
    series.flush(now=151.0)  # a's last heartbeat is past the window
    assert series.points(1)[BEATS][-1].peers == 1.0


def test_a_point_refused_for_spacing_is_written_at_a_later_flush(store):
    series = SwarmSeries(store, min_interval_s=5.0)
    series.on_heartbeat("w-a", beat("a-a"), t=100.0)
    series.flush(now=100.0)
    series.on_heartbeat("w-a", beat("a-a", loss=3.0), t=101.0)
    series.flush(now=101.0)  # too soon
    series.flush(now=106.0)
    assert [p.loss for p in series.points(1)[BEATS]] == [4.0, 3.0]
