"""What the coordinator accepts at its door: sizes of strings, maps and JSON, ranges of numbers.

Every request message passes :meth:`Door.check` before a handler sees it (``service.py``), so a field
added to the proto later is bounded too (by the defaults here) without anyone remembering to. What is
refused gets INVALID_ARGUMENT with the field, its size and the limit, and quotes no more than a prefix of
what was sent. Numbers are checked for range and finiteness here, before they can reach SQLite
(which holds signed 64-bit integers) or a deadline that never comes. JSON from callers goes through
:func:`parse_json_object`: strict JSON (no NaN/Infinity), bounded in bytes and depth.

The limits an admin may change are ``CoordinatorConfig`` fields (``--max-metrics-bytes``,
``--max-options-bytes``); the rest are the constants below (coordinator/README.md lists them all).
"""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from coldswarm.common.quoting import quote
from coldswarm.coordinator.errors import InvalidArgument

INT64_MAX = 2**63 - 1  # SQLite's INTEGER
UINT32_MAX = 2**32 - 1  # version and round numbers on the wire
#: Register names are cut to this many characters; token labels longer than this are refused
NAME_CHARS = 200
#: ids the coordinator made (uploads, assignments, tokens, workers)
ID_CHARS = 64
#: any string field this table does not name
DEFAULT_STRING_CHARS = 256
#: entries of a map (heartbeat and report metrics), characters of a key, items of a repeated field
MAP_ENTRIES = 256
MAP_KEY_CHARS = 128
REPEATED_ITEMS = 256
#: contributions that close a fusion round; a version's manifest lists each one, and must fit a reply
MAX_QUORUM = 1000
#: a round's deadline, in seconds from when it opens
MAX_DEADLINE_S = 366 * 86400.0
#: how deeply nested JSON from a caller may be
JSON_DEPTH = 32

# Strings with their own limit, by ``Message.field``; "metrics" and "options" mean the config's byte limits.
_STRING_CHARS: dict[str, int | str] = {
    "RegisterRequest.name": 4096,  # stored cut to NAME_CHARS
    "CreateTokenRequest.label": NAME_CHARS,
    "RevokeTokenRequest.id": ID_CHARS,
    "HeartbeatRequest.phase": 32,
    "HeartbeatRequest.assignment_id": ID_CHARS,
    "ReportAssignmentRequest.assignment_id": ID_CHARS,
    "ReportAssignmentRequest.outcome": 32,
    "ReportAssignmentRequest.message": 4096,  # stored cut to 2000
    "BeginUploadRequest.assignment_id": ID_CHARS,
    "BeginUploadRequest.codec": 64,
    "BeginUploadRequest.metrics_json": "metrics",
    "UploadChunk.upload_id": ID_CHARS,
    "UploadChunk.sha256": 128,
    "GetVersionRequest.version": 32,
    "DownloadRequest.version": 32,
    "DownloadRequest.path": 1024,
    "OpenRoundRequest.kind": 32,
    "OpenRoundRequest.method": 64,
    "OpenRoundRequest.options_json": "options",
    "MergeRequest.method": 64,
    "MergeRequest.options_json": "options",
    "LeaveRequest.reason": 4096,
}
# Integers with a range beyond their wire type's, by ``Message.field``: (least, most).
_INT_RANGE: dict[str, tuple[int, int]] = {
    "OpenRoundRequest.quorum": (0, MAX_QUORUM),
    "BeginUploadRequest.num_examples": (0, INT64_MAX),
    "BeginUploadRequest.total_size": (0, INT64_MAX),
    "HeartbeatRequest.step": (0, INT64_MAX),
    "HeartbeatRequest.total_steps": (0, INT64_MAX),
}
# Doubles with a range; every other double must be finite, but for these, where NaN means "none yet".
_FLOAT_RANGE: dict[str, tuple[float, float]] = {"OpenRoundRequest.deadline_s": (0.0, MAX_DEADLINE_S)}
_NAN_ALLOWED = {"HeartbeatRequest.loss", "HeartbeatRequest.samples_per_s"}
# Maps whose values are metrics: their JSON size counts against --max-metrics-bytes.
_METRIC_MAPS = {"HeartbeatRequest.metrics", "ReportAssignmentRequest.metrics"}


