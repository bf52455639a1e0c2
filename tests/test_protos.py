"""The committed generated wire code matches the .proto files, and messages round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared_model.wire.perspective.v1 import federation_pb2, tensor_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


#: The bytes of the two messages below, as committed: a renumbered or retyped field changes
#: them, which would silently break every participant running the previous release.
WORK_UNIT_HEX = (
    "0a03752d3110071a0203052a027330386441613255302aa9333f600469000000000000e03f710000"
    "00000000e03f7814880180e6fe8907920103746f6b9a01440a406162616261626162616261626162"
    "61626162616261626162616261626162616261626162616261626162616261626162616261626162"
    "61626162616261626162100ac201040803100b"
)
WORK_RESULT_HEX = "0a03752d3112016e220208032a0911000000000000f83f4a0d1100000000000004401803200b"


def test_work_unit_and_result_bytes_are_stable() -> None:
    unit = federation_pb2.WorkUnit(
        unit_id="u-1",
        base_version=7,
        columns=[3, 5],
        shard_ids=["s0"],
        documents=[federation_pb2.DocumentRef(column=3, doc=11)],
        steps=100,
        lr=3e-4,
        stage=federation_pb2.STAGE_TERNARY_DISTILLATION,
        ternary_fraction=0.5,
        kd_weight=0.5,
        shared_sync_every=20,
        deadline_unix=1_900_000_000,
        capability_token="tok",
        base_checkpoint=tensor_pb2.BlobRef(content_id="ab" * 32, size=10),
    )
    assert unit.SerializeToString(deterministic=True).hex() == WORK_UNIT_HEX
    again = federation_pb2.WorkUnit.FromString(bytes.fromhex(WORK_UNIT_HEX))
    assert again == unit and list(again.columns) == [3, 5]
    assert [(d.column, d.doc) for d in again.documents] == [(3, 11)]
    result = federation_pb2.WorkResult(
        unit_id="u-1",
        node_id="n",
        column_deltas=[federation_pb2.ColumnDelta(column=3)],
        document_losses=[federation_pb2.DocumentLoss(doc=11, column=3, loss=2.5)],
        shared_update=tensor_pb2.SharedUpdate(norm=1.5),
    )
    assert result.SerializeToString(deterministic=True).hex() == WORK_RESULT_HEX
    assert federation_pb2.WorkResult.FromString(bytes.fromhex(WORK_RESULT_HEX)) == result
    assert federation_pb2.REJECT_REASON_NORM_TOO_LARGE != federation_pb2.REJECT_REASON_UNSPECIFIED


def test_codec_ids_match_container_codec_bytes() -> None:
    from shared_model.codec import container

    assert tensor_pb2.CODEC_ID_TRITS_ZSTD == container.CODEC_TRITS_ZSTD
    assert tensor_pb2.CODEC_ID_TRITS_ANS == container.CODEC_TRITS_ANS
    assert tensor_pb2.CODEC_ID_DELTA_GOLOMB_ANS == container.CODEC_DELTA
    assert tensor_pb2.CODEC_ID_SPARSE_2BIT == container.CODEC_SPARSE_2BIT
