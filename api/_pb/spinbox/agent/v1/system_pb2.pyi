from spinbox.api._pb.spinbox.agent.v1 import containers_pb2 as _containers_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class VersionResponse(_message.Message):
    __slots__ = ("agent_version", "api", "runtime")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    api: str
    runtime: str
    def __init__(self, agent_version: _Optional[str] = ..., api: _Optional[str] = ..., runtime: _Optional[str] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("kernel", "cpus_online", "cpus_present", "memory_total_bytes", "memory_available_bytes", "uptime_s", "pid1", "cpu_busy_ms", "cpu_idle_ms")
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    CPUS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    CPUS_PRESENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    PID1_FIELD_NUMBER: _ClassVar[int]
    CPU_BUSY_MS_FIELD_NUMBER: _ClassVar[int]
    CPU_IDLE_MS_FIELD_NUMBER: _ClassVar[int]
    kernel: str
    cpus_online: int
    cpus_present: int
    memory_total_bytes: int
    memory_available_bytes: int
    uptime_s: float
    pid1: bool
    cpu_busy_ms: int
    cpu_idle_ms: int
    def __init__(self, kernel: _Optional[str] = ..., cpus_online: _Optional[int] = ..., cpus_present: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., uptime_s: _Optional[float] = ..., pid1: _Optional[bool] = ..., cpu_busy_ms: _Optional[int] = ..., cpu_idle_ms: _Optional[int] = ...) -> None: ...

class SetTimeRequest(_message.Message):
    __slots__ = ("unix_ns",)
    UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    unix_ns: int
    def __init__(self, unix_ns: _Optional[int] = ...) -> None: ...

class AddEntropyRequest(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class SetHostnameRequest(_message.Message):
    __slots__ = ("hostname",)
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    def __init__(self, hostname: _Optional[str] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("reboot",)
    REBOOT_FIELD_NUMBER: _ClassVar[int]
    reboot: bool
    def __init__(self, reboot: _Optional[bool] = ...) -> None: ...

class OnlineCpusResponse(_message.Message):
    __slots__ = ("onlined", "online", "present")
    ONLINED_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    onlined: int
    online: int
    present: int
    def __init__(self, onlined: _Optional[int] = ..., online: _Optional[int] = ..., present: _Optional[int] = ...) -> None: ...

class SetOnlineCpusRequest(_message.Message):
    __slots__ = ("online",)
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    online: int
    def __init__(self, online: _Optional[int] = ...) -> None: ...

class OnlineMemoryResponse(_message.Message):
    __slots__ = ("blocks_onlined", "blocks_online", "memory_total_bytes")
    BLOCKS_ONLINED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    blocks_onlined: int
    blocks_online: int
    memory_total_bytes: int
    def __init__(self, blocks_onlined: _Optional[int] = ..., blocks_online: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ...) -> None: ...
