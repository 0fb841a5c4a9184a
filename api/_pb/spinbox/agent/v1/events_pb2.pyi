from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscribeRequest(_message.Message):
    __slots__ = ("after_seq",)
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    def __init__(self, after_seq: _Optional[int] = ...) -> None: ...

class ExitEvent(_message.Message):
    __slots__ = ("id", "exec_id", "pid", "exit_status", "exited_at_ns")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_NS_FIELD_NUMBER: _ClassVar[int]
    id: str
    exec_id: str
    pid: int
    exit_status: int
    exited_at_ns: int
    def __init__(self, id: _Optional[str] = ..., exec_id: _Optional[str] = ..., pid: _Optional[int] = ..., exit_status: _Optional[int] = ..., exited_at_ns: _Optional[int] = ...) -> None: ...

class OomEvent(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "timestamp_ns", "gap", "exit", "oom")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    OOM_FIELD_NUMBER: _ClassVar[int]
    seq: int
    timestamp_ns: int
    gap: bool
    exit: ExitEvent
    oom: OomEvent
    def __init__(self, seq: _Optional[int] = ..., timestamp_ns: _Optional[int] = ..., gap: _Optional[bool] = ..., exit: _Optional[_Union[ExitEvent, _Mapping]] = ..., oom: _Optional[_Union[OomEvent, _Mapping]] = ...) -> None: ...
