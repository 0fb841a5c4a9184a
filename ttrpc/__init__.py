"""ttrpc: containerd's TTRPC protocol for asyncio (unary and streaming). See README.md."""
from .client import Client, Stub, connect_unix
from .flow import FlowControlError, ReceiveWindow, SendWindow
from .frame import MAX_DATA, Flags, Frame, FrameDecoder, MessageType, Oversized, OversizedMessage, encode_frame
from .metadata import CallContext, Metadata
from .server import PeerCredentials, Server, ServerConnection
from .services import Kind, Method, ServiceRegistry
from .status import (Aborted, AlreadyExists, Cancelled, Code, ConnectionClosed, DataLoss,
                     DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound,
                     OutOfRange, PermissionDenied, ResourceExhausted, TTRPCError, Unauthenticated,
                     Unavailable, Unimplemented, Unknown, code_for_exception, error_from_status,
                     status_from_exception)
from .stream import ClientStream, ServerStream, StreamBuffer

__all__ = [
    "Aborted", "AlreadyExists", "CallContext", "Cancelled", "Client", "ClientStream", "Code",
    "ConnectionClosed", "DataLoss", "DeadlineExceeded", "FailedPrecondition", "Flags",
    "FlowControlError", "Frame", "FrameDecoder", "Internal", "InvalidArgument", "Kind", "MAX_DATA",
    "MessageType", "Metadata", "Method", "NotFound", "OutOfRange", "Oversized", "OversizedMessage",
    "PeerCredentials", "PermissionDenied", "ReceiveWindow", "ResourceExhausted", "SendWindow",
    "Server", "ServerConnection", "ServerStream", "ServiceRegistry", "StreamBuffer", "Stub",
    "TTRPCError", "Unauthenticated", "Unavailable", "Unimplemented", "Unknown",
    "code_for_exception", "connect_unix", "encode_frame", "error_from_status",
    "status_from_exception",
]
