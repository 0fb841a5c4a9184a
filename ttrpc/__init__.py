"""ttrpc: containerd's TTRPC protocol for asyncio (unary and streaming). See README.md.

Public names are loaded lazily (PEP 562): `from ttrpc import Server` or `import ttrpc.server`
loads the server's modules only, not the client's. vminitd runs under TCG emulation in the
guest, where every module imported before it answers its first ping costs boot time.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ provides these
    from .client import Client, Stub, connect_unix
    from .flow import FlowControlError, ReceiveWindow, SendCredit, SendWindow
    from .frame import (MAX_DATA, Flags, Frame, FrameDecoder, MessageType, Oversized,
                        OversizedMessage, encode_frame)
    from .metadata import CallContext, Metadata
    from .server import PeerCredentials, Server, ServerConnection
    from .services import Kind, Method, ServiceRegistry
    from .status import (Aborted, AlreadyExists, Cancelled, Code, ConnectionClosed, DataLoss,
                         DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound,
                         OutOfRange, PermissionDenied, ResourceExhausted, TTRPCError,
                         Unauthenticated, Unavailable, Unimplemented, Unknown, code_for_exception,
                         error_from_status, status_from_exception)
    from .stream import ClientStream, Encoded, ServerStream, StreamBuffer

# submodule -> the public names it defines (keep in step with the TYPE_CHECKING imports and
# __all__; tests/unit/test_ttrpc_lazy_import.py checks that the three agree)
_MODULE_EXPORTS: dict[str, tuple[str, ...]] = {
    "client": ("Client", "Stub", "connect_unix"),
    "flow": ("FlowControlError", "ReceiveWindow", "SendCredit", "SendWindow"),
    "frame": ("MAX_DATA", "Flags", "Frame", "FrameDecoder", "MessageType", "Oversized",
              "OversizedMessage", "encode_frame"),
    "metadata": ("CallContext", "Metadata"),
    "server": ("PeerCredentials", "Server", "ServerConnection"),
    "services": ("Kind", "Method", "ServiceRegistry"),
    "status": ("Aborted", "AlreadyExists", "Cancelled", "Code", "ConnectionClosed", "DataLoss",
               "DeadlineExceeded", "FailedPrecondition", "Internal", "InvalidArgument", "NotFound",
               "OutOfRange", "PermissionDenied", "ResourceExhausted", "TTRPCError",
               "Unauthenticated", "Unavailable", "Unimplemented", "Unknown", "code_for_exception",
               "error_from_status", "status_from_exception"),
    "stream": ("ClientStream", "Encoded", "ServerStream", "StreamBuffer"),
}
_EXPORTS = {name: module for module, names in _MODULE_EXPORTS.items() for name in names}
# The eager __init__ imported these, so `import ttrpc; ttrpc.status.X` worked: it still does.
_SUBMODULES = frozenset(_MODULE_EXPORTS) | {"channel", "request_pb2"}

__all__ = [
    "Aborted", "AlreadyExists", "CallContext", "Cancelled", "Client", "ClientStream", "Code",
    "ConnectionClosed", "DataLoss", "DeadlineExceeded", "Encoded", "FailedPrecondition", "Flags",
    "FlowControlError", "Frame", "FrameDecoder", "Internal", "InvalidArgument", "Kind", "MAX_DATA",
    "MessageType", "Metadata", "Method", "NotFound", "OutOfRange", "Oversized", "OversizedMessage",
    "PeerCredentials", "PermissionDenied", "ReceiveWindow", "ResourceExhausted", "SendCredit",
    "SendWindow",
    "Server", "ServerConnection", "ServerStream", "ServiceRegistry", "StreamBuffer", "Stub",
    "TTRPCError", "Unauthenticated", "Unavailable", "Unimplemented", "Unknown",
    "code_for_exception", "connect_unix", "encode_frame", "error_from_status",
    "status_from_exception",
]


def _submodule(name: str) -> object:
    # __import__, not importlib.import_module: the latter bypasses the C import path that
    # `python -X importtime` reports from, so the guest's import-time log would miss the module.
    qualified = f"{__name__}.{name}"
    __import__(qualified)
    return sys.modules[qualified]


if not TYPE_CHECKING:  # hidden from type checkers, which would take any name as an `object`
    def __getattr__(name: str) -> object:
        module = _EXPORTS.get(name)
        if module is not None:
            value = getattr(_submodule(module), name)
        elif name in _SUBMODULES:
            value = _submodule(name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value  # later lookups are plain attribute reads
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
