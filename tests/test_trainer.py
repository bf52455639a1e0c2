"""Trainer: every stage runs on real stdlib text, stage-2 cloning, bit-identical resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from coordinator.central.checkpoint import load_checkpoint
from coordinator.central.stages import StageError, setup_stage
from coordinator.central.trainer import evaluate, train_stage
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.model import PerspectiveModel
from shared_model.schedule import build_optimizer, lr_at, set_lr, ternary_fraction_at
from shared_model.stage_loss import TEACHER_DTYPE, teacher_run_dtype

torch.set_num_threads(1)

OVERRIDES = [
    "train.steps=6",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.checkpoint_every=3",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_corpus("stdlib", 512, tmp_path_factory.mktemp("data"), max_bytes=600_000)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", overrides=OVERRIDES)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, cfg, data):
    out = tmp_path_factory.mktemp("run")
    results = {1: train_stage(cfg, 1, out, data=data)}
    for stage in (2, 3, 4):
        results[stage] = train_stage(cfg, stage, out, init=results[stage - 1].checkpoint, data=data)
    return out, results


def test_all_stages_run(pipeline):
    out, results = pipeline
    for stage, r in results.items():
        assert math.isfinite(r.val_loss), stage
        assert load_checkpoint(r.checkpoint).stage == stage
        assert json.loads((out / f"stage{stage}.json").read_text())["stage"] == stage
        if stage != 2:
            assert r.steps == 6 and r.tokens == 6 * 4 * 32 and r.tokens_per_s > 0
            assert math.isfinite(r.train_loss)
            assert [h["step"] for h in r.history] == [3, 6]
    assert results[1].history[-1]["train_loss"] < math.log(512)  # learnt something


def test_stage2_experts_equal_source_ffn(pipeline, cfg):
    _, results = pipeline
    dense = load_checkpoint(results[1].checkpoint).model_state
    moe = load_checkpoint(results[2].checkpoint).model_state
    gqa = cfg.model.gqa_layers()
    for i in cfg.model.pdr_layers():
        owner = gqa[cfg.model.ffn_bank(i)]
        for e in range(cfg.moe.n_experts):
            for w in ("w1", "w2", "w3"):
                src = dense[f"layers.{owner}.ffn.{w}.weight"]
                assert torch.equal(moe[f"layers.{i}.ffn.experts.{e}.{w}.weight"], src)
    for name, value in dense.items():  # shared weights copied unchanged
        assert torch.equal(moe[name], value), name


def test_stage4_ends_fully_ternary(pipeline, cfg, data):
    """Stage 4's final model is the all-ternary one: its reported val loss is the loss with
    every expert weight ternary (fraction 1), not the loss of its FP latents."""
    _, results = pipeline
    assert load_checkpoint(results[4].checkpoint).meta["extra"]["teacher"] == results[3].checkpoint
    assert ternary_fraction_at(5, 6, cfg.ternary.schedule) == 1.0
    model = PerspectiveModel(cfg, moe=True)
    model.load_state_dict(load_checkpoint(results[4].checkpoint).model_state)
    t = cfg.train
    model.set_ternary_fraction(1.0)
    ternary = evaluate(model, data.dataset("val"), t.eval_batches, t.batch_size, t.seq_len)
    model.set_ternary_fraction(None)
    fp = evaluate(model, data.dataset("val"), t.eval_batches, t.batch_size, t.seq_len)
    tol = 1e-5
    assert results[4].val_loss == pytest.approx(ternary, abs=tol)
    # The two differ by far more than that tolerance, so the check above means something.
    # (Not a fixed 1e-3: on 6 steps of tiny the gap is ~1e-3 and varied across runs; one
    # full run saw 0.00096 and failed a guard that was never about the size of the gap.)
    assert abs(fp - ternary) > 10 * tol


def test_stage4_distils_from_the_stage3_model_in_bf16(pipeline, cfg, data):
    """Stage 4's central teacher is the stage-3 checkpoint rounded to ``TEACHER_DTYPE``
    (bf16, as a participant's; run in FP32 on a CPU), frozen; a resumed stage 4 rebuilds the
    same one from the checkpoint its own checkpoint names."""
    _, results = pipeline
    stage3 = load_checkpoint(results[3].checkpoint).model_state
    for init in (results[3].checkpoint, results[4].checkpoint):  # a start, a resume
        teacher = setup_stage(cfg, 4, init, corpus=data).teacher
        assert teacher is not None and not teacher.training
        for name, value in teacher.state_dict().items():  # on a CPU it runs in FP32
            assert value.dtype == teacher_run_dtype("cpu") == torch.float32, name
            assert torch.equal(value, stage3[name].to(TEACHER_DTYPE).float()), name
        assert not any(p.requires_grad for p in teacher.parameters())


def _losses(history):
    return [(h["step"], h["train_loss"], h["val_loss"]) for h in history]


def _final_state(path):
    return load_checkpoint(path).model_state


@pytest.mark.parametrize("stage", [1, 4])
def test_resume_is_bit_identical(tmp_path, cfg, data, pipeline, stage):
    _, results = pipeline
    init = None if stage == 1 else results[3].checkpoint
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        full = train_stage(cfg, stage, tmp_path / "full", init=init, data=data)
        torch.manual_seed(0)
        part = train_stage(cfg, stage, tmp_path / "part", init=init, data=data, until_step=4)
        assert part.steps == 4
        rest = train_stage(cfg, stage, tmp_path / "part", init=part.checkpoint, data=data)
    finally:
        torch.use_deterministic_algorithms(False)
    assert rest.steps == 6 and rest.tokens == full.tokens
    assert _losses(rest.history) == _losses(full.history)
    a, b = _final_state(full.checkpoint), _final_state(rest.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_is_a_function_of_its_inputs(tmp_path, cfg, data, pipeline):
    """Stage 1 again, after other runs moved every global generator: the same weights,
    optimiser and recorded RNG states as the pipeline's (``train_stage`` seeds them itself;
    a benchmark calling it twice in one process got two different models)."""
    torch.rand(7), __import__("random").random(), __import__("numpy").random.rand()
    again = load_checkpoint(train_stage(cfg, 1, tmp_path, data=data).checkpoint)
    first = load_checkpoint(pipeline[1][1].checkpoint)
    assert again.meta["tensor_sha256"] == first.meta["tensor_sha256"]
    assert again.meta["rng"] == first.meta["rng"]


def test_time_budget_stops_cleanly(tmp_path, cfg, data):
    r = train_stage(cfg, 1, tmp_path, data=data, minutes=0.0)
    assert r.stopped_early and r.steps == 0
    assert load_checkpoint(r.checkpoint).step == 0


def test_bad_stage_init(tmp_path, cfg, data, pipeline):
    _, results = pipeline
    with pytest.raises(StageError, match="needs --init"):
        train_stage(cfg, 3, tmp_path, data=data)
    with pytest.raises(StageError, match="cannot start from a stage-1"):
        train_stage(cfg, 3, tmp_path, init=results[1].checkpoint, data=data)
    with pytest.raises(StageError, match="stage 5 is invalid"):
        train_stage(cfg, 5, tmp_path, data=data)


def test_evaluate_is_deterministic(pipeline, cfg, data):
    from shared_model.model import PerspectiveModel

    model = PerspectiveModel(cfg)
    val = data.dataset("val")
    assert evaluate(model, val, 2, 2, 16) == evaluate(model, val, 2, 2, 16)


def test_schedules(cfg):
    o = cfg.optim
    assert lr_at(0, o, 100) == pytest.approx(o.lr / o.warmup_steps)
    assert lr_at(o.warmup_steps, o, 100) == pytest.approx(o.lr)
    assert lr_at(100, o, 100) == pytest.approx(o.min_lr)
    fracs = [ternary_fraction_at(s, 8, (0.25, 0.5, 0.75, 1.0)) for s in range(8)]
    assert fracs == [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]


def test_the_experts_train_at_the_expert_lr_scale(tmp_path, cfg, data, pipeline):
    """``optim.expert_lr_scale`` gives the expert columns their own groups, at that multiple
    of the scheduled lr, in a central stage too; at 1 the optimiser keeps the two groups
    that optimiser states saved before the split hold."""
    from dataclasses import replace

    from shared_model.moe import is_expert_param

    model = PerspectiveModel(cfg, moe=True)
    plain = build_optimizer(model, replace(cfg.optim, expert_lr_scale=1.0))
    assert [g["weight_decay"] for g in plain.param_groups] == [cfg.optim.weight_decay, 0.0]
    split = build_optimizer(model, replace(cfg.optim, expert_lr_scale=1.0), split_experts=True)
    set_lr(split, 1.0, 0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in split.param_groups:
        assert all(is_expert_param(names[id(p)])[0] == group["experts"] for p in group["params"])
        assert group["lr"] == (0.25 if group["experts"] else 1.0)
    _, results = pipeline
    scaled = replace(cfg, optim=replace(cfg.optim, expert_lr_scale=0.5))
    train_stage(scaled, 3, tmp_path, init=results[2].checkpoint, data=data, until_step=1)
    groups = load_checkpoint(tmp_path / "stage3.safetensors").meta["param_groups"]
    lrs = {g["experts"]: g["lr"] for g in groups if g["params"]}
    assert lrs[True] == pytest.approx(0.5 * lrs[False]) and lrs[False] > 0
