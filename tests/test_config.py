"""Config presets, YAML/override loading and validation errors that name the field."""

from __future__ import annotations

import pytest

from shared_model.config import PRESETS, ConfigError
from shared_model.config_loading import config_from_dict, load_config, parse_overrides, save_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_have_the_layout(name):
    cfg = load_config(name)
    m = cfg.model
    assert len(m.pdr_layers()) == m.n_pdr_layers and len(m.gqa_layers()) == m.n_gqa_layers
    assert all(m.ffn_bank(i) < m.n_gqa_layers for i in range(m.n_layers))


def test_full_preset_is_the_seed_model():
    m = load_config("full").model
    assert (m.d_model, m.n_pdr_layers, m.n_gqa_layers, m.vocab_size) == (4096, 60, 20, 32768)
    assert (m.n_heads, m.n_kv_heads, m.ffn_hidden, m.pdr_rank) == (32, 8, 11008, 256)


@pytest.mark.parametrize(
    ("override", "field", "allowed"),
    [
        ("model.n_kv_heads=3", "model.n_kv_heads", "divisor of model.n_heads"),
        ("optim.lr=-0.001", "optim.lr", ">= 0"),
        ("optim.expert_lr_scale=0", "optim.expert_lr_scale", "0 < value <= 10"),
        ("optim.expert_lr_scale=inf", "optim.expert_lr_scale", "0 < value <= 10"),
        ("model.window=1000", "model.window", "model.max_seq_len"),
        ("train.seq_len=4096", "train.seq_len", "model.max_seq_len"),
        ("moe.top_k=99", "moe.top_k", "moe.n_experts"),
        ("ternary.schedule=[0.5, 0.25, 1.0]", "ternary.schedule", "increasing"),
        ("train.batch_size=0", "train.batch_size", "integer >= 1"),
        ("model.d_model=abc", "model.d_model", "type int"),
        ("model.no_such_field=1", "model.no_such_field", "allowed"),
    ],
)
def test_bad_values_name_the_field_and_range(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert field in str(err.value) and allowed in str(err.value)


def test_unknown_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["model.d_model"])


def test_yaml_file_with_its_own_preset_and_overrides_on_top(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: small\ntrain:\n  batch_size: 2\n")
    cfg = load_config("tiny", path, overrides=["train.steps=7"])
    assert cfg.name == "small" and cfg.train.batch_size == 2 and cfg.train.steps == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [1, 2", "not valid YAML"),
        ("- 1\n- 2\n", "mapping at top level"),
        ("model: 3", "mapping"),
    ],
)
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("tiny", tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config("small", overrides=["optim.lr=0.001", "ternary.schedule=[0.5, 1.0]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config("tiny", tmp_path / "c.yaml") == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert not (tmp_path / "c.yaml.tmp").exists()
