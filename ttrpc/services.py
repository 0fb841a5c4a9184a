"""Service registry: the server's dispatch table (Go ttrpc `services.go`).

Services are registered from protobuf ServiceDescriptors, so a servicer is a plain object with
one async method per RPC. Unary: `async def M(self, request, ctx) -> response`.
Streaming (any direction): `async def M(self, stream, ctx)`; for client-streaming methods the
return value is the response.
"""
from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import message_factory

from .status import Internal, Unimplemented

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]


class Kind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAMING = "server_streaming"
    CLIENT_STREAMING = "client_streaming"
    BIDI = "bidi"

    @classmethod
    def of(cls, client_streaming: bool, server_streaming: bool) -> Kind:
        if client_streaming and server_streaming:
            return cls.BIDI
        if client_streaming:
            return cls.CLIENT_STREAMING
        if server_streaming:
            return cls.SERVER_STREAMING
        return cls.UNARY


class Method(NamedTuple):
    """One registered RPC. (A NamedTuple, not a dataclass: cheaper to import, see frame.py.)"""
    service: str
    name: str
    handler: Handler
    request_type: type[_message.Message]
    response_type: type[_message.Message] | None = None
    client_streaming: bool = False
    server_streaming: bool = False

    @property
    def kind(self) -> Kind:
        return Kind.of(self.client_streaming, self.server_streaming)

    @property
    def streaming(self) -> bool:
        return self.client_streaming or self.server_streaming

    @property
    def full_name(self) -> str:
        return f"/{self.service}/{self.name}"

    def parse_request(self, payload: bytes) -> _message.Message:
        msg = self.request_type()
        try:
            msg.ParseFromString(payload)
        except Exception as exc:  # DecodeError and friends
            raise Internal(f"ttrpc: error unmarshalling payload: {exc}") from None
        return msg

    def encode_response(self, response: Any) -> bytes:
        if response is None:
            raise Internal(f"ttrpc: marshal called with nil ({self.full_name} returned None)")
        if not isinstance(response, _message.Message):
            raise Internal(f"ttrpc: {self.full_name} returned {type(response).__name__}, "
                           f"not a protobuf message")
        if self.response_type is not None and not isinstance(response, self.response_type):
            raise Internal(f"ttrpc: {self.full_name} returned {type(response).__name__}, "
                           f"expected {self.response_type.__name__}")
        return response.SerializeToString()


def message_class(desc: _descriptor.Descriptor) -> type[_message.Message]:
    return message_factory.GetMessageClass(desc)


class ServiceRegistry:
    def __init__(self) -> None:
        self._services: dict[str, dict[str, Method]] = {}

    def register(self, service: _descriptor.ServiceDescriptor, servicer: object,
                 name: str | None = None) -> list[str]:
        """Register every method of `service` that `servicer` implements (as an attribute of the
        method's name). `name` overrides the service's full name. Returns the methods bound;
        missing ones answer UNIMPLEMENTED."""
        service_name = name or service.full_name
        bound = []
        for m in service.methods:
            handler = getattr(servicer, m.name, None)
            if handler is None:
                log.debug("ttrpc: %s/%s not implemented by %r", service_name, m.name, servicer)
                continue
            if not callable(handler):
                raise TypeError(f"{type(servicer).__name__}.{m.name} is not callable")
            self.register_method(service_name, m.name, handler, message_class(m.input_type),
                                 message_class(m.output_type), client_streaming=m.client_streaming,
                                 server_streaming=m.server_streaming)
            bound.append(m.name)
        self._services.setdefault(service_name, {})  # known service even if nothing bound
        return bound

    def register_method(self, service: str, method: str, handler: Handler,
                        request_type: type[_message.Message],
                        response_type: type[_message.Message] | None = None, *,
                        client_streaming: bool = False, server_streaming: bool = False) -> None:
        methods = self._services.setdefault(service, {})
        if method in methods:
            raise ValueError(f"ttrpc: method /{service}/{method} registered twice")
        methods[method] = Method(service, method, handler, request_type, response_type,
                                 client_streaming, server_streaming)

    def lookup(self, service: str, method: str) -> Method:
        methods = self._services.get(service)
        if methods is None:
            raise Unimplemented(f"service {service}")
        found = methods.get(method)
        if found is None:
            raise Unimplemented(f"method {method}")
        return found

    def services(self) -> dict[str, list[str]]:
        return {s: sorted(ms) for s, ms in self._services.items()}
