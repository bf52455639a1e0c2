"""Tests of the Perspective model: shapes, counts, PDR forms, caches, MoE modes, stage 2."""

from __future__ import annotations

import pytest
import torch

from coordinator.central.generate import generate
from coordinator.plan.params import count_params
from shared_model.config_loading import load_config
from shared_model.model import (
    InferenceCache,
    ModelError,
    PerspectiveModel,
    expert_param_names,
    init_experts_from_dense,
    is_expert_param,
)
from shared_model.pdr import PDR, pdr_chunked, pdr_recurrent
from shared_model.ternary import dequantize, export_ternary

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


def _idx(cfg, b=2, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (b, t), generator=g)


def test_shapes_dense_moe_column(cfg):
    idx = _idx(cfg)
    for moe in (False, True):
        torch.manual_seed(0)
        model = PerspectiveModel(cfg, moe=moe)
        out = model(idx, targets=idx)
        assert out.logits.shape == (2, 40, cfg.model.vocab_size)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        if moe:
            n_moe, e = cfg.model.n_pdr_layers, cfg.moe.n_experts
            assert out.aux["prob_mean"].shape == (n_moe, e)
            assert out.aux["token_fraction"].shape == (n_moe, e)
            assert torch.allclose(out.aux["token_fraction"].sum(1), torch.ones(n_moe))
            assert out.aux["balance_loss"] >= 1.0 - 1e-5
            col = model(idx, columns=torch.tensor([3, 5]))
            assert col.logits.shape == out.logits.shape and col.aux == {}
        else:
            assert out.aux == {}
            with pytest.raises(ModelError, match="MoE"):
                model(idx, columns=torch.tensor([0, 1]))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_param_count_matches_plan(preset):
    cfg = load_config(preset)
    counts = count_params(cfg)
    dense = PerspectiveModel(cfg, moe=False)
    assert dense.num_parameters() == counts.dense_total == counts.shared
    if preset == "tiny":  # the small MoE model is 50M params; the formula is the same code
        moe = PerspectiveModel(cfg, moe=True)
        assert moe.num_parameters() == counts.moe_total
        assert moe.num_parameters("experts") == counts.experts_total
        assert moe.num_parameters("shared") == counts.shared + counts.routers
    # the fixed PDR projections are buffers, never parameters or state
    assert not any("proj_" in k for k in dense.state_dict())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_pdr_chunked_equals_recurrent(cfg, dtype, tol):
    torch.manual_seed(0)
    layer = PDR(cfg.model, 0).to(dtype)
    with torch.no_grad():  # include fast decays, down to the clamp
        layer.decay_logit.uniform_(-4.0, 7.0)
    x = torch.randn(2, 77, cfg.model.d_model, dtype=dtype)
    q, k, v, _ = layer.features(x)
    a = layer.log_decay()
    y_par, s_par = pdr_chunked(q, k, v, a, chunk=16)
    y_rec, s_rec = pdr_recurrent(q, k, v, a)
    scale = y_rec.abs().max()
    assert (y_par - y_rec).abs().max() / scale < tol
    assert (s_par - s_rec).abs().max() / s_rec.abs().max() < tol
    # whole layer: chunked prefill then one-token steps == one chunked pass
    full, _ = layer(x)
    part, state = layer(x[:, :50])
    steps = [part]
    for t in range(50, 77):
        y, state = layer(x[:, t : t + 1], state)
        steps.append(y)
    assert (torch.cat(steps, 1) - full).abs().max() / full.abs().max() < tol


def test_attention_window_is_exact(cfg):
    from shared_model.attention import WindowedGQA

    torch.manual_seed(6)
    attn = WindowedGQA(cfg.model)
    w, t = cfg.model.window, 100
    x = torch.randn(1, t, cfg.model.d_model)
    pos = torch.arange(t)
    base, _ = attn(x, pos)
    far, near = x.clone(), x.clone()
    far[0, t - 1 - w] += 1.0  # just outside the last query's window
    near[0, t - w] += 1.0  # the oldest key the last query still sees
    assert torch.allclose(attn(far, pos)[0][0, -1], base[0, -1], atol=1e-6)
    assert not torch.allclose(attn(near, pos)[0][0, -1], base[0, -1], atol=1e-4)
    # causal: earlier outputs do not see the change at t - w
    assert torch.allclose(attn(near, pos)[0][0, : t - w], base[0, : t - w], atol=1e-6)


def test_pdr_projections_seeded_per_layer(cfg):
    a, b, c = PDR(cfg.model, 0), PDR(cfg.model, 0), PDR(cfg.model, 1)
    assert torch.equal(a.proj_q, b.proj_q) and not torch.equal(a.proj_q, c.proj_q)


