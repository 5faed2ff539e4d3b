"""A gRPC server interceptor that feeds :class:`~coldswarm.coordinator.metrics.CoordinatorMetrics`.

It wraps every method handler, so the servicers stay as they are: each call is counted by method and
status code, heartbeats are timed, and the ``data`` bytes of UploadContribution's request chunks and
DownloadVersion's response chunks are counted as they pass.
"""

from __future__ import annotations

import time

import grpc

from coldswarm.coordinator.metrics import CoordinatorMetrics
from coldswarm.proto import coldswarm_pb2 as pb

_WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["WorkerService"].full_name
HEARTBEAT = f"/{_WORKER_SERVICE}/Heartbeat"
UPLOAD = f"/{_WORKER_SERVICE}/UploadContribution"
DOWNLOAD_SUFFIX = "/DownloadVersion"  # WorkerService and AdminService both serve it


def _code(context, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: CoordinatorMetrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        method = handler_call_details.method
        label = method.lstrip("/")
        m = self.metrics

        def done(context, failed: bool, began: float) -> None:
            m.rpcs.labels(label, _code(context, failed)).inc()
            if method == HEARTBEAT:
                m.heartbeats.inc()
                m.heartbeat_seconds.observe(time.perf_counter() - began)

        def counted(messages, counter):
            for message in messages:
                counter.inc(len(message.data))
                yield message

        def unary_unary(request, context):
            began, failed = time.perf_counter(), True
            try:
                response = handler.unary_unary(request, context)
                failed = False
                return response
            finally:
                done(context, failed, began)

        def stream_unary(requests, context):
            began, failed = time.perf_counter(), True
            if method == UPLOAD:
                requests = counted(requests, m.upload_bytes)
            try:
                response = handler.stream_unary(requests, context)
                failed = False
                return response
            finally:
                done(context, failed, began)

        def unary_stream(request, context):
            began, failed = time.perf_counter(), True
            responses = handler.unary_stream(request, context)
            if method.endswith(DOWNLOAD_SUFFIX):
                responses = counted(responses, m.download_bytes)
            try:
                yield from responses
                failed = False
            finally:
                done(context, failed, began)

        def stream_stream(requests, context):
            began, failed = time.perf_counter(), True
            try:
                yield from handler.stream_stream(requests, context)
                failed = False
            finally:
                done(context, failed, began)

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
