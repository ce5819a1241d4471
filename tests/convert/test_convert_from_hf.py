"""from-hf: round trips exactly, detects the shared FFN, and handles the released checkpoints' quirks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from convert_helpers import CONFIG_KINDS, VOCAB, random_tokens
from safetensors.torch import load_file, save_file

from megamobi.checkpointing.manifest import checkpoint_model_config, read_manifest, verify_checkpoint
from megamobi.checkpointing.model_files import read_full_model
from megamobi.convert import ConversionError, export_hf, import_hf
from megamobi.model import MobiLlama


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", CONFIG_KINDS)
def test_round_trip_is_exact(kind, checkpoints, tmp_path):
    ckpt, model = checkpoints[kind]
    export_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False)
    config = import_hf(tmp_path / "hf", tmp_path / "back")
    assert config == model.config == checkpoint_model_config(tmp_path / "back")
    assert verify_checkpoint(tmp_path / "back") == []
    assert_same_weights(read_full_model(tmp_path / "back"), read_full_model(ckpt))
    manifest = read_manifest(tmp_path / "back")
    assert manifest["source"] == "from-hf" and manifest["hf_model"] == str((tmp_path / "hf").resolve())
    assert (manifest["step"], manifest["consumed_samples"], manifest["consumed_tokens"]) == (0, 0, 0)


def _released_style_copy(hf_dir, out_dir, *, bin_file: bool, stated_kv: int) -> None:
    """What MBZUAI/MobiLlama-05B looks like: custom architecture name, num_key_value_heads smaller
    than the MHA weights, no megamobi hint, one weight file."""
    out_dir.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.pop("megamobi")
    cfg.update(architectures=["MobiLlamaForCausalLM"], num_key_value_heads=stated_kv,
               auto_map={"AutoModelForCausalLM": "modelling_mobillama.MobiLlamaForCausalLM"})
    (out_dir / "config.json").write_text(json.dumps(cfg))
    tensors = {}
    for f in sorted(hf_dir.glob("model-*.safetensors")):
        tensors.update(load_file(f))
    if bin_file:
        torch.save(tensors, out_dir / "pytorch_model.bin")
    else:
        save_file(tensors, str(out_dir / "model.safetensors"))


@pytest.mark.parametrize("bin_file", [True, False])
def test_released_quirks(bin_file, checkpoints, tmp_path):
    ckpt, _model = checkpoints["shared"]
    export_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False)
    _released_style_copy(tmp_path / "hf", tmp_path / "released", bin_file=bin_file, stated_kv=2)
    config = import_hf(tmp_path / "released", tmp_path / "back", name="imported")
    assert config.ffn_sharing == "shared" and config.kv_heads == 4 and config.num_key_value_heads is None
    assert config.name == "imported"
    assert_same_weights(read_full_model(tmp_path / "back"), read_full_model(ckpt))


def test_shared_requested_but_copies_differ(checkpoints, tmp_path):
    ckpt, _model = checkpoints["shared"]
    export_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False, include_inv_freq=False)
    shard = next((tmp_path / "hf").glob("model-*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.mlp\.up_proj\.weight \(layer 2\).*per_layer"):
        import_hf(tmp_path / "hf", tmp_path / "shared", ffn_sharing="shared")
    assert not (tmp_path / "shared").exists()
    # auto: the copies differ, so each layer keeps its own.
    config = import_hf(tmp_path / "hf", tmp_path / "auto")
    assert config.ffn_sharing == "per_layer"
    state = read_full_model(tmp_path / "auto")
    assert torch.equal(state["mlps.2.up_proj.weight"], tensors["model.layers.2.mlp.up_proj.weight"])


def test_auto_detects_shared_without_hint_and_per_layer_forced(checkpoints, tmp_path):
    ckpt, model = checkpoints["shared"]
    export_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("megamobi")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert import_hf(tmp_path / "hf", tmp_path / "auto").ffn_sharing == "shared"
    forced = import_hf(tmp_path / "hf", tmp_path / "forced", ffn_sharing="per_layer")
    assert forced.ffn_sharing == "per_layer" and len(read_full_model(tmp_path / "forced")) == \
        len(read_full_model(tmp_path / "auto")) + 3 * (model.config.num_layers - 1)


@pytest.mark.parametrize("tied", [False, True])
def test_stock_transformers_llama_imports_and_matches(tied, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=tied,
                                         initializer_range=0.1)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "stock")
    config = import_hf(tmp_path / "stock", tmp_path / "ckpt")
    assert (config.ffn_sharing, config.kv_heads, config.rope_theta, config.rms_norm_eps) == ("per_layer", 2, 50000.0, 1e-6)
    model = MobiLlama(config).eval()
    state = read_full_model(tmp_path / "ckpt")
    # A tied source (no lm_head.weight saved) starts megamobi's untied head from the embedding.
    assert torch.equal(state["lm_head.weight"], state["embed_tokens.weight"]) == tied
    model.load_state_dict(state)
    tokens = random_tokens(VOCAB)
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_refusals(checkpoints, tmp_path):
    ckpt, _ = checkpoints["shared"]
    export_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False)
    with pytest.raises(ConversionError, match="not an empty directory"):
        import_hf(tmp_path / "hf", tmp_path / "hf")
    with pytest.raises(ConversionError, match="model directory not found"):
        import_hf(tmp_path / "nope", tmp_path / "out")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "hf", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="RoPE scaling 'linear'"):
        import_hf(bad, tmp_path / "out")
    cfg["rope_scaling"] = None
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors.index.json").unlink()
    for f in bad.glob("model-*.safetensors"):
        f.unlink()
    with pytest.raises(ConversionError, match="no weights found"):
        import_hf(bad, tmp_path / "out")