def _cached_logits(model, idx, prompt_len, columns=None):
    cache = InferenceCache()
    outs = [model(idx[:, :prompt_len], columns=columns, cache=cache).logits]
    for t in range(prompt_len, idx.shape[1]):
        outs.append(model(idx[:, t : t + 1], columns=columns, cache=cache).logits)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("moe", [False, True])
def test_generation_cache_equals_full_forward(moe):
    # window 16 < sequence 90 so the KV cache must drop old entries correctly
    cfg = load_config("tiny", overrides=["model.window=16"])
    torch.manual_seed(1)
    model = PerspectiveModel(cfg, moe=moe).eval()
    idx = _idx(cfg, t=90)
    full = model(idx).logits
    assert (_cached_logits(model, idx, 37) - full).abs().max() < 1e-4
    prompt = idx[:, :5]
    with_cache = generate(model, prompt, 30, temperature=0.0, cache=True)
    without = generate(model, prompt, 30, temperature=0.0, cache=False)
    assert torch.equal(with_cache, without)
    cache = InferenceCache()
    model(idx, cache=cache)
    kv = cache.layers[cfg.model.gqa_layers()[0]]
    assert kv.k.shape[2] == 16  # at most `window` entries kept


def test_stage2_init_identical_experts(cfg):
    torch.manual_seed(2)
    dense = PerspectiveModel(cfg)
    moe = PerspectiveModel(cfg, moe=True)
    init_experts_from_dense(dense, moe)
    for i in cfg.model.pdr_layers():
        bank = dense.ffn_for(i)
        for expert in moe.layers[i].ffn.experts.values():
            for w in ("w1", "w2", "w3"):
                assert torch.equal(getattr(expert, w).weight, getattr(bank, w).weight)
    idx = _idx(cfg)
    ref = dense(idx).logits
    for column in (0, 5):
        out = moe(idx, columns=torch.full((2,), column))
        assert torch.allclose(out.logits, ref, atol=1e-6)
    # Token-level routing too: the gate is 1 in value, so cloned experts change nothing.
    assert torch.allclose(moe(idx).logits, ref, atol=1e-5)
    noisy = dense.to_moe(noise_std=0.01)
    w_noisy = noisy.layers[0].ffn.experts["0"].w1.weight
    assert not torch.equal(w_noisy, dense.ffn_for(0).w1.weight)
    assert (w_noisy - dense.ffn_for(0).w1.weight).std().item() == pytest.approx(0.01, rel=0.1)


def test_column_mode_ignores_other_experts(cfg):
    torch.manual_seed(3)
    full = PerspectiveModel(cfg, moe=True)
    idx = _idx(cfg)
    columns = torch.tensor([2, 6])
    ref = full(idx, columns=columns).logits
    # a participant's model holding only columns 2 and 6, loaded from the full one
    part = PerspectiveModel(cfg, moe=True, columns=[2, 6])
    part.load_state_dict(full.shared_state(), strict=False)
    for c in (2, 6):
        part.load_expert_state(c, full.expert_state(c))
    assert torch.allclose(part(idx, columns=columns).logits, ref, atol=1e-6)
    # equal to running each sequence alone through its expert (router forced to c, gate 1)
    single = torch.cat([full(idx[b : b + 1], columns=columns[b : b + 1]).logits for b in (0, 1)])
    assert torch.allclose(single, ref, atol=1e-5)
    with pytest.raises(ModelError, match="not held"):
        part(idx, columns=torch.tensor([2, 3]))
    with pytest.raises(ModelError, match="not held"):
        part(idx)  # token-level routing needs every expert
    with pytest.raises(ModelError, match="columns values"):
        full(idx, columns=torch.tensor([0, 8]))


def test_expert_names_and_state(cfg):
    model = PerspectiveModel(cfg, moe=True)
    names = expert_param_names(cfg, 4)
    assert names[0] == "layers.0.ffn.experts.4.w1.weight" and len(names) == 3 * 3
    assert is_expert_param("layers.2.ffn.experts.7.w2.weight") == (True, 7)
    assert is_expert_param("layers.2.ffn.router.weight") == (False, None)
    shared = model.shared_state()
    assert "layers.0.ffn.router.weight" in shared
    assert not any(is_expert_param(k)[0] for k in shared)
    expert_total = sum(len(model.expert_state(c)) for c in range(cfg.moe.n_experts))
    assert len(shared) + expert_total == len(model.state_dict())
    state = {k: torch.zeros_like(v) for k, v in model.expert_state(1).items()}
    model.load_expert_state(1, state)
    assert all((v == 0).all() for v in model.expert_state(1).values())
    bad = dict(state)
    bad.pop(names[0].replace(".4.", ".1."))
    with pytest.raises(ModelError, match="missing"):
        model.load_expert_state(1, bad)


