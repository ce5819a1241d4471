"""Config validation: every mistake is refused with a message naming the file and field, before building."""

import pytest

from megamobi.config_io import ConfigError, apply_overrides
from megamobi.model_config import load_model_config

GOOD = """name: t
hidden_size: 64
num_layers: 2
num_attention_heads: 4
intermediate_size: 128
"""


def load(tmp_path, text):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return load_model_config(path)


def test_good_config_and_defaults(tmp_path):
    config = load(tmp_path, GOOD)
    assert (config.vocab_size, config.rope_theta, config.rms_norm_eps, config.ffn_sharing) == (32000, 10000.0, 1e-5, "shared")
    assert config.kv_heads == 4 and config.head_dim == 16


@pytest.mark.parametrize("extra, message", [
    ("hidden_size: 66\n", "hidden_size 66 is not divisible by num_attention_heads 4"),
    ("num_layers: -2\n", "num_layers must be a positive integer, got -2"),
    ("hiden_size: 64\n", "unknown key(s) 'hiden_size'"),
    ("ffn_sharing: some\n", "'some' is not one of 'shared', 'per_layer'"),
    ("num_key_value_heads: 3\n", "num_key_value_heads 3 must be positive and divide num_attention_heads 4"),
    ("hidden_size: 64.5\n", "hidden_size: expected an integer, got 64.5"),
    ("rope_theta: fast\n", "rope_theta: expected a number, got 'fast'"),
])
def test_bad_config_names_file_and_field(tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, GOOD + extra)
    assert message in str(err.value)
    assert str(tmp_path / "model.yaml") in str(err.value)


def test_missing_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'intermediate_size'"):
        load(tmp_path, GOOD.replace("intermediate_size: 128\n", ""))
    with pytest.raises(ConfigError, match="config file not found"):
        load_model_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(tmp_path, "name: [unclosed\n")


def test_overrides_parse_values_as_yaml():
    data = {"model": "tiny", "optimizer": {"lr": 1.0}}
    apply_overrides(data, ["optimizer.lr=3.0e-4", "train.steps=10", "data.paths=[a, b]"], where="cli")
    assert data == {"model": "tiny", "optimizer": {"lr": 3e-4}, "train": {"steps": 10}, "data": {"paths": ["a", "b"]}}
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["lr"], where="cli")
