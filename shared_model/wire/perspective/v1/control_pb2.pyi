from shared_model.wire.perspective.v1 import federation_pb2 as _federation_pb2
from shared_model.wire.perspective.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodedTensor(_message.Message):
    __slots__ = ("name", "shape", "payload", "sha256", "exact")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    sha256: str
    exact: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ..., sha256: _Optional[str] = ..., exact: _Optional[bytes] = ...) -> None: ...

class TensorBundle(_message.Message):
    __slots__ = ("kind", "column", "base_version", "tensors")
    KIND_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    column: int
    base_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[EncodedTensor]
    def __init__(self, kind: _Optional[str] = ..., column: _Optional[int] = ..., base_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[EncodedTensor, _Mapping]]] = ...) -> None: ...

class VersionManifest(_message.Message):
    __slots__ = ("version", "parent", "shared", "columns", "created_unix", "units")
    class ColumnsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: _tensor_pb2.BlobRef
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    version: int
    parent: int
    shared: _tensor_pb2.BlobRef
    columns: _containers.MessageMap[int, _tensor_pb2.BlobRef]
    created_unix: int
    units: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., parent: _Optional[int] = ..., shared: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ..., columns: _Optional[_Mapping[int, _tensor_pb2.BlobRef]] = ..., created_unix: _Optional[int] = ..., units: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckpointManifest(_message.Message):
    __slots__ = ("version", "shared", "columns", "ternary_columns", "bf16_parts")
    class ColumnsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: _tensor_pb2.BlobRef
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    TERNARY_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    BF16_PARTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    shared: _tensor_pb2.BlobRef
    columns: _containers.MessageMap[int, _tensor_pb2.BlobRef]
    ternary_columns: _containers.RepeatedScalarFieldContainer[int]
    bf16_parts: bool
    def __init__(self, version: _Optional[int] = ..., shared: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ..., columns: _Optional[_Mapping[int, _tensor_pb2.BlobRef]] = ..., ternary_columns: _Optional[_Iterable[int]] = ..., bf16_parts: _Optional[bool] = ...) -> None: ...

class NodeCapability(_message.Message):
    __slots__ = ("max_columns", "max_params", "threads", "device", "tokens_per_s", "ram_bytes")
    MAX_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MAX_PARAMS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_columns: int
    max_params: int
    threads: int
    device: str
    tokens_per_s: float
    ram_bytes: int
    def __init__(self, max_columns: _Optional[int] = ..., max_params: _Optional[int] = ..., threads: _Optional[int] = ..., device: _Optional[str] = ..., tokens_per_s: _Optional[float] = ..., ram_bytes: _Optional[int] = ...) -> None: ...

class ControlRequest(_message.Message):
    __slots__ = ("unit", "collect", "checkpoint", "versions", "teacher", "blob_address", "budget_tokens", "batch_size", "seq_len", "column_codec", "shared_codec", "eot_id", "credit_tokens", "acks", "submit_results", "more_units", "drop_queued", "shared_threshold", "eager_scale", "max_staleness", "network_id")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    COLLECT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    BLOB_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    COLUMN_CODEC_FIELD_NUMBER: _ClassVar[int]
    SHARED_CODEC_FIELD_NUMBER: _ClassVar[int]
    EOT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_RESULTS_FIELD_NUMBER: _ClassVar[int]
    MORE_UNITS_FIELD_NUMBER: _ClassVar[int]
    DROP_QUEUED_FIELD_NUMBER: _ClassVar[int]
    SHARED_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EAGER_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_ID_FIELD_NUMBER: _ClassVar[int]
    unit: _federation_pb2.WorkUnit
    collect: bool
    checkpoint: _tensor_pb2.BlobRef
    versions: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.BlobRef]
    teacher: _tensor_pb2.BlobRef
    blob_address: str
    budget_tokens: int
    batch_size: int
    seq_len: int
    column_codec: str
    shared_codec: str
    eot_id: int
    credit_tokens: int
    acks: _containers.RepeatedCompositeFieldContainer[_federation_pb2.WorkAck]
    submit_results: bool
    more_units: _containers.RepeatedCompositeFieldContainer[ControlRequest]
    drop_queued: bool
    shared_threshold: float
    eager_scale: float
    max_staleness: int
    network_id: str
    def __init__(self, unit: _Optional[_Union[_federation_pb2.WorkUnit, _Mapping]] = ..., collect: _Optional[bool] = ..., checkpoint: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[_tensor_pb2.BlobRef, _Mapping]]] = ..., teacher: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ..., blob_address: _Optional[str] = ..., budget_tokens: _Optional[int] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., column_codec: _Optional[str] = ..., shared_codec: _Optional[str] = ..., eot_id: _Optional[int] = ..., credit_tokens: _Optional[int] = ..., acks: _Optional[_Iterable[_Union[_federation_pb2.WorkAck, _Mapping]]] = ..., submit_results: _Optional[bool] = ..., more_units: _Optional[_Iterable[_Union[ControlRequest, _Mapping]]] = ..., drop_queued: _Optional[bool] = ..., shared_threshold: _Optional[float] = ..., eager_scale: _Optional[float] = ..., max_staleness: _Optional[int] = ..., network_id: _Optional[str] = ...) -> None: ...

class ControlReply(_message.Message):
    __slots__ = ("results", "capability", "queued_units", "synced_version", "failed_units", "failure_reasons", "bytes_down", "submits_results")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    QUEUED_UNITS_FIELD_NUMBER: _ClassVar[int]
    SYNCED_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAILED_UNITS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    SUBMITS_RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_federation_pb2.WorkResult]
    capability: NodeCapability
    queued_units: int
    synced_version: int
    failed_units: _containers.RepeatedScalarFieldContainer[str]
    failure_reasons: _containers.RepeatedScalarFieldContainer[str]
    bytes_down: int
    submits_results: bool
    def __init__(self, results: _Optional[_Iterable[_Union[_federation_pb2.WorkResult, _Mapping]]] = ..., capability: _Optional[_Union[NodeCapability, _Mapping]] = ..., queued_units: _Optional[int] = ..., synced_version: _Optional[int] = ..., failed_units: _Optional[_Iterable[str]] = ..., failure_reasons: _Optional[_Iterable[str]] = ..., bytes_down: _Optional[int] = ..., submits_results: _Optional[bool] = ...) -> None: ...
