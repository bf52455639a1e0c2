"""The operator's own corpus: ``serve --data`` / ``demo --data`` and the federated path on it.

The corpus goes through :func:`coordinator.coordinator_process.stage_corpus`, exactly what
``serve`` and ``demo`` call; the federated stage is the real :class:`Coordinator` (blob
store, SQLite, leases, intake, publishing) with the participant's real
:class:`UnitTrainer`; only the two network hops are direct calls (as in
test_federation_intake.py; the transports have their own tests).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from coordinator.central.checkpoint import save_checkpoint
from coordinator.coordinator_process import Coordinator, StageBudget, stage_corpus
from coordinator.db import participants as db_participants
from coordinator.federation_settings import FederationSettings
from participant.unit_trainer import UnitTrainer
from shared_model.config_loading import load_config
from shared_model.data import DataError, load_corpus
from shared_model.model import PerspectiveModel
from tests.test_federation_intake import local_io

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


def test_hf_source_reads_a_local_dataset_and_never_downloads(tmp_path):
    import datasets

    texts = [f"document {i} " * 20 for i in range(4)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    docs = load_corpus(f"hf:{tmp_path / 'ds'}")
    assert [d.text for d in docs] == texts
    with pytest.raises(DataError, match=r"local datasets cache \(.*OfflineModeIsEnabled"):
        load_corpus("hf:perspective-no-such/dataset")  # offline: refused, not fetched
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "notext"))
    with pytest.raises(DataError, match=r"has no 'text' column \(columns: \['body'\]\)"):
        load_corpus(f"hf:{tmp_path / 'notext'}")


@pytest.mark.integration
def test_serve_and_demo_refuse_a_missing_corpus_before_starting(tmp_path):
    cli = [sys.executable, "-m", "shared_model.cli"]
    missing = str(tmp_path / "missing.jsonl")
    serve = [*cli, "coordinator", "serve", "--superlink", "127.0.0.1:9", "--insecure",
             "--superexec-secret-file", __file__, "--init", __file__, "--minutes", "1",
             "--work-dir", str(tmp_path / "w"), "--data", missing]  # fmt: skip
    demo = [*cli, "demo", "--work-dir", str(tmp_path / "d"), "--data", missing]
    for argv, code in ((serve, 1), (demo, 2)):
        # typer boxes errors at the terminal's width: wide enough that the path is not cut
        env = {**os.environ, "COLUMNS": "400"}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
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
    return loop.receive(NODE, trainer.run(request, local_io(coord.store, request.unit.unit_id)))


def federate(source: str, tmp) -> dict:
    """A federated stage 3 on an operator's corpus (``serve --data`` source): 4 units, 4
    versions, through ``stage_corpus`` as ``serve`` prepares it."""
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=["train.batch_size=4", "train.seq_len=32"])
    work = tmp / "coordinator"
    corpus = stage_corpus(source, cfg, work)
    seed = tmp / "stage2.safetensors"
    save_checkpoint(seed, PerspectiveModel(cfg, moe=True), cfg, stage=2, step=0)
    settings = FederationSettings(
        stage=3, steps_per_unit=8, buffer_size=1, eval_every=1, eval_batches=4, units_hint=20
    )
    coord = Coordinator(cfg, work, corpus)
    try:
        coord.prepare(seed, settings)
        loop = coord.federated_stage(None, StageBudget(minutes=30), settings)
        before = loop.evaluate()
        trainer = UnitTrainer(cfg, corpus.dataset("train"), tmp / "participant")
        accepted = [lease_and_train(coord, loop, trainer).accepted for _ in range(4)]
        published = loop.state.published_model().state_dict()
        stats = loop.stats
    finally:
        coord.shutdown()
    return {"source": source, "work": work, "corpus": corpus, "seed": seed, "before": before,
            "accepted": accepted, "stats": stats, "published": published, "tmp": tmp}  # fmt: skip


def assert_val_loss_fell(run: dict) -> None:
    """Every unit accepted, and 4 versions later the held-out loss is well below the seed's."""
    assert run["accepted"] == [True] * 4
    version, after = run["stats"].val_loss[-1]
    assert version == 4 and after < run["before"] - 0.5, (run["before"], after)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A federated stage 3 on an operator's JSONL corpus."""
    tmp = tmp_path_factory.mktemp("own")
    source = tmp / "operator" / "corpus.jsonl"
    source.parent.mkdir()
    write_jsonl(source)
    return federate(str(source), tmp)


def test_federated_stage_on_a_jsonl_corpus_lowers_val_loss(trained):
    work, source, corpus = trained["work"], trained["source"], trained["corpus"]
    # Prepared once, under the work dir, with a document-level held-out split.
    assert corpus.root.parent == work / "corpus" and corpus.manifest["source"] == str(source)
    assert corpus.documents("val") and corpus.documents("train")
    assert_val_loss_fell(trained)
    network = json.loads((work / "network.json").read_text())
    assert network["corpus"]["source"] == str(source)