def test_a_model_built_from_weights_is_the_model_they_came_from_with_no_random_draw(cfg):
    torch.manual_seed(3)
    source = PerspectiveModel(cfg, moe=True).eval()
    columns = {c: source.expert_state(c) for c in (1, 5)}
    rng = torch.get_rng_state()
    built = PerspectiveModel.from_weights(cfg, source.shared_state(), columns).eval()
    assert torch.equal(torch.get_rng_state(), rng)  # nothing initialised only to be overwritten
    expected = set(source.shared_state()) | {k for state in columns.values() for k in state}
    assert set(built.state_dict()) == expected
    own = dict(source.named_buffers())  # PDR's fixed projections, not weights: redrawn
    assert all(torch.equal(b, own[n]) for n, b in built.named_buffers())
    idx, cols = _idx(cfg), torch.tensor([5, 1])
    assert torch.equal(built(idx, columns=cols).logits, source(idx, columns=cols).logits)
    # all the columns: the full model, as PerspectiveModel(cfg, moe=True) builds it
    every = {c: source.expert_state(c) for c in range(cfg.moe.n_experts)}
    full = PerspectiveModel.from_weights(cfg, source.shared_state(), every).eval()
    assert full.state_dict().keys() == source.state_dict().keys()
    assert torch.equal(full(idx).logits, source(idx).logits)
    # in bf16 (stage 4's teacher): each weight rounded once, as .to(bfloat16) rounds it
    half = PerspectiveModel.from_weights(cfg, source.shared_state(), columns, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    rounded = {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    assert all(torch.equal(v, rounded[k]) for k, v in half.state_dict().items())
    shared = source.shared_state()
    shared.pop("layers.0.ffn.router.weight")
    with pytest.raises(ModelError, match="missing .*layers.0.ffn.router.weight"):
        PerspectiveModel.from_weights(cfg, shared, columns)


def test_ternary_fraction_affects_experts_only(cfg):
    torch.manual_seed(4)
    model = PerspectiveModel(cfg, moe=True)
    idx = _idx(cfg)
    fp = model(idx).logits
    model.set_ternary_fraction(1.0)
    tern = model(idx, targets=idx)
    assert not torch.allclose(tern.logits, fp)
    tern.loss.backward()
    assert model.layers[0].ffn.experts["0"].w1.weight.grad is not None
    model.set_ternary_fraction(None)
    assert torch.allclose(model(idx).logits, fp)
    with pytest.raises(ModelError):
        model.set_ternary_fraction(1.5)
    # Experts only: once every expert weight is already ternary (quantising is then the
    # identity), fraction 1 changes nothing, although no shared weight is ternary.
    with torch.no_grad():
        for name, (trits, scale) in export_ternary(model).items():
            model.get_parameter(name).copy_(dequantize(trits, scale))
    model.set_ternary_fraction(None)
    fp_ternary_experts = model(idx).logits
    model.set_ternary_fraction(1.0)
    assert torch.allclose(model(idx).logits, fp_ternary_experts, atol=1e-6)
    shared = [p for n, p in model.named_parameters() if not is_expert_param(n)[0] and p.dim() == 2]
    assert shared and all(p.unique().numel() > 3 for p in shared)


def test_bad_inputs(cfg):
    model = PerspectiveModel(cfg)
    with pytest.raises(ModelError, match="token ids"):
        model(torch.tensor([[0, cfg.model.vocab_size]]))
    with pytest.raises(ModelError, match="integer"):
        model(torch.zeros(2, 3))


def test_tiny_model_overfits_one_batch(cfg):
    torch.manual_seed(5)
    model = PerspectiveModel(cfg, moe=True)
    idx = _idx(cfg, b=4, t=33, seed=5)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(x, targets=y)
        loss = out.loss + 0.01 * out.aux["balance_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert out.loss.item() < 0.5


def test_generate_cli(tmp_path, cfg):
    from typer.testing import CliRunner

    from coordinator.central.checkpoint import save_checkpoint
    from shared_model.cli import build_app
    from shared_model.tokenizer import train_tokenizer

    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(400)]
    tok = train_tokenizer(texts, cfg.model.vocab_size)
    tok.save(str(tmp_path / "tokenizer.json"))
    model = PerspectiveModel(cfg, moe=True)
    save_checkpoint(tmp_path / "m.safetensors", model, cfg, stage=3, step=0)
    app = build_app(["generate"])
    args = ["generate", "--checkpoint", str(tmp_path / "m.safetensors"), "--prompt", "def f("]
    args += ["--tokenizer", str(tmp_path / "tokenizer.json"), "--max-new-tokens", "5"]
    result = CliRunner().invoke(app, [*args, "--column", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def f(")
    bad = CliRunner().invoke(app, [*args, "--column", "99"])
    assert bad.exit_code == 2 and "columns" in bad.output
