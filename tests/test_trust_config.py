"""Config values that used to fail with a raw traceback or pass silently (issue 19): each is a ConfigError naming
the key, or a warning before training. In-process: composes the Hydra config, trains nothing."""

import pytest
from test_training import compose_config

from dsv4.config import ConfigError, ModelConfig
from dsv4.run_config import resolve_config
from dsv4.training.config import config_warnings


def _run(*overrides: str):
    return resolve_config(compose_config(*overrides))


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        _run(*overrides)
    return str(e.value)


def test_compress_ratios_that_are_not_integers_name_the_key():
    assert _error("model.compress_ratios=[a,b,c,d]").startswith("model.compress_ratios[0]='a': must be an integer")
    assert "model.compress_ratios[1]=4.5: must be an integer" in _error("model.compress_ratios=[0,4.5,32,4]")
    assert _error("model.compress_ratios=[a,b,c,d]", "attention=v4_flash").startswith("model.compress_ratios[0]")


@pytest.mark.parametrize("key, value", [("index_topk", "1.5"), ("hidden_size", "true"), ("num_hidden_layers", "x"),
                                        ("rope_scaling.original_max_position_embeddings", "2.5")])
def test_integer_model_keys_refuse_fractions_bools_and_strings(key, value):
    assert _error(f"model.{key}={value}").startswith(f"model.{key}=")
    assert "must be an integer" in _error(f"model.{key}={value}")


def test_integral_floats_are_accepted_as_integers():
    assert _run("model.index_topk=8.0").model.index_topk == 8
    assert type(_run("model.index_topk=8.0").model.index_topk) is int
    with pytest.raises(ConfigError, match="rms_norm_eps='x': must be a number"):
        ModelConfig(rms_norm_eps="x")


def test_negative_seeds_name_the_key():
    assert _error("train.seed=-1").startswith("train.seed=-1: must be >= 0")
    assert _error("data.seed=-3").startswith("data.seed=-3: must be >= 0")


def test_index_topk_above_the_compressed_entries_warns():
    warnings = config_warnings(_run("model.index_topk=100000"))
    assert any("model.index_topk=100000 > 128" in w and "train.seq_len=512" in w for w in warnings)


def test_kv_heads_without_a_dense_layer_warn():
    warnings = config_warnings(_run("model.num_key_value_heads=2"))
    assert any("model.num_key_value_heads=2 has no effect" in w for w in warnings)
    assert config_warnings(_run("model.num_key_value_heads=2", "attention=dense")) == []


def test_compression_ratio_above_seq_len_warns_naming_the_layer():
    warnings = config_warnings(_run("train.seq_len=96", "model.compress_ratios=[0,4,128,4]"))
    assert any("layer 2 (HCA) has compression ratio 128 > train.seq_len=96" in w for w in warnings)


def test_huge_learning_rate_warns():
    assert any("train.lr=10 > 0.1" in w for w in config_warnings(_run("train.lr=10")))
    assert not any("train.lr" in w for w in config_warnings(_run("train.lr=0.01")))