def test_federated_stage_on_a_local_datasets_dataset_lowers_val_loss(tmp_path):
    """``--data hf:DIR``: a Hugging Face ``datasets`` dataset written by ``save_to_disk`` (made
    here from the same kind of text; nothing is downloaded), split ``train``."""
    import datasets

    jsonl = tmp_path / "texts.jsonl"
    write_jsonl(jsonl, seed=1)
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    splits = {"train": datasets.Dataset.from_dict({"text": texts}),
              "other": datasets.Dataset.from_dict({"text": ["unused"]})}  # fmt: skip
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    run = federate(f"hf:{tmp_path / 'ds'}:train", tmp_path)
    assert len(run["corpus"].documents("train")) + len(run["corpus"].documents("val")) == 160
    assert_val_loss_fell(run)


def cli(*args: str, timeout: float = 300) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "shared_model.cli", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow  # stage 7's tasks and system tests on the export (~30 s on a busy CPU)
def test_export_gives_the_published_model_to_generate_eval_and_stage5(trained):
    from coordinator.central.checkpoint import load_checkpoint
    from coordinator.central.evaluation.report import run_eval
    from coordinator.export import export_version

    out = trained["tmp"] / "export"
    work = trained["work"]
    code, said = cli("coordinator", "export", "--work-dir", str(work), "--out", str(out))
    assert code == 0, said
    assert "version 4 (stage 3)" in said
    assert f"perspective manifold run --checkpoint {out / 'model.safetensors'} --data" in said
    ckpt = load_checkpoint(out / "model.safetensors")  # its own tensor hash verified
    assert ckpt.stage == 3 and ckpt.step == 4
    assert ckpt.meta["extra"]["federated"]["version"] == 4
    published = trained["published"]
    assert set(ckpt.model_state) == set(published)
    assert all(torch.equal(ckpt.model_state[k], published[k]) for k in published)
    assert (out / "tokenizer.json").read_bytes() == (
        trained["corpus"].root / "tokenizer.json"
    ).read_bytes()
    # Version 0 is the stage-2 seed the network started from, bit for bit.
    v0 = export_version(work_dir=work, db_url=None, version=0, out=out / "v0")
    v0, seed = load_checkpoint(v0.checkpoint), load_checkpoint(trained["seed"])
    assert all(torch.equal(v0.model_state[k], t) for k, t in seed.model_state.items())
    code, said = cli("generate", "--checkpoint", str(out / "model.safetensors"),
                     "--prompt", "The ", "--max-new-tokens", "8")  # fmt: skip
    assert code == 0 and said.startswith("The "), said
    # Stage 7 (what `perspective eval` runs; small safety-polytope parameters, both task
    # kinds but one generation item: CPU generation is the slow part) ...
    from coordinator.central.evaluation.report import default_tasks

    mc, gen = sorted(default_tasks(), key=lambda p: "gsm" in p.name)
    one_gen = out / "gsm_one.jsonl"
    one_gen.write_text(gen.read_text().splitlines()[0] + "\n")
    params = {"vocab_size": 1000, "anchors": 100, "halfspaces": 100}
    report = run_eval(out / "model.safetensors", out / "eval", data=trained["corpus"],
                      device="cpu", gen_tokens=8, ppl_batches=2, spp_params=params,
                      tasks=[mc, one_gen])  # fmt: skip
    assert report["stage"] == 3 and report["perplexity"]["val_ppl"] > 1
    assert report["tasks"]["arc_mini"]["n"] == 10 and report["tasks"]["gsm_one"]["n"] == 1
    # ... and stage 5 start from it, with the command the export printed.
    data = ["--data", str(trained["source"]), "--data-dir", str(work / "corpus")]
    params = ["--param", "steps=2", "--param", "init_batches=1", "--out", str(out / "s5")]
    code, said = cli("manifold", "run", "--checkpoint", str(out / "model.safetensors"), *data,
                     *params)  # fmt: skip
    assert code == 0, said
    assert load_checkpoint(out / "s5" / "stage5.safetensors").stage == 5


def test_export_refuses_a_corrupt_chain_and_unknown_versions(trained, tmp_path):
    import shutil

    from coordinator.export import ExportError, export_version

    work = tmp_path / "copy"
    shutil.copytree(trained["work"], work)
    with pytest.raises(ExportError, match="no model version 99"):
        export_version(work_dir=work, db_url=None, version=99, out=tmp_path / "x")
    with pytest.raises(ExportError, match="network.json does not exist"):
        export_version(work_dir=tmp_path, db_url=None, version=None, out=tmp_path / "x")
    import sqlite3

    with sqlite3.connect(work / "coordinator.db") as db:
        (manifest,) = db.execute("select checksum from model_versions where version = 3").fetchone()
    blob = next((work / "blobs").rglob(manifest + "*"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"blob {manifest} of the version chain is not usable"):
        export_version(work_dir=work, db_url=None, version=None, out=tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists()
