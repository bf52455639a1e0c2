"""Path 9.1: converting a tiny random Mixtral (built locally, no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from coordinator.central.convert import run_convert  # noqa: E402
from coordinator.central.convert_map import (  # noqa: E402
    ConvertError,
    config_from_mixtral,
    grow_experts,
    map_weights,
    mixtral_experts,
    with_experts,
)
from coordinator.central.evaluation.loading import load_model  # noqa: E402
from shared_model.data import prepare_corpus  # noqa: E402
from shared_model.model import PerspectiveModel  # noqa: E402
from shared_model.ternary import ternary_round  # noqa: E402

torch.set_num_threads(1)


def tiny_mixtral(experts: int = 4):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_corpus("stdlib", 512, tmp_path_factory.mktemp("data"), max_bytes=600_000)


def test_config_respects_our_layout():
    hf = tiny_mixtral()
    cfg = config_from_mixtral(hf.config, n_experts=16)
    assert cfg.model.n_layers == 4 and cfg.model.gqa_layers() == [3]
    assert cfg.moe.n_experts == 16 and cfg.model.ffn_hidden == 96
    with pytest.raises(ConvertError, match="power of two"):
        config_from_mixtral(hf.config, n_experts=12)


def test_mapped_attention_and_experts_match_the_source():
    hf = tiny_mixtral()
    cfg = config_from_mixtral(hf.config)
    student = PerspectiveModel(cfg, moe=True).eval()
    map_weights(hf, student)
    x = torch.randn(2, 10, 64)
    # kept attention layer: identical output (same RoPE convention, full causal window)
    i = cfg.model.gqa_layers()[0]
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    pos = torch.arange(10)[None].expand(2, -1)
    cos_sin = MixtralRotaryEmbedding(hf.config)(x, pos)
    mask = torch.full((10, 10), float("-inf")).triu(1)[None, None]
    theirs = hf.model.layers[i].self_attn(
        hidden_states=x, position_embeddings=cos_sin, attention_mask=mask
    )[0]
    ours, _ = student.layers[i].mixer(x, torch.arange(10))
    assert torch.allclose(ours, theirs, atol=1e-5)
    # expert e of a PDR layer computes what the source's expert e computes
    w1, w2, w3 = mixtral_experts(hf.model.layers[0])[2]
    want = torch.nn.functional.linear(torch.nn.functional.silu(x @ w1.T) * (x @ w3.T), w2)
    assert torch.allclose(student.layers[0].ffn.expert(2)(x), want, atol=1e-5)


def test_grow_doubles_experts_with_clones():
    hf = tiny_mixtral()
    cfg = config_from_mixtral(hf.config, n_experts=8)
    small = PerspectiveModel(with_experts(cfg, 4), moe=True)
    big = grow_experts(small, cfg, 0.01, torch.Generator().manual_seed(0))
    a = small.layers[0].ffn.expert(1).w1.weight.detach()
    b = big.layers[0].ffn.expert(5).w1.weight.detach()
    assert torch.equal(big.layers[0].ffn.expert(1).w1.weight, a)
    assert 0 < float((a - b).abs().max()) < 0.1 * float(a.abs().max())
    assert big.layers[0].ffn.router.weight.shape[0] == 8


@pytest.mark.slow
def test_tiny_mixtral_converts_end_to_end(corpus, tmp_path):
    hf = tiny_mixtral()
    res = run_convert(
        hf,
        tmp_path,
        data=corpus,
        n_experts=8,
        seq_len=32,
        batch_size=2,
        distill_batches=2,
        distill_steps=20,
        kd_steps=2,
        ppl_batches=2,
    )
    names = [s["step"] for s in res["steps"]]
    assert names == ["map+pdr", "grow8", "ternary25", "ternary50", "ternary75", "ternary100"]
    assert res["teacher_ppl"] > 1
    for s in res["steps"]:
        assert s["ppl_ratio"] == pytest.approx(s["ppl"] / res["teacher_ppl"])
        assert torch.isfinite(torch.tensor(s["ppl"]))
    assert set(res["steps"][0]["regression_r2"]) == {"pdr0_r2", "pdr1_r2", "pdr2_r2", "ffn3_r2"}
    model, ckpt = load_model(res["checkpoint"])
    assert ckpt.stage == 4 and ckpt.cfg.moe.n_experts == 8
    w = model.layers[0].ffn.expert(7).w2.weight
    trits, scale = ternary_round(w)
    assert torch.allclose(trits.float() * scale, w, atol=1e-6)  # experts stored ternary
    assert (tmp_path / "convert.json").exists()


def test_missing_source_is_reported(corpus, tmp_path):
    with pytest.raises(ConvertError, match="not a directory"):
        run_convert(tmp_path / "nope", tmp_path / "o", data=corpus)


def test_convert_cli_refuses_a_bad_setting_before_loading_the_source(tmp_path):
    """``perspective convert`` checks its settings first: a negative step count is named,
    with exit code 2, before the (possibly large) source is read, and nothing is written."""
    from typer.testing import CliRunner

    from shared_model.cli import build_app

    app = build_app(["convert"])
    args = ["convert", "--from", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]
    bad = CliRunner().invoke(app, [*args, "--kd-steps", "-1"])
    assert bad.exit_code == 2 and "kd_steps = -1: must be 0 or more" in bad.output
    missing = CliRunner().invoke(app, args)  # valid settings: now the source is read
    assert missing.exit_code == 2 and "not a directory" in missing.output
    assert not (tmp_path / "o").exists()
