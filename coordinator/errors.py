"""Domain errors of the coordinator, one class per gRPC status code.

Handlers raise these with a message a person can act on; the servicers in
:mod:`coldswarm.coordinator.service` turn them into status codes. Nothing else
in the coordinator knows about gRPC.
"""

from __future__ import annotations

import grpc


class CoordinatorError(Exception):
    """A refusal with a status code and a message that says what to do."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Unauthenticated(CoordinatorError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CoordinatorError):
    code = grpc.StatusCode.PERMISSION_DENIED


class InvalidArgument(CoordinatorError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(CoordinatorError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(CoordinatorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(CoordinatorError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CoordinatorError):
    code = grpc.StatusCode.ALREADY_EXISTS


class DataLoss(CoordinatorError):
    code = grpc.StatusCode.DATA_LOSS


class Unavailable(CoordinatorError):
    """Try again shortly (clients retry this code): e.g. the previous stream of an upload is still ending."""

    code = grpc.StatusCode.UNAVAILABLE
