from shared_model.wire.perspective.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RejectReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_REASON_UNSPECIFIED: _ClassVar[RejectReason]
    REJECT_REASON_UNKNOWN_LEASE: _ClassVar[RejectReason]
    REJECT_REASON_EXPIRED_LEASE: _ClassVar[RejectReason]
    REJECT_REASON_DUPLICATE: _ClassVar[RejectReason]
    REJECT_REASON_WRONG_NODE: _ClassVar[RejectReason]
    REJECT_REASON_BAD_SHAPE: _ClassVar[RejectReason]
    REJECT_REASON_BAD_CHECKSUM: _ClassVar[RejectReason]
    REJECT_REASON_DECODE_ERROR: _ClassVar[RejectReason]
    REJECT_REASON_NONFINITE: _ClassVar[RejectReason]
    REJECT_REASON_NORM_TOO_LARGE: _ClassVar[RejectReason]
    REJECT_REASON_TOO_STALE: _ClassVar[RejectReason]
    REJECT_REASON_MISSING_BLOB: _ClassVar[RejectReason]
    REJECT_REASON_QUOTA_EXCEEDED: _ClassVar[RejectReason]
    REJECT_REASON_WRONG_COLUMNS: _ClassVar[RejectReason]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_EXPERT_DIFFERENTIATION: _ClassVar[Stage]
    STAGE_TERNARY_DISTILLATION: _ClassVar[Stage]
REJECT_REASON_UNSPECIFIED: RejectReason
REJECT_REASON_UNKNOWN_LEASE: RejectReason
REJECT_REASON_EXPIRED_LEASE: RejectReason
REJECT_REASON_DUPLICATE: RejectReason
REJECT_REASON_WRONG_NODE: RejectReason
REJECT_REASON_BAD_SHAPE: RejectReason
REJECT_REASON_BAD_CHECKSUM: RejectReason
REJECT_REASON_DECODE_ERROR: RejectReason
REJECT_REASON_NONFINITE: RejectReason
REJECT_REASON_NORM_TOO_LARGE: RejectReason
REJECT_REASON_TOO_STALE: RejectReason
REJECT_REASON_MISSING_BLOB: RejectReason
REJECT_REASON_QUOTA_EXCEEDED: RejectReason
REJECT_REASON_WRONG_COLUMNS: RejectReason
STAGE_UNSPECIFIED: Stage
STAGE_EXPERT_DIFFERENTIATION: Stage
STAGE_TERNARY_DISTILLATION: Stage

class DocumentRef(_message.Message):
    __slots__ = ("column", "doc")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    column: int
    doc: int
    def __init__(self, column: _Optional[int] = ..., doc: _Optional[int] = ...) -> None: ...

class WorkUnit(_message.Message):
    __slots__ = ("unit_id", "base_version", "columns", "layers", "shard_ids", "documents", "steps", "lr", "lr_min", "warmup_steps", "lr_schedule", "stage", "ternary_fraction", "kd_weight", "shared_sync_every", "train_shared", "deadline_unix", "capability_token", "base_checkpoint", "delta_chain", "upload_quota_bytes", "seed", "score_documents", "start_from_newest", "hold_columns", "expert_lr_scale", "fresh_columns")
    UNIT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LR_MIN_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TERNARY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    KD_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHARED_SYNC_EVERY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SHARED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BASE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DELTA_CHAIN_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCORE_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    START_FROM_NEWEST_FIELD_NUMBER: _ClassVar[int]
    HOLD_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    FRESH_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    unit_id: str
    base_version: int
    columns: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    shard_ids: _containers.RepeatedScalarFieldContainer[str]
    documents: _containers.RepeatedCompositeFieldContainer[DocumentRef]
    steps: int
    lr: float
    lr_min: float
    warmup_steps: int
    lr_schedule: str
    stage: Stage
    ternary_fraction: float
    kd_weight: float
    shared_sync_every: int
    train_shared: bool
    deadline_unix: int
    capability_token: str
    base_checkpoint: _tensor_pb2.BlobRef
    delta_chain: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.BlobRef]
    upload_quota_bytes: int
    seed: int
    score_documents: bool
    start_from_newest: bool
    hold_columns: bool
    expert_lr_scale: float
    fresh_columns: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, unit_id: _Optional[str] = ..., base_version: _Optional[int] = ..., columns: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[int]] = ..., shard_ids: _Optional[_Iterable[str]] = ..., documents: _Optional[_Iterable[_Union[DocumentRef, _Mapping]]] = ..., steps: _Optional[int] = ..., lr: _Optional[float] = ..., lr_min: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., lr_schedule: _Optional[str] = ..., stage: _Optional[_Union[Stage, str]] = ..., ternary_fraction: _Optional[float] = ..., kd_weight: _Optional[float] = ..., shared_sync_every: _Optional[int] = ..., train_shared: _Optional[bool] = ..., deadline_unix: _Optional[int] = ..., capability_token: _Optional[str] = ..., base_checkpoint: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ..., delta_chain: _Optional[_Iterable[_Union[_tensor_pb2.BlobRef, _Mapping]]] = ..., upload_quota_bytes: _Optional[int] = ..., seed: _Optional[int] = ..., score_documents: _Optional[bool] = ..., start_from_newest: _Optional[bool] = ..., hold_columns: _Optional[bool] = ..., expert_lr_scale: _Optional[float] = ..., fresh_columns: _Optional[_Iterable[int]] = ...) -> None: ...

