"""to-hf: stock transformers.LlamaForCausalLM loads the export and computes the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import CONFIG_KINDS, VOCAB, build_model, random_tokens, save_checkpoint, small_config
from safetensors import safe_open

from megamobi.checkpointing.manifest import write_manifest
from megamobi.checkpointing.model_files import TensorShard, shard_file_name, write_model_shard
from megamobi.convert import ConversionError, export_hf
from megamobi.convert.to_hf import parse_size

transformers = pytest.importorskip("transformers")


def read_hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(hf_dir / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(index["weight_map"])
    return out


def load_hf(hf_dir):
    model, info = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("kind", CONFIG_KINDS)
def test_logits_match_stock_llama(kind, checkpoints, tmp_path):
    ckpt, model = checkpoints[kind]
    config_json = export_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False)
    hf, info = load_hf(tmp_path / "hf")
    # inv_freq keys are dropped silently by transformers; nothing may be missing or left over.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert config_json["num_key_value_heads"] == model.config.kv_heads
    assert hf.config.num_key_value_heads == model.config.kv_heads
    tokens = random_tokens(VOCAB)
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)).abs().max().item()
    assert diff < 1e-4, diff


def test_layout_and_config_match_released_checkpoints(checkpoints, tmp_path):
    ckpt, model = checkpoints["shared"]
    export_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False)
    tensors = read_hf_tensors(tmp_path / "hf")
    n = model.config.num_layers
    assert len(tensors) == 10 * n + 3  # 223 for the released 22-layer models
    sd = model.state_dict()
    for i in range(n):
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(tensors[f"model.layers.{i}.mlp.{p}.weight"], sd[f"mlps.0.{p}.weight"])
        inv_freq = tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"]
        assert inv_freq.dtype == torch.float32 and inv_freq.shape == (model.config.head_dim // 2,)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(tensors)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_act"] == "silu" and cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (1, 2, VOCAB)
    assert cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5 and cfg["max_position_embeddings"] == 64
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_no_inv_freq_and_small_shards(checkpoints, tmp_path):
    ckpt, _model = checkpoints["shared"]
    export_hf(ckpt, tmp_path / "hf", dtype="fp32", max_shard_size="100KB", include_inv_freq=False, progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not any("inv_freq" in k for k in index["weight_map"])
    tensors = read_hf_tensors(tmp_path / "hf")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    _hf, info = load_hf(tmp_path / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_bf16_export(checkpoints, tmp_path):
    ckpt, model = checkpoints["gqa"]
    export_hf(ckpt, tmp_path / "hf", dtype="bf16", progress=False)
    tensors = read_hf_tensors(tmp_path / "hf")
    for key, t in tensors.items():
        assert t.dtype == (torch.float32 if key.endswith("inv_freq") else torch.bfloat16), key
    assert torch.equal(tensors["lm_head.weight"], model.state_dict()["lm_head.weight"].to(torch.bfloat16))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"


def test_tokenizer_loads_in_transformers(checkpoints, sp_model_path, tmp_path):
    import sentencepiece as spm

    # transformers builds the fast tokenizer from tokenizer.model with sentencepiece's protobuf schema.
    pytest.importorskip("google.protobuf")

    ckpt, _ = checkpoints["shared"]
    export_hf(ckpt, tmp_path / "hf", dtype="fp32", tokenizer=sp_model_path, progress=False)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == sp_model_path.read_bytes()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    text = "the lazy fox said 42 things to Mr. Smith"
    assert tokenizer(text).input_ids == [1] + sp.encode(text)
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_broken_checkpoint_refused(checkpoints, tmp_path):
    model = checkpoints["shared"][1]
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    weights = next((ckpt / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="broken or incomplete checkpoint.*sha256"):
        export_hf(ckpt, tmp_path / "hf", progress=False)
    (ckpt / "megamobi.json").unlink()
    with pytest.raises(ConversionError, match="no megamobi.json"):
        export_hf(ckpt, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_non_empty_output_refused(checkpoints, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not empty"):
        export_hf(checkpoints["shared"][0], tmp_path / "hf", progress=False)
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5MiB") == 1572864 and parse_size("1000") == 1000
    with pytest.raises(ConversionError):
        parse_size("two gigs")


def _split(t: torch.Tensor, dim: int, parts: int) -> list[torch.Tensor]:
    """Equal TP pieces along `dim`, zero-padding the tail first (as a padded vocabulary is)."""
    pad = -t.shape[dim] % parts
    if pad:
        t = torch.cat([t, t.new_zeros(*t.shape[:dim], pad, *t.shape[dim + 1:])], dim=dim)
    return list(t.chunk(parts, dim=dim))


def test_tensor_parallel_checkpoint_converts_like_unsharded(tmp_path):
    # Odd vocab: TP=2 pads it by one row, which the merge must trim. Layers split over two pipeline files.
    config = small_config("per_layer", vocab_size=VOCAB + 1)
    model = build_model(config, seed=5)
    sd = model.state_dict()
    split_dims = {"embed_tokens": 0, "lm_head": 0, "q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0,
                  "up_proj": 0, "o_proj": 1, "down_proj": 1}
    sharded = tmp_path / "tp2"
    for rank in range(2):
        for stage in range(2):
            tensors, shards = {}, {}
            for key, t in sd.items():
                layer = int(key.split(".")[1]) if key.startswith(("layers.", "mlps.")) else None
                in_stage = (layer is not None and (layer < 2) == (stage == 0)) or \
                    (layer is None and (key.startswith("embed") if stage == 0 else not key.startswith("embed")))
                dim = split_dims.get(key.rsplit(".", 2)[-2] if key.count(".") >= 2 else key.split(".")[0])
                if not in_stage or (dim is None and rank != 0):
                    continue  # replicated tensors (norms) are written by tensor rank 0 only
                if dim is None:
                    tensors[key] = t
                else:
                    tensors[key] = _split(t, dim, 2)[rank].clone()
                    shards[key] = TensorShard(split_dim=dim, tensor_rank=rank, tensor_size=2, full_size=t.shape[dim])
            write_model_shard(sharded / "model" / shard_file_name(tensor_rank=rank, pipeline_rank=stage),
                              tensors=tensors, shards=shards)
    write_manifest(sharded, model_config=config, info={"step": 1})
    whole = save_checkpoint(tmp_path / "whole", model)

    export_hf(sharded, tmp_path / "hf_tp", dtype="fp32", progress=False)
    export_hf(whole, tmp_path / "hf_whole", dtype="fp32", progress=False)
    a, b = read_hf_tensors(tmp_path / "hf_tp"), read_hf_tensors(tmp_path / "hf_whole")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["model.embed_tokens.weight"].shape[0] == VOCAB + 1
    assert json.loads((tmp_path / "hf_tp" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf_whole" / "config.json").read_text())
