"""The states and kinds of rounds, assignments, contributions and versions, each named once.

As flower names its run statuses (``flwr/common/constant.py``): plain ``str`` constants on a class
that cannot be instantiated. Their values are what the SQLite rows hold and what ``Round.state``,
``Contribution.state``, ``Version.state`` and ``OpenRoundRequest.kind`` carry on the wire, so
naming them changes nothing on disk or on the wire. SQL statements bind them as parameters.
"""

from __future__ import annotations


class _Constants:
    """A namespace of string constants, never an object."""

    def __new__(cls):
        raise TypeError(f"{cls.__name__} holds constants and cannot be instantiated")


class RoundKind(_Constants):
    """What a round asks of its workers (``OpenRoundRequest.kind``)."""

    FUSION = "fusion"  # finetune the base on a shard, upload a contribution; the coordinator merges them
    PRETRAIN = (
        "pretrain"  # train the base together over hivemind; the checkpointer collects the averaged state
    )


ROUND_KINDS = (RoundKind.FUSION, RoundKind.PRETRAIN)


class RoundState(_Constants):
    """Where a round is in :mod:`coldswarm.coordinator.rounds`' state machine."""

    OPEN = "open"  # hands out assignments and takes contributions
    CLOSING = (
        "closing"  # takes no more work: a fusion round awaits its merge, a pretrain round its checkpoint
    )
    MERGING = "merging"  # the merge thread is merging its contributions
    PUBLISHED = "published"  # its result is a version and the pointer moved to it
    MERGED = "merged"  # its result is a candidate version that awaits `publish` (--no-auto-publish)
    REJECTED = (
        "rejected"  # its result failed the publication gate: a rejected version (`publish N` still can)
    )
    FAILED = "failed"  # ended without a result; the round's error says why
    CANCELLED = "cancelled"  # ended by `round close --cancel`


# A round in one of these is the live round (at most one is): no other round opens meanwhile.
LIVE_STATES = (RoundState.OPEN, RoundState.CLOSING, RoundState.MERGING)
# A fusion round in one of these still has to be merged: after a kill it is merged again at start.
MERGE_PENDING_STATES = (RoundState.CLOSING, RoundState.MERGING)
# A fusion round in one of these has finished and may be re-merged into a candidate (admin `merge`).
REMERGEABLE_STATES = (RoundState.PUBLISHED, RoundState.FAILED, RoundState.MERGED, RoundState.REJECTED)


class AssignmentState(_Constants):
    """A worker's part of a round (``assignments.state``); the last three are what ReportAssignment takes."""

    ACTIVE = "active"  # handed out; the worker is on it
    EXPIRED = "expired"  # the worker went silent; it gets a new assignment when it is back
    DONE = "done"  # the worker finished (a fusion worker: its contribution was accepted)
    FAILED = "failed"  # the worker reported a failure
    ABORTED = "aborted"  # the round ended or the worker left before it finished


REPORTED_OUTCOMES = (AssignmentState.DONE, AssignmentState.FAILED, AssignmentState.ABORTED)


class ContributionState(_Constants):
    """What became of an uploaded contribution (``Contribution.state``)."""

    ACCEPTED = "accepted"  # validated and stored; awaits its round's merge
    MERGED = "merged"  # part of a merged version
    SCREENED_OUT = "screened_out"  # left out of the merge by the method's screening (see the merge report)


class VersionState(_Constants):
    """A version's standing (``Version.state``); the pointer moves only to a published one."""

    PUBLISHED = "published"
    CANDIDATE = "candidate"  # recorded, not published (admin `publish` moves the pointer to it)
    REJECTED = "rejected"  # held back by the publication gate: kept, never deleted; `publish N` still can


class WorkerState(_Constants):
    """What a worker is doing, as ListWorkers shows it (``Worker.state``; derived, never stored)."""

    IDLE = "idle"  # registered and heard from, with no active assignment in the open round
    WORKING = "working"  # has an active assignment in the open round
    GONE = "gone"  # left, or silent for longer than --worker-gone-after-s


class VersionKind(_Constants):
    """What made a version (its manifest's ``kind``); a version from a round has the round's kind."""

    INIT = "init"  # version 0
    FUSION = RoundKind.FUSION
    PRETRAIN = RoundKind.PRETRAIN
