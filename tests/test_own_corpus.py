"""The operator's own corpus: ``serve --data`` / ``demo --data`` and the federated path on it.

The corpus goes through :func:`coordinator.coordinator_process.stage_corpus`, exactly what
``serve`` and ``demo`` call; the federated stage is the real :class:`Coordinator` (blob
store, SQLite, leases, intake, publishing) with the participant's real
:class:`UnitTrainer`; only the two network hops are direct calls (as in
test_federation_intake.py; the transports have their own tests).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from coordinator.central.checkpoint import save_checkpoint
from coordinator.coordinator_process import Coordinator, StageBudget, stage_corpus
from coordinator.db import participants as db_participants
from coordinator.federation_settings import FederationSettings
from participant.unit_trainer import BlobIO, UnitTrainer
from shared_model.config_loading import load_config
from shared_model.data import DataError, load_corpus
from shared_model.model import PerspectiveModel
from shared_model.wire.perspective.v1 import tensor_pb2

NODE = 1 << 63 | 777
SYLLABLES = ["ka", "lo", "mi", "re", "su", "ta", "ne", "vo", "di", "pa", "gu", "ri"]


def write_jsonl(path, n_docs: int = 160, seed: int = 0) -> None:
    """A small, learnable corpus: sentences of made-up words in a fixed pattern (subject,
    verb, object, a number), one document per line; enough distinct text for a 512-token
    vocabulary."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))) for _ in range(400)})
    nouns, verbs = words[: len(words) // 2], words[len(words) // 2 :]
    lines = []
    for _ in range(n_docs):
        sentences = [
            f"The {rng.choice(nouns)} {rng.choice(verbs)}s the {rng.choice(nouns)} "
            f"{rng.randint(0, 99)} times."
            for _ in range(30)
        ]
        lines.append(json.dumps({"text": " ".join(sentences)}))
    path.write_text("\n".join(lines) + "\n")


def test_sources_and_clear_errors(tmp_path):
    corpus = tmp_path / "mine.jsonl"
    write_jsonl(corpus, n_docs=5)
    docs = load_corpus(corpus)
    assert [d.name for d in docs] == [f"mine.jsonl:{i}" for i in range(1, 6)]
    with pytest.raises(DataError, match="does not exist: give 'stdlib', a directory"):
        load_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no non-empty document"):
        load_corpus(tmp_path / "empty.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="neither a directory nor a .txt/.jsonl file"):
        load_corpus(tmp_path / "data.csv")
    with pytest.raises(DataError, match="give hf:NAME"):
        load_corpus("hf:")


def test_hf_source_needs_the_datasets_library_or_reads_a_local_dataset(tmp_path):
    try:
        import datasets
    except ImportError:
        with pytest.raises(DataError, match=r"needs the Hugging Face 'datasets' library: pip"):
            load_corpus("hf:some/dataset:train")
        return
    texts = [f"document {i} " * 20 for i in range(4)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    docs = load_corpus(f"hf:{tmp_path / 'ds'}")
    assert [d.text for d in docs] == texts


@pytest.mark.integration
def test_serve_and_demo_refuse_a_missing_corpus_before_starting(tmp_path):
    cli = [sys.executable, "-m", "shared_model.cli"]
    missing = str(tmp_path / "missing.jsonl")
    serve = [*cli, "coordinator", "serve", "--superlink", "127.0.0.1:9", "--insecure",
             "--superexec-secret-file", __file__, "--init", __file__, "--minutes", "1",
             "--work-dir", str(tmp_path / "w"), "--data", missing]  # fmt: skip
    demo = [*cli, "demo", "--work-dir", str(tmp_path / "d"), "--data", missing]
    for argv, code in ((serve, 1), (demo, 2)):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        said = " ".join((done.stdout + done.stderr).replace("│", " ").split())
        assert done.returncode == code, said
        assert "missing.jsonl does not exist: give 'stdlib', a directory" in said, said
    assert not (tmp_path / "d" / "central").exists()  # nothing trained on no data


def lease_and_train(coord: Coordinator, loop, trainer: UnitTrainer):
    """One unit through the real lease, request, participant training and intake."""
    with loop.factory.begin() as s:
        p = db_participants.touch_participant(
            s, node_id=NODE, capability=db_participants.Capability(max_columns=4)
        )
        unit = loop.units.lease(s, p, loop.state)
        request = loop.units.request(unit, loop.state, NODE)
    store = coord.store
    io = BlobIO(
        fetch=lambda ref: store.get(ref.content_id),
        upload=lambda data: tensor_pb2.BlobRef(content_id=store.put_bytes(data), size=len(data)),
    )
    return loop.receive(NODE, trainer.run(request, io))


def test_federated_stage_on_a_jsonl_corpus_lowers_val_loss(tmp_path):
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=["train.batch_size=4", "train.seq_len=32"])
    source = tmp_path / "operator" / "corpus.jsonl"
    source.parent.mkdir()
    write_jsonl(source)
    work = tmp_path / "coordinator"
    corpus = stage_corpus(str(source), cfg, work)
    # Prepared once, under the work dir, with a document-level held-out split.
    assert corpus.root.parent == work / "corpus" and corpus.manifest["source"] == str(source)
    assert corpus.documents("val") and corpus.documents("train")
    assert stage_corpus(str(source), cfg, work).root == corpus.root
    seed = tmp_path / "stage2.safetensors"
    save_checkpoint(seed, PerspectiveModel(cfg, moe=True), cfg, stage=2, step=0)
    settings = FederationSettings(
        stage=3, steps_per_unit=8, buffer_size=1, eval_every=1, eval_batches=4, units_hint=20
    )
    coord = Coordinator(cfg, work, corpus)
    try:
        coord.prepare(seed, settings)
        loop = coord.federated_stage(None, StageBudget(minutes=30), settings)
        before = loop.evaluate()
        trainer = UnitTrainer(cfg, corpus.dataset("train"), tmp_path / "participant")
        for _ in range(4):
            assert lease_and_train(coord, loop, trainer).accepted
        after = loop.stats.val_loss[-1]
    finally:
        coord.shutdown()
    assert after[0] == 4 and after[1] < before - 0.5, (before, after)
    network = json.loads((work / "network.json").read_text())
    assert network["corpus"]["source"] == str(source)
