"""Domain errors. Stores and servicers raise these; one interceptor turns them into gRPC status codes."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf.message import Message

from vers.common.v1 import governance_pb2

# Bytes of findings an error carries at most: they travel in a trailer, and gRPC clients refuse trailers
# past 8 KiB by default (the message counts them all).
MAX_FINDINGS_BYTES = 6 * 1024


class DomainError(Exception):
    """`details` are messages a client reads besides the text (e.g. the secret findings that refused a change):
    sent as the details of a google.rpc.Status, which the gateway turns into fields of its JSON body."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = tuple(details)


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidName(InvalidArgument):
    pass


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Conflict(DomainError):
    """The request clashes with the current state (e.g. deleting something still in use): HTTP 409."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(DomainError):
    """Stored data is missing or damaged (a commit's file failed its checksum)."""

    code = grpc.StatusCode.DATA_LOSS


class Internal(DomainError):
    code = grpc.StatusCode.INTERNAL


def secrets_refusal(what: str, findings: Sequence[governance_pb2.SecretFinding], fix: str, count_commits: bool = False) -> Conflict:
    """The refusal of a publish that would expose secrets, `what` naming the thing, with the findings as the
    error's detail (as many as fit in MAX_FINDINGS_BYTES), their rules in the message, and with
    `count_commits` the number of commits they are in."""
    commits = len({finding.commit_id for finding in findings})
    rules = ", ".join(sorted({finding.rule for finding in findings}))
    detail = governance_pb2.SecretFindings()
    for finding in findings:
        if detail.ByteSize() + finding.ByteSize() + 8 > MAX_FINDINGS_BYTES:
            break
        detail.findings.append(finding)
    listed = "" if len(detail.findings) == len(findings) else f"; the first {len(detail.findings)} are listed"
    where = f" in {commits} commit(s)" if count_commits else ""
    return Conflict(f"making {what} public would expose {len(findings)} secret(s){where} ({rules}{listed}): {fix}", details=[detail])
