from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FiguresRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentCall(_message.Message):
    __slots__ = ("method", "calls", "failures", "seconds_sum", "bucket_counts")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SUM_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    method: str
    calls: int
    failures: int
    seconds_sum: float
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, method: _Optional[str] = ..., calls: _Optional[int] = ..., failures: _Optional[int] = ..., seconds_sum: _Optional[float] = ..., bucket_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class FiguresResponse(_message.Message):
    __slots__ = ("state", "start_kind", "start_seconds", "vcpus", "vcpus_base", "memory_bytes", "memory_base_bytes", "hotplugged_vcpus", "hotplugged_memory_bytes", "guest_answered", "guest_memory_total_bytes", "guest_memory_used_bytes", "guest_cpus_online", "vm_cpu_user_seconds", "vm_cpu_system_seconds", "vm_rss_bytes", "containers", "tasks_started", "execs_started", "stdio_out_bytes", "stdio_in_bytes", "lost", "latency_bounds", "agent_calls", "uptime_seconds", "guest_cpu_busy_seconds", "guest_cpu_idle_seconds", "vcpu_hotplug_events", "memory_hotplug_events")
    STATE_FIELD_NUMBER: _ClassVar[int]
    START_KIND_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    VCPUS_BASE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BASE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOTPLUGGED_VCPUS_FIELD_NUMBER: _ClassVar[int]
    HOTPLUGGED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_CPUS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    VM_CPU_USER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VM_CPU_SYSTEM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VM_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    TASKS_STARTED_FIELD_NUMBER: _ClassVar[int]
    EXECS_STARTED_FIELD_NUMBER: _ClassVar[int]
    STDIO_OUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDIO_IN_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_CALLS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GUEST_CPU_BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GUEST_CPU_IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VCPU_HOTPLUG_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_HOTPLUG_EVENTS_FIELD_NUMBER: _ClassVar[int]
    state: str
    start_kind: str
    start_seconds: float
    vcpus: int
    vcpus_base: int
    memory_bytes: int
    memory_base_bytes: int
    hotplugged_vcpus: int
    hotplugged_memory_bytes: int
    guest_answered: bool
    guest_memory_total_bytes: int
    guest_memory_used_bytes: int
    guest_cpus_online: int
    vm_cpu_user_seconds: float
    vm_cpu_system_seconds: float
    vm_rss_bytes: int
    containers: int
    tasks_started: int
    execs_started: int
    stdio_out_bytes: int
    stdio_in_bytes: int
    lost: bool
    latency_bounds: _containers.RepeatedScalarFieldContainer[float]
    agent_calls: _containers.RepeatedCompositeFieldContainer[AgentCall]
    uptime_seconds: float
    guest_cpu_busy_seconds: float
    guest_cpu_idle_seconds: float
    vcpu_hotplug_events: int
    memory_hotplug_events: int
    def __init__(self, state: _Optional[str] = ..., start_kind: _Optional[str] = ..., start_seconds: _Optional[float] = ..., vcpus: _Optional[int] = ..., vcpus_base: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., memory_base_bytes: _Optional[int] = ..., hotplugged_vcpus: _Optional[int] = ..., hotplugged_memory_bytes: _Optional[int] = ..., guest_answered: _Optional[bool] = ..., guest_memory_total_bytes: _Optional[int] = ..., guest_memory_used_bytes: _Optional[int] = ..., guest_cpus_online: _Optional[int] = ..., vm_cpu_user_seconds: _Optional[float] = ..., vm_cpu_system_seconds: _Optional[float] = ..., vm_rss_bytes: _Optional[int] = ..., containers: _Optional[int] = ..., tasks_started: _Optional[int] = ..., execs_started: _Optional[int] = ..., stdio_out_bytes: _Optional[int] = ..., stdio_in_bytes: _Optional[int] = ..., lost: _Optional[bool] = ..., latency_bounds: _Optional[_Iterable[float]] = ..., agent_calls: _Optional[_Iterable[_Union[AgentCall, _Mapping]]] = ..., uptime_seconds: _Optional[float] = ..., guest_cpu_busy_seconds: _Optional[float] = ..., guest_cpu_idle_seconds: _Optional[float] = ..., vcpu_hotplug_events: _Optional[int] = ..., memory_hotplug_events: _Optional[int] = ...) -> None: ...
