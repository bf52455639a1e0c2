from shared_model.wire.perspective.v1 import control_pb2 as _control_pb2
from shared_model.wire.perspective.v1 import federation_pb2 as _federation_pb2
from shared_model.wire.perspective.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRequest(_message.Message):
    __slots__ = ("content_id", "offset")
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    content_id: str
    offset: int
    def __init__(self, content_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "offset", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("content_id", "size")
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    content_id: str
    size: int
    def __init__(self, content_id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class PutChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("content_id", "size", "already_present")
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    content_id: str
    size: int
    already_present: bool
    def __init__(self, content_id: _Optional[str] = ..., size: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ("content_id",)
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    content_id: str
    def __init__(self, content_id: _Optional[str] = ...) -> None: ...

class StatReply(_message.Message):
    __slots__ = ("exists", "size")
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    size: int
    def __init__(self, exists: _Optional[bool] = ..., size: _Optional[int] = ...) -> None: ...

class HeadRequest(_message.Message):
    __slots__ = ("from_version",)
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    def __init__(self, from_version: _Optional[int] = ...) -> None: ...

class HeadReply(_message.Message):
    __slots__ = ("version", "checkpoint", "versions")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    version: int
    checkpoint: _tensor_pb2.BlobRef
    versions: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.BlobRef]
    def __init__(self, version: _Optional[int] = ..., checkpoint: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[_tensor_pb2.BlobRef, _Mapping]]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("result", "want_units", "capability")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    WANT_UNITS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    result: _federation_pb2.WorkResult
    want_units: bool
    capability: _control_pb2.NodeCapability
    def __init__(self, result: _Optional[_Union[_federation_pb2.WorkResult, _Mapping]] = ..., want_units: _Optional[bool] = ..., capability: _Optional[_Union[_control_pb2.NodeCapability, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("queued", "units")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    queued: int
    units: _control_pb2.ControlRequest
    def __init__(self, queued: _Optional[int] = ..., units: _Optional[_Union[_control_pb2.ControlRequest, _Mapping]] = ...) -> None: ...
