from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StdioFd(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STDIN: _ClassVar[StdioFd]
    STDOUT: _ClassVar[StdioFd]
    STDERR: _ClassVar[StdioFd]
STDIN: StdioFd
STDOUT: StdioFd
STDERR: StdioFd

class OutputOpen(_message.Message):
    __slots__ = ("id", "exec_id", "fd", "offset", "window")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    id: str
    exec_id: str
    fd: StdioFd
    offset: int
    window: int
    def __init__(self, id: _Optional[str] = ..., exec_id: _Optional[str] = ..., fd: _Optional[_Union[StdioFd, str]] = ..., offset: _Optional[int] = ..., window: _Optional[int] = ...) -> None: ...

class OutputAck(_message.Message):
    __slots__ = ("offset", "window", "eof")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    offset: int
    window: int
    eof: bool
    def __init__(self, offset: _Optional[int] = ..., window: _Optional[int] = ..., eof: _Optional[bool] = ...) -> None: ...

class OutputClient(_message.Message):
    __slots__ = ("open", "ack")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    open: OutputOpen
    ack: OutputAck
    def __init__(self, open: _Optional[_Union[OutputOpen, _Mapping]] = ..., ack: _Optional[_Union[OutputAck, _Mapping]] = ...) -> None: ...

class OutputServer(_message.Message):
    __slots__ = ("offset", "data", "eof")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    eof: bool
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ...) -> None: ...

class InputOpen(_message.Message):
    __slots__ = ("id", "exec_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    exec_id: str
    def __init__(self, id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class InputData(_message.Message):
    __slots__ = ("offset", "data", "eof")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    eof: bool
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ...) -> None: ...

class InputClient(_message.Message):
    __slots__ = ("open", "data")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    open: InputOpen
    data: InputData
    def __init__(self, open: _Optional[_Union[InputOpen, _Mapping]] = ..., data: _Optional[_Union[InputData, _Mapping]] = ...) -> None: ...

class InputServer(_message.Message):
    __slots__ = ("offset", "window", "eof")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    offset: int
    window: int
    eof: bool
    def __init__(self, offset: _Optional[int] = ..., window: _Optional[int] = ..., eof: _Optional[bool] = ...) -> None: ...
