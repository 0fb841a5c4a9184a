"""Errors the agent services raise; each carries the ttrpc/gRPC status code to answer with."""
from __future__ import annotations

# gRPC status codes (the subset we use); kept here so pure-logic modules need no ttrpc import.
INVALID_ARGUMENT = 3
NOT_FOUND = 5
ALREADY_EXISTS = 6
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
UNKNOWN = 2


class AgentError(Exception):
    code = UNKNOWN

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(AgentError):
    code = INVALID_ARGUMENT


class NotFound(AgentError):
    code = NOT_FOUND


class AlreadyExists(AgentError):
    code = ALREADY_EXISTS


class FailedPrecondition(AgentError):
    code = FAILED_PRECONDITION


class RuntimeFailed(AgentError):
    """The OCI runtime (runc) refused or failed; message carries runc's own error."""
    code = UNKNOWN
