"""API errors as gRPC status codes with google.rpc details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class ApiError(Exception):
    """An error for the caller: a status code, an actionable message, and bad fields if any."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: list[tuple[str, str]] = (),
                 retry_after_s: float | None = None, quota_violations: list[tuple[str, str]] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = list(violations)
        # Set only where the request provably did no work (refused before it ran): clients retry
        # what carries a google.rpc.RetryInfo, and nothing else.
        self.retry_after_s = retry_after_s
        # (subject, description) of each quota the request is over: a google.rpc.QuotaFailure.
        self.quota_violations = list(quota_violations)

    def to_status(self) -> grpc.Status:
        details = []
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                    for field, description in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad_request)
            details.append(packed)
        if self.quota_violations:
            failure = error_details_pb2.QuotaFailure(violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
                for subject, description in self.quota_violations])
            packed = any_pb2.Any()
            packed.Pack(failure)
            details.append(packed)
        if self.retry_after_s is not None:
            info = error_details_pb2.RetryInfo()
            info.retry_delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            packed = any_pb2.Any()
            packed.Pack(info)
            details.append(packed)
        status = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message, details=details)
        return rpc_status.to_status(status)


def invalid_argument(violations: list[tuple[str, str]]) -> ApiError:
    summary = "; ".join(f"{field}: {description}" for field, description in violations)
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {summary}", violations)


def field_violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> list[tuple[str, str]]:
    """The BadRequest field violations of a received error (for clients and tests)."""
    status = rpc_status.from_call(error)
    found = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found += [(v.field, v.description) for v in bad_request.field_violations]
    return found
