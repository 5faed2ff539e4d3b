"""How a client reads a gRPC failure: "the coordinator is away" (retry) or an answer, and its text.

The coordinator answers UNAVAILABLE itself when a client should try again shortly (an upload whose
previous stream is still ending); a refusal (INVALID_ARGUMENT, PERMISSION_DENIED, ...) is an answer and
retrying it cannot help.
"""

from __future__ import annotations

import grpc

#: status codes that mean the coordinator is away (down, restarting, unreachable, too slow): retry
AWAY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def status_code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    """The call's status code (None for an RpcError that carries none)."""
    return exc.code() if hasattr(exc, "code") else None


def is_away(exc: grpc.RpcError) -> bool:
    """Whether the failure means the coordinator is away (worth a retry), not that it refused."""
    return status_code(exc) in AWAY


def rpc_message(exc: grpc.RpcError) -> str:
    """``CODE: details`` for a log line or an error a person reads."""
    code = status_code(exc)
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'ERROR'}: {details}"
