"""The shim's one error tree, and the one place where errors become TTRPC status codes.

    SpinboxError                      every error the shim raises on purpose
    ├── ConfigError                   a config key or value is wrong (names the key)
    ├── RequestError                  containerd asked for something we refuse (h11's "local")
    │   ├── InvalidArgument           the request itself is malformed      → INVALID_ARGUMENT
    │   ├── NotFound                  no such container / exec / process   → NOT_FOUND
    │   ├── AlreadyExists             the id is taken                      → ALREADY_EXISTS
    │   ├── FailedPrecondition        not in this state (kill a stopped…)  → FAILED_PRECONDITION
    │   └── Unimplemented             a VM runtime cannot (checkpoint…)    → UNIMPLEMENTED
    ├── HostError                     setting up or releasing a host resource failed
    │                                 (rootfs, binds, network, state, VM)  → FAILED_PRECONDITION
    └── GuestError                    the guest misbehaved or is gone (h11's "remote")
        ├── GuestProtocolError        a reply or event broke the contract  → INTERNAL
        └── GuestUnavailable          no agent connection / the VM is lost → UNAVAILABLE

Errors the guest *returned* (its own status codes: NOT_FOUND for a process it does not know)
arrive as `ttrpc.TTRPCError` and pass through with their code; anything else is a bug and
becomes INTERNAL. Modules subclass the branch they belong to (`RootfsError(HostError)`), so a
caller catches by meaning and `to_status` never needs to know a module's classes.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import ttrpc
from ttrpc.status import Code

log = logging.getLogger(__name__)


class SpinboxError(Exception):
    """Root of the tree; `code` is the status the Task API answers with."""
    code: Code = Code.INTERNAL


class ConfigError(SpinboxError, ValueError):
    """A bad configuration value. `key` is the dotted path, `source` the file (if any)."""
    code = Code.INVALID_ARGUMENT

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        text = f"{key}: {message}" if key else message
        if source:
            text = f"{source}: {text}"
        super().__init__(text)
        self.key = key
        self.detail = message
        self.source = source


class RequestError(SpinboxError):
    code = Code.INVALID_ARGUMENT


class InvalidArgument(RequestError):
    code = Code.INVALID_ARGUMENT


class NotFound(RequestError):
    code = Code.NOT_FOUND


class AlreadyExists(RequestError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(RequestError):
    code = Code.FAILED_PRECONDITION


class Unimplemented(RequestError):
    code = Code.UNIMPLEMENTED


class HostError(SpinboxError):
    code = Code.FAILED_PRECONDITION


class GuestError(SpinboxError):
    code = Code.INTERNAL


class GuestProtocolError(GuestError):
    code = Code.INTERNAL


class GuestUnavailable(GuestError):
    code = Code.UNAVAILABLE


def to_status(e: BaseException) -> ttrpc.TTRPCError:
    """The TTRPC error containerd gets for `e` (the single mapping of the shim)."""
    if isinstance(e, ttrpc.TTRPCError):
        return e                                   # the guest's own status, or a ttrpc failure
    if isinstance(e, SpinboxError):
        return ttrpc.error_from_status(int(e.code), str(e))
    return ttrpc.Internal(f"{type(e).__name__}: {e}")


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def maps_errors(fn: F) -> F:
    """Decorator for RPC handlers: every exception leaves as a TTRPC status (see `to_status`);
    unexpected ones are logged with their traceback first."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except ttrpc.TTRPCError:
            raise
        except SpinboxError as e:
            raise to_status(e) from None
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            raise to_status(e) from None
    return wrapper  # type: ignore[return-value]