class ColumnDelta(_message.Message):
    __slots__ = ("column", "delta")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    column: int
    delta: _tensor_pb2.BlobRef
    def __init__(self, column: _Optional[int] = ..., delta: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ...) -> None: ...

class DocumentLoss(_message.Message):
    __slots__ = ("loss", "column", "doc")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    loss: float
    column: int
    doc: int
    def __init__(self, loss: _Optional[float] = ..., column: _Optional[int] = ..., doc: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("sync_s", "train_s", "encode_s", "upload_s", "total_s", "score_s", "sync_fetches", "sync_versions", "eager_results")
    SYNC_S_FIELD_NUMBER: _ClassVar[int]
    TRAIN_S_FIELD_NUMBER: _ClassVar[int]
    ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    SCORE_S_FIELD_NUMBER: _ClassVar[int]
    SYNC_FETCHES_FIELD_NUMBER: _ClassVar[int]
    SYNC_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EAGER_RESULTS_FIELD_NUMBER: _ClassVar[int]
    sync_s: float
    train_s: float
    encode_s: float
    upload_s: float
    total_s: float
    score_s: float
    sync_fetches: int
    sync_versions: int
    eager_results: int
    def __init__(self, sync_s: _Optional[float] = ..., train_s: _Optional[float] = ..., encode_s: _Optional[float] = ..., upload_s: _Optional[float] = ..., total_s: _Optional[float] = ..., score_s: _Optional[float] = ..., sync_fetches: _Optional[int] = ..., sync_versions: _Optional[int] = ..., eager_results: _Optional[int] = ...) -> None: ...

class WorkResult(_message.Message):
    __slots__ = ("unit_id", "node_id", "base_version", "column_deltas", "shared_update", "tokens", "train_loss", "val_loss", "document_losses", "timings")
    UNIT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLUMN_DELTAS_FIELD_NUMBER: _ClassVar[int]
    SHARED_UPDATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_LOSSES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    unit_id: str
    node_id: str
    base_version: int
    column_deltas: _containers.RepeatedCompositeFieldContainer[ColumnDelta]
    shared_update: _tensor_pb2.SharedUpdate
    tokens: int
    train_loss: float
    val_loss: float
    document_losses: _containers.RepeatedCompositeFieldContainer[DocumentLoss]
    timings: Timings
    def __init__(self, unit_id: _Optional[str] = ..., node_id: _Optional[str] = ..., base_version: _Optional[int] = ..., column_deltas: _Optional[_Iterable[_Union[ColumnDelta, _Mapping]]] = ..., shared_update: _Optional[_Union[_tensor_pb2.SharedUpdate, _Mapping]] = ..., tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., document_losses: _Optional[_Iterable[_Union[DocumentLoss, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class WorkAck(_message.Message):
    __slots__ = ("unit_id", "accepted", "reason", "detail", "applied_version", "reason_code")
    UNIT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    APPLIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    unit_id: str
    accepted: bool
    reason: RejectReason
    detail: str
    applied_version: int
    reason_code: str
    def __init__(self, unit_id: _Optional[str] = ..., accepted: _Optional[bool] = ..., reason: _Optional[_Union[RejectReason, str]] = ..., detail: _Optional[str] = ..., applied_version: _Optional[int] = ..., reason_code: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "parent", "checksum", "delta_chain", "checkpoint", "created_unix")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DELTA_CHAIN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    version: int
    parent: int
    checksum: str
    delta_chain: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.BlobRef]
    checkpoint: _tensor_pb2.BlobRef
    created_unix: int
    def __init__(self, version: _Optional[int] = ..., parent: _Optional[int] = ..., checksum: _Optional[str] = ..., delta_chain: _Optional[_Iterable[_Union[_tensor_pb2.BlobRef, _Mapping]]] = ..., checkpoint: _Optional[_Union[_tensor_pb2.BlobRef, _Mapping]] = ..., created_unix: _Optional[int] = ...) -> None: ...
