"""Status codes and typed errors (gRPC code numbers, as TTRPC carries google.rpc.Status).

`TTRPCError` is what clients catch and what handlers raise; each code has its own subclass so
callers can write `except ttrpc.NotFound`. Plain Python exceptions a handler raises are mapped
to codes the way Go ttrpc's `convertCode` maps Go errors.
"""
from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterable

from google.protobuf import any_pb2
from google.rpc import status_pb2


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def _code(value: int) -> Code | int:
    try:
        return Code(value)
    except ValueError:
        return value  # a peer may send a code we do not know; keep the number


class TTRPCError(Exception):
    """An RPC ended with a non-OK status. `code`, `message`, `details` (google.protobuf.Any list)."""

    code: Code | int = Code.UNKNOWN

    def __init__(self, *args: object, details: Iterable[any_pb2.Any] = ()) -> None:
        # TTRPCError(code, message) or, on a subclass, Subclass(message)
        if type(self) is TTRPCError and args and isinstance(args[0], int) \
                and not isinstance(args[0], bool):
            self.code = _code(args[0])
            args = args[1:]
        self.message = str(args[0]) if args else ""
        self.details = list(details)
        super().__init__(self.message)

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, Code) else str(self.code)
        return f"{name}: {self.message}" if self.message else name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=int(self.code), message=self.message, details=self.details)


class Cancelled(TTRPCError): code = Code.CANCELLED
class Unknown(TTRPCError): code = Code.UNKNOWN
class InvalidArgument(TTRPCError): code = Code.INVALID_ARGUMENT
class DeadlineExceeded(TTRPCError): code = Code.DEADLINE_EXCEEDED
class NotFound(TTRPCError): code = Code.NOT_FOUND
class AlreadyExists(TTRPCError): code = Code.ALREADY_EXISTS
class PermissionDenied(TTRPCError): code = Code.PERMISSION_DENIED
class ResourceExhausted(TTRPCError): code = Code.RESOURCE_EXHAUSTED
class FailedPrecondition(TTRPCError): code = Code.FAILED_PRECONDITION
class Aborted(TTRPCError): code = Code.ABORTED
class OutOfRange(TTRPCError): code = Code.OUT_OF_RANGE
class Unimplemented(TTRPCError): code = Code.UNIMPLEMENTED
class Internal(TTRPCError): code = Code.INTERNAL
class Unavailable(TTRPCError): code = Code.UNAVAILABLE
class DataLoss(TTRPCError): code = Code.DATA_LOSS
class Unauthenticated(TTRPCError): code = Code.UNAUTHENTICATED


class ConnectionClosed(Unavailable):
    """The call or stream ended because the connection closed (locally or by the peer)."""


# Keyed by int: Code is an IntEnum, so a Code and its number find the same entry.
ERROR_CLASSES: dict[int, type[TTRPCError]] = {
    cls.code: cls for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated)
}


def error_from_status(code: int, message: str = "", details: Iterable[any_pb2.Any] = ()) -> TTRPCError:
    """The typed exception for a status code (TTRPCError itself for codes we do not know)."""
    cls = ERROR_CLASSES.get(_code(code))
    if cls is None:
        return TTRPCError(code, message, details=details)
    return cls(message, details=details)


def error_from_status_proto(status: status_pb2.Status) -> TTRPCError:
    return error_from_status(status.code, status.message, status.details)


# Order matters: subclasses before their bases (FileNotFoundError is an OSError, ...).
_EXCEPTION_CODES: tuple[tuple[type[BaseException], Code], ...] = (
    (FileNotFoundError, Code.NOT_FOUND),
    (ProcessLookupError, Code.NOT_FOUND),  # ESRCH: the process is gone
    (FileExistsError, Code.ALREADY_EXISTS),
    (PermissionError, Code.PERMISSION_DENIED),
    (TimeoutError, Code.DEADLINE_EXCEEDED),  # also asyncio.TimeoutError (same class)
    (asyncio.CancelledError, Code.CANCELLED),
    (BrokenPipeError, Code.FAILED_PRECONDITION),  # Go: io.ErrClosedPipe
    (EOFError, Code.OUT_OF_RANGE),  # Go: io.EOF
    (NotImplementedError, Code.UNIMPLEMENTED),
    (ValueError, Code.INVALID_ARGUMENT),  # Go: os.ErrInvalid
)


def code_for_exception(exc: BaseException) -> Code | int:
    if isinstance(exc, TTRPCError):
        return exc.code
    for cls, code in _EXCEPTION_CODES:
        if isinstance(exc, cls):
            return code
    return Code.UNKNOWN


def status_from_exception(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status a server sends for an exception raised by a handler."""
    if isinstance(exc, TTRPCError):
        return exc.to_status()
    message = str(exc) or type(exc).__name__
    return status_pb2.Status(code=int(code_for_exception(exc)), message=message)