class Door:
    """Checks request messages against the limits (the config's and this module's)."""

    def __init__(self, max_metrics_bytes: int, max_options_bytes: int):
        self.max_metrics_bytes = max_metrics_bytes
        self.max_options_bytes = max_options_bytes

    def string_chars(self, where: str) -> int:
        limit = _STRING_CHARS.get(where, DEFAULT_STRING_CHARS)
        if limit == "metrics":
            return self.max_metrics_bytes
        if limit == "options":
            return self.max_options_bytes
        if where.endswith(".page_token"):
            return 512
        return int(limit)

    def check(self, msg: Message) -> None:
        """Raise :class:`InvalidArgument` naming the first field of ``msg`` (or a message in it) over its limit."""
        name = msg.DESCRIPTOR.name
        for fd, value in msg.ListFields():
            where = f"{name}.{fd.name}"
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                self._check_map(where, fd, value)
            elif fd.is_repeated:
                if len(value) > REPEATED_ITEMS:
                    raise InvalidArgument(f"{where} holds {len(value)} items; the limit is {REPEATED_ITEMS}")
                for item in value:
                    self._check_value(where, fd, item)
            else:
                self._check_value(where, fd, value)

    def _check_value(self, where: str, fd: FieldDescriptor, value: Any) -> None:
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            self.check(value)
        elif fd.type == FieldDescriptor.TYPE_STRING:
            limit = self.string_chars(where)
            if len(value) > limit:
                raise InvalidArgument(
                    f"{where} is {len(value)} characters, {quote(value, 24)}; the limit is {limit}"
                )
        elif fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            self._check_float(where, value)
        elif fd.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_UINT32,
                             FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64):  # fmt: skip
            least, most = _INT_RANGE.get(where, (-INT64_MAX - 1, INT64_MAX))
            if where.endswith(".page_size"):
                least = 0
            if not least <= value <= most:
                raise InvalidArgument(f"{where} is {value}; it must be between {least} and {most}")

    def _check_float(self, where: str, value: float) -> None:
        if math.isnan(value) and where in _NAN_ALLOWED:
            return
        if not math.isfinite(value):
            raise InvalidArgument(f"{where} is {value}; it must be a finite number")
        least, most = _FLOAT_RANGE.get(where, (-math.inf, math.inf))
        if not least <= value <= most:
            raise InvalidArgument(f"{where} is {value:g}; it must be between {least:g} and {most:g}")

    def _check_map(self, where: str, fd: FieldDescriptor, value) -> None:
        if len(value) > MAP_ENTRIES:
            raise InvalidArgument(f"{where} holds {len(value)} entries; the limit is {MAP_ENTRIES}")
        size = 2
        value_fd = fd.message_type.fields_by_name["value"]
        for key, item in value.items():
            if len(key) > MAP_KEY_CHARS:
                raise InvalidArgument(
                    f"{where} has a key of {len(key)} characters, {quote(key, 24)}; the limit is {MAP_KEY_CHARS}"
                )
            size += len(json.dumps(key)) + 26  # a double as JSON is at most ~24 characters
            if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                self.check(item)
        if where in _METRIC_MAPS and size > self.max_metrics_bytes:
            raise InvalidArgument(
                f"{where} is about {size} bytes as JSON; the limit is {self.max_metrics_bytes} "
                "(--max-metrics-bytes)"
            )


class _NotJson(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NotJson(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _depth(value: Any, limit: int) -> int:
    """The nesting depth of parsed JSON, stopping past ``limit``."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_json_object(text: str, what: str, max_bytes: int, flag: str = "") -> dict:
    """``text`` as a JSON object: strict JSON (NaN and Infinity are refused), at most ``max_bytes`` and
    :data:`JSON_DEPTH` deep; an empty text is ``{}``. Refusals are :class:`InvalidArgument` naming ``what``."""
    if not text.strip():
        return {}
    size = len(text.encode())
    if size > max_bytes:
        raise InvalidArgument(
            f"{what} is {size} bytes; the limit is {max_bytes}{f' ({flag})' if flag else ''}"
        )
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except _NotJson as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deeply (the limit is {JSON_DEPTH} levels)") from None
    except ValueError as exc:  # json's message gives a position, never the text
        raise InvalidArgument(f"{what} is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not a {type(value).__name__}")
    if _depth(value, JSON_DEPTH) > JSON_DEPTH:
        raise InvalidArgument(f"{what} is nested too deeply (the limit is {JSON_DEPTH} levels)")
    return value


def check_int(value: Any, what: str, least: int = 0, most: int = INT64_MAX) -> int:
    """``value`` as an int in ``[least, most]`` (a bool is not an int here), or InvalidArgument."""
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        shown = quote(value, 24) if not isinstance(value, int) or isinstance(value, bool) else str(value)[:24]
        raise InvalidArgument(f"{what} must be an integer from {least} to {most}, not {shown}")
    return value


def finite_or_none(value: float) -> float | None:
    """A metric for JSON others parse: NaN and infinities (not JSON) become null."""
    return value if math.isfinite(value) else None
