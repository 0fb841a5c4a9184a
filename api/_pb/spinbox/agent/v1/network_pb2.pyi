from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Route(_message.Message):
    __slots__ = ("dst", "gateway", "metric")
    DST_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    dst: str
    gateway: str
    metric: int
    def __init__(self, dst: _Optional[str] = ..., gateway: _Optional[str] = ..., metric: _Optional[int] = ...) -> None: ...

class Interface(_message.Message):
    __slots__ = ("mac", "name", "mtu", "addresses", "routes")
    MAC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    mac: str
    name: str
    mtu: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, mac: _Optional[str] = ..., name: _Optional[str] = ..., mtu: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class DNS(_message.Message):
    __slots__ = ("nameservers", "search", "options", "domain")
    NAMESERVERS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    nameservers: _containers.RepeatedScalarFieldContainer[str]
    search: _containers.RepeatedScalarFieldContainer[str]
    options: _containers.RepeatedScalarFieldContainer[str]
    domain: str
    def __init__(self, nameservers: _Optional[_Iterable[str]] = ..., search: _Optional[_Iterable[str]] = ..., options: _Optional[_Iterable[str]] = ..., domain: _Optional[str] = ...) -> None: ...

class HostEntry(_message.Message):
    __slots__ = ("ip", "names")
    IP_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ip: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ip: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class ConfigureRequest(_message.Message):
    __slots__ = ("interfaces", "hostname", "dns", "hosts", "link_timeout_ms")
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DNS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    LINK_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    hostname: str
    dns: DNS
    hosts: _containers.RepeatedCompositeFieldContainer[HostEntry]
    link_timeout_ms: int
    def __init__(self, interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ..., hostname: _Optional[str] = ..., dns: _Optional[_Union[DNS, _Mapping]] = ..., hosts: _Optional[_Iterable[_Union[HostEntry, _Mapping]]] = ..., link_timeout_ms: _Optional[int] = ...) -> None: ...

class ConfiguredInterface(_message.Message):
    __slots__ = ("mac", "name")
    MAC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    mac: str
    name: str
    def __init__(self, mac: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ConfigureResponse(_message.Message):
    __slots__ = ("interfaces",)
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[ConfiguredInterface]
    def __init__(self, interfaces: _Optional[_Iterable[_Union[ConfiguredInterface, _Mapping]]] = ...) -> None: ...
