"""A checkpoint records the tokenizer its token ids mean, and the entry points refuse one
trained on another corpus instead of training or scoring on garbage.

Every corpus trains its own tokenizer: two corpora prepared at the same vocabulary size
give models of the same shapes whose token ids stand for different text. Before checkpoints
recorded ``tokenizer_sha256``, ``serve --init`` or ``train --init`` with another corpus's
checkpoint ran without a word. Through the real CLI: ``perspective train`` (stages 1-2),
``coordinator serve`` (up to ``Coordinator.prepare``, its SuperLink port closed),
``generate`` and ``coordinator export``'s record.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from coordinator.central.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from coordinator.central.parallel.checkpointing import dcp_to_safetensors, safetensors_to_dcp
from coordinator.central.stages import setup_stage
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.model import PerspectiveModel
from tests.test_own_corpus import write_jsonl

MISMATCH = "was trained with tokenizer"


def cli(*args: str) -> tuple[int, str]:
    """``perspective ARGS``; the output with typer's boxes and line breaks flattened."""
    env = {**os.environ, "COLUMNS": "400"}  # typer boxes errors at the terminal's width
    done = subprocess.run([sys.executable, "-m", "shared_model.cli", *args],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    return done.returncode, " ".join((done.stdout + done.stderr).replace("│", " ").split())


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two operator corpora (other made-up words), and a stage-2 checkpoint of the first one
    trained by ``perspective train``."""
    tmp = tmp_path_factory.mktemp("tokenizers")
    sources = {name: tmp / f"{name}.jsonl" for name in ("a", "b")}
    for seed, path in enumerate(sources.values()):
        write_jsonl(path, seed=seed)
    data = ["--preset", "tiny", "--set", "train.steps=2", "--data-dir", str(tmp / "data")]
    code, said = cli("train", "--stage", "1", "--out", str(tmp / "s1"),
                     "--data", str(sources["a"]), *data)  # fmt: skip
    assert code == 0, said
    code, said = cli("train", "--stage", "2", "--out", str(tmp / "s2"),
                     "--init", str(tmp / "s1" / "stage1.safetensors"),
                     "--data", str(sources["a"]), *data)  # fmt: skip
    assert code == 0, said
    prepared = {k: prepare_corpus(str(p), 512, tmp / "data") for k, p in sources.items()}
    return {"tmp": tmp, "sources": sources, "prepared": prepared, "data": data}


def test_train_records_the_corpus_tokenizer_and_refuses_a_checkpoint_of_another_corpus(corpora):
    tmp, a, b = corpora["tmp"], corpora["prepared"]["a"], corpora["prepared"]["b"]
    assert a.tokenizer_sha256 != b.tokenizer_sha256
    for stage in (1, 2):  # stage 2 inherits it from its init as well as from the corpus
        ckpt = load_checkpoint(tmp / f"s{stage}" / f"stage{stage}.safetensors")
        assert ckpt.tokenizer_sha256 == a.tokenizer_sha256
    code, said = cli("train", "--stage", "3", "--out", str(tmp / "s3b"),
                     "--init", str(tmp / "s2" / "stage2.safetensors"),
                     "--data", str(corpora["sources"]["b"]), *corpora["data"])  # fmt: skip
    assert code == 2, said
    assert f"{MISMATCH} {a.tokenizer_sha256[:12]}" in said, said
    assert f"corpus {corpora['sources']['b']} tokenizes with {b.tokenizer_sha256[:12]}" in said
    assert not (tmp / "s3b").exists()  # refused before anything was written


@pytest.mark.integration
def test_serve_refuses_an_init_checkpoint_of_another_corpus_before_training(corpora):
    tmp = corpora["tmp"]
    other = str(corpora["sources"]["b"])
    code, said = cli("coordinator", "serve", "--superlink", "127.0.0.1:9", "--insecure",
                     "--superexec-secret-file", __file__, "--minutes", "1",
                     "--init", str(tmp / "s2" / "stage2.safetensors"),
                     "--work-dir", str(tmp / "serve"), "--data", other)  # fmt: skip
    assert code == 1, said
    assert MISMATCH in said and "Use the corpus the checkpoint was trained on" in said, said
    assert not (tmp / "serve" / "state.safetensors").exists()


def test_generate_refuses_a_tokenizer_file_of_another_corpus(corpora):
    tmp, prepared = corpora["tmp"], corpora["prepared"]
    ckpt = str(tmp / "s1" / "stage1.safetensors")
    args = ["generate", "--checkpoint", ckpt, "--prompt", "The ", "--max-new-tokens", "2"]
    code, said = cli(*args, "--tokenizer", str(prepared["b"].root / "tokenizer.json"))
    assert code == 2 and MISMATCH in said, said
    code, said = cli(*args, "--tokenizer", str(prepared["a"].root / "tokenizer.json"))
    assert code == 0 and said.startswith("The "), said


def test_a_checkpoint_that_records_no_tokenizer_is_accepted(corpora, tmp_path):
    """Checkpoints written before the digest existed have nothing to compare: accepted, and
    the stage's own checkpoints then record the corpus's tokenizer."""
    cfg = load_config("tiny")
    old = tmp_path / "old.safetensors"
    save_checkpoint(old, PerspectiveModel(cfg, moe=True), cfg, stage=2, step=0)
    assert load_checkpoint(old).tokenizer_sha256 is None
    b = corpora["prepared"]["b"]
    setup = setup_stage(cfg, 3, str(old), corpus=b)
    assert setup.tokenizer_sha256 == b.tokenizer_sha256
    with pytest.raises(CheckpointError, match=MISMATCH):
        setup_stage(cfg, 3, str(corpora["tmp"] / "s2" / "stage2.safetensors"), corpus=b)


def test_a_distributed_checkpoint_round_trip_keeps_the_tokenizer(corpora, tmp_path):
    src = corpora["tmp"] / "s1" / "stage1.safetensors"  # with its optimiser state
    back = tmp_path / "back.safetensors"
    dcp_to_safetensors(safetensors_to_dcp(src, tmp_path / "dcp"), back)
    before, after = load_checkpoint(src), load_checkpoint(back)
    assert after.tokenizer_sha256 == before.tokenizer_sha256 is not None
    assert all(torch.equal(after.model_state[k], t) for k, t in before.model_state.items())
