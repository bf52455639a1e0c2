from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CodecId(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_ID_UNSPECIFIED: _ClassVar[CodecId]
    CODEC_ID_TRITS_ZSTD: _ClassVar[CodecId]
    CODEC_ID_TRITS_ANS: _ClassVar[CodecId]
    CODEC_ID_DELTA_GOLOMB_ANS: _ClassVar[CodecId]
    CODEC_ID_SPARSE_2BIT: _ClassVar[CodecId]
CODEC_ID_UNSPECIFIED: CodecId
CODEC_ID_TRITS_ZSTD: CodecId
CODEC_ID_TRITS_ANS: CodecId
CODEC_ID_DELTA_GOLOMB_ANS: CodecId
CODEC_ID_SPARSE_2BIT: CodecId

class BlobRef(_message.Message):
    __slots__ = ("content_id", "size")
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    content_id: str
    size: int
    def __init__(self, content_id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class TernaryTensor(_message.Message):
    __slots__ = ("name", "shape", "scale", "codec", "payload", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    scale: float
    codec: CodecId
    payload: bytes
    sha256: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., scale: _Optional[float] = ..., codec: _Optional[_Union[CodecId, str]] = ..., payload: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class ExpertDelta(_message.Message):
    __slots__ = ("column", "layer", "tensor_name", "base_version", "target_version", "encoded_delta")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODED_DELTA_FIELD_NUMBER: _ClassVar[int]
    column: int
    layer: int
    tensor_name: str
    base_version: int
    target_version: int
    encoded_delta: bytes
    def __init__(self, column: _Optional[int] = ..., layer: _Optional[int] = ..., tensor_name: _Optional[str] = ..., base_version: _Optional[int] = ..., target_version: _Optional[int] = ..., encoded_delta: _Optional[bytes] = ...) -> None: ...

class SharedUpdate(_message.Message):
    __slots__ = ("blob", "norm", "base_version")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    blob: BlobRef
    norm: float
    base_version: int
    def __init__(self, blob: _Optional[_Union[BlobRef, _Mapping]] = ..., norm: _Optional[float] = ..., base_version: _Optional[int] = ...) -> None: ...
