"""Stage 6: safety polytope construction, calibration, runtime check, guarded generation."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator.central.checkpoint import save_checkpoint
from coordinator.central.evaluation.loading import load_model
from coordinator.central.safety import (
    SafetyError,
    SafetyPolytope,
    asset_path,
    block_rate,
    calibrate_eps,
    kmeans,
    read_prompts,
    read_words,
    text_representations,
)
from coordinator.central.safety_stage import guarded_generate, run_spp, split_redteam
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.model import PerspectiveModel

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_corpus("stdlib", 512, tmp_path_factory.mktemp("data"), max_bytes=600_000)


@pytest.fixture(scope="module")
def spp_run(cfg, corpus, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("spp")
    path = out / "stage4.safetensors"
    save_checkpoint(path, PerspectiveModel(cfg, moe=True), cfg, stage=4, step=0)
    return out, run_spp(cfg, path, out, data=corpus, vocab_size=2000, anchors=200, halfspaces=300)


def test_shipped_sets_are_nonempty_and_well_formed():
    assert len(read_words()) >= 4000
    assert len(read_prompts(asset_path("redteam.jsonl"))) >= 50


def test_spp_is_calibrated_on_half_the_redteam_set_and_measured_on_the_other(spp_run, cfg, corpus):
    """ε comes from the calibration half only; the claimed rate is the held-out half's."""
    out, result = spp_run
    spp = SafetyPolytope.load(out / "spp.safetensors")
    model, _ = load_model(out / "stage4.safetensors", "cpu")
    red = read_prompts(asset_path("redteam.jsonl"))
    scores = spp.score(text_representations(model, corpus.tokenizer(), red, spp.source))
    calib, held_out = split_redteam(len(red), 0)
    assert not set(calib.tolist()) & set(held_out.tolist())
    assert sorted(calib.tolist() + held_out.tolist()) == list(range(len(red)))
    assert result["redteam_calibration_prompts"] == len(calib) >= 25
    assert result["eps"] == calibrate_eps(scores[calib], 0.98)
    assert result["redteam_calibration_block_rate"] >= result["target_block_rate"] == 0.98
    assert result["redteam_block_rate"] == block_rate(scores[held_out], result["eps"])
    benign = read_prompts(asset_path("benign.jsonl"))
    ben = spp.score(text_representations(model, corpus.tokenizer(), benign, spp.source))
    assert result["benign_false_block_rate"] == block_rate(ben, result["eps"])
    assert result["anchors"] == 200 and result["halfspaces"] == 300
    saved = json.loads((out / "spp.json").read_text())
    assert saved["benign_false_block_rate"] == result["benign_false_block_rate"]


def test_the_redteam_split_is_seeded_and_refuses_a_set_too_small():
    a, b = split_redteam(52, 0)
    assert len(a) == len(b) == 26
    assert torch.equal(split_redteam(52, 0)[0], a) and not torch.equal(split_redteam(52, 1)[0], a)
    with pytest.raises(SafetyError, match="at least 2"):
        split_redteam(1, 0)


def test_polytope_round_trip_and_check(spp_run, cfg):
    out, result = spp_run
    spp = SafetyPolytope.load(out / "spp.safetensors")
    assert spp.eps == result["eps"]
    # every anchor is inside the (uninflated) outer polytope: b_j = max_a u_j·a
    assert (spp.score(spp.anchors) <= 1e-5).all()
    blocked, score = spp.check(spp.anchors.mean(0, keepdim=True) + 1e3 * spp.directions[:1])
    assert bool(blocked[0]) and float(score[0]) > 0
    with pytest.raises(SafetyError):
        spp.check(torch.zeros(3, cfg.model.d_model + 1))


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SafetyError):
        SafetyPolytope.load(bad)


def test_calibrate_eps_is_the_largest_reaching_target():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    eps = calibrate_eps(scores, 0.8)
    assert float((scores > eps).float().mean()) == pytest.approx(0.8)
    assert float((scores > eps + 1e-3).float().mean()) < 0.8
    with pytest.raises(SafetyError):
        calibrate_eps(scores, 0.0)


def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centres])
    got = kmeans(x, 3)
    assert torch.cdist(centres, got).min(1).values.max() < 0.5


def test_bad_prompt_file_is_reported(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(SafetyError, match="prompt"):
        read_prompts(path)


def test_guarded_generation_stops_when_leaving_the_polytope(spp_run, cfg):
    out, _ = spp_run
    torch.manual_seed(0)
    model = PerspectiveModel(cfg, moe=True).eval()
    spp = SafetyPolytope.load(out / "spp.safetensors")
    spp.eps = float("inf")  # nothing blocked: full length
    free = guarded_generate(model, spp, [1, 2, 3], 5)
    assert not free.blocked and len(free.ids) == 8 and len(free.scores) == 6
    spp.eps = float("-inf")  # everything blocked: the prompt is refused
    refused = guarded_generate(model, spp, [1, 2, 3], 5)
    assert refused.blocked and refused.blocked_at == 0 and refused.ids == [1, 2, 3]


@pytest.mark.slow
def test_spp_runs_as_a_stage_job_and_is_reused(cfg, corpus, tmp_path):
    from coordinator.db.engine import init_db, make_session_factory, sqlite_url
    from coordinator.stage_jobs import run_stage_job

    factory = make_session_factory(init_db(sqlite_url(tmp_path / "jobs.db")))
    init = tmp_path / "stage4.safetensors"
    torch.manual_seed(0)
    save_checkpoint(init, PerspectiveModel(cfg, moe=True), cfg, stage=4, step=0)
    first = run_stage_job(factory, "6", cfg, tmp_path / "out", data=corpus, init=init)
    assert first.state == "done" and not first.reused
    (summary_path,) = (tmp_path / "out" / "jobs").glob("*/spp.json")
    summary = json.loads(summary_path.read_text())
    assert first.progress["redteam_block_rate"] == summary["redteam_block_rate"]
    assert SafetyPolytope.load(first.output_path).eps == first.progress["eps"]
    again = run_stage_job(factory, "6", cfg, tmp_path / "out", data=corpus, init=init)
    assert again.reused and again.output_id == first.output_id
