"""Checkpoint save/load: round trip, optimiser + RNG state, corruption and mismatch errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from coordinator.central.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    restore,
    save_checkpoint,
    sha256_file,
)
from shared_model.config_loading import load_config
from shared_model.model import PerspectiveModel
from shared_model.schedule import build_optimizer

torch.set_num_threads(1)


@pytest.fixture()
def trained(tmp_path):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = PerspectiveModel(cfg)
    opt = build_optimizer(model, cfg.optim)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(x[:, :-1], targets=x[:, 1:]).loss.backward()
    opt.step()
    path = tmp_path / "c.safetensors"
    sha = save_checkpoint(path, model, cfg, stage=1, step=1, optimizer=opt, data_position=7)
    return cfg, model, opt, path, sha


def test_round_trip(trained):
    cfg, model, opt, path, sha = trained
    assert sha == sha256_file(path)
    assert not list(path.parent.glob(".*tmp*"))  # temp file renamed away
    ckpt = load_checkpoint(path)
    assert ckpt.cfg == cfg and ckpt.stage == 1 and ckpt.step == 1 and ckpt.data_position == 7
    fresh = PerspectiveModel(cfg)
    fresh_opt = build_optimizer(fresh, cfg.optim)
    restore(ckpt, fresh, fresh_opt)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    by_name = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(value, fresh_opt.state[by_name[name]][key])


def test_rng_state_restored(trained):
    _, _, _, path, _ = trained
    ckpt = load_checkpoint(path)
    expected = (torch.rand(3), random.random(), np.random.rand())
    restore_target = PerspectiveModel(ckpt.cfg)
    restore(ckpt, restore_target)
    # Restoring rewinds every generator to the save point, so the draws repeat.
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_corrupt_file(trained):
    _, _, _, path, _ = trained
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # flip one bit of tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(path.with_name("missing.safetensors"))


def test_wrong_shapes(trained, tmp_path):
    _, _, _, path, _ = trained
    ckpt = load_checkpoint(path)
    other = PerspectiveModel(
        load_config("tiny", overrides=["model.d_model=32", "model.pdr_rank=8"])
    )
    with pytest.raises(CheckpointError, match="shape mismatches"):
        check_compatible(ckpt, other)
    moe = PerspectiveModel(ckpt.cfg, moe=True)
    with pytest.raises(CheckpointError, match="missing"):
        restore(ckpt, moe)
