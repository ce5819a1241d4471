"""to-gguf: the file reads back with gguf.GGUFReader, holds llama.cpp's names, shapes and metadata, and a
forward pass written the way llama.cpp computes the llama architecture (pairwise RoPE) matches megamobi."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from convert_helpers import CONFIG_KINDS, VOCAB, random_tokens

from megamobi.convert import ConversionError, export_gguf
from megamobi.convert.to_gguf import interleaved_to_rotate_half, rotate_half_to_interleaved

gguf = pytest.importorskip("gguf")


def read_gguf(path) -> tuple[dict, dict[str, tuple[int, np.ndarray]]]:
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        # GGUF lists dimensions innermost first; numpy data comes back in [out, in] order.
        assert tuple(int(x) for x in reversed(t.shape)) == t.data.shape
        tensors[t.name] = (int(t.tensor_type), np.array(t.data))
    return fields, tensors


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope_pairwise(x: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotates adjacent pairs (x[2i], x[2i+1]). x: [b, t, heads, d]."""
    d, t = x.shape[-1], x.shape[1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.outer(torch.arange(t, dtype=torch.float64), freqs)[None, :, None, :]
    cos, sin = angle.cos().float(), angle.sin().float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def gguf_forward(fields: dict, tensors: dict, tokens: torch.Tensor) -> torch.Tensor:
    w = {name: torch.from_numpy(data.astype(np.float32)) for name, (_, data) in tensors.items()}
    heads, kv = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    eps, theta = fields["llama.attention.layer_norm_rms_epsilon"], fields["llama.rope.freq_base"]
    b, t = tokens.shape
    x = w["token_embd.weight"][tokens]
    for i in range(fields["llama.block_count"]):
        h = rms_norm(x, w[f"blk.{i}.attn_norm.weight"], eps)
        q = (h @ w[f"blk.{i}.attn_q.weight"].T).view(b, t, heads, -1)
        k = (h @ w[f"blk.{i}.attn_k.weight"].T).view(b, t, kv, -1)
        v = (h @ w[f"blk.{i}.attn_v.weight"].T).view(b, t, kv, -1)
        q, k = rope_pairwise(q, theta).transpose(1, 2), rope_pairwise(k, theta).transpose(1, 2)
        k, v = k.repeat_interleave(heads // kv, dim=1), v.transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attn.transpose(1, 2).reshape(b, t, -1) @ w[f"blk.{i}.attn_output.weight"].T
        h = rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], eps)
        gate, up = h @ w[f"blk.{i}.ffn_gate.weight"].T, h @ w[f"blk.{i}.ffn_up.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[f"blk.{i}.ffn_down.weight"].T
    return rms_norm(x, w["output_norm.weight"], eps) @ w["output.weight"].T


@pytest.mark.parametrize("kind", CONFIG_KINDS)
def test_gguf_contents_and_llama_cpp_style_forward(kind, checkpoints, tmp_path):
    ckpt, model = checkpoints[kind]
    config, sd = model.config, model.state_dict()
    export_gguf(ckpt, tmp_path / "m.gguf", dtype="f32", progress=False)
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "llama"
    expected_meta = {
        "llama.context_length": config.max_seq_len, "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_layers, "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads, "llama.attention.head_count_kv": config.kv_heads,
        "llama.rope.dimension_count": config.head_dim, "llama.vocab_size": VOCAB,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32), "tokenizer.ggml.model": "no_vocab",
    }
    assert {k: fields[k] for k in expected_meta} == expected_meta
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)

    kv_dim, d, f = config.kv_heads * config.head_dim, config.hidden_size, config.intermediate_size
    shapes = {"token_embd.weight": (VOCAB, d), "output.weight": (VOCAB, d), "output_norm.weight": (d,)}
    for i in range(config.num_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv_dim, d),
                       f"blk.{i}.attn_v.weight": (kv_dim, d), f"blk.{i}.attn_output.weight": (d, d),
                       f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d), f"blk.{i}.ffn_down.weight": (d, f)})
    assert {name: data.shape for name, (_, data) in tensors.items()} == shapes

    for i in range(config.num_layers):
        j = 0 if config.ffn_sharing == "shared" else i
        q = interleaved_to_rotate_half(torch.from_numpy(tensors[f"blk.{i}.attn_q.weight"][1]), config.num_attention_heads)
        k = interleaved_to_rotate_half(torch.from_numpy(tensors[f"blk.{i}.attn_k.weight"][1]), config.kv_heads)
        assert torch.equal(q, sd[f"layers.{i}.self_attn.q_proj.weight"])
        assert torch.equal(k, sd[f"layers.{i}.self_attn.k_proj.weight"])
        assert np.array_equal(tensors[f"blk.{i}.ffn_down.weight"][1], sd[f"mlps.{j}.down_proj.weight"].numpy())

    tokens = random_tokens(VOCAB)
    with torch.no_grad():
        diff = (gguf_forward(fields, tensors, tokens) - model(tokens)).abs().max().item()
    assert diff < 1e-4, diff


def test_permutation_round_trip_and_layout():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of dim 8
    p = rotate_half_to_interleaved(w, 2)
    # Head 0's rows: real parts 0..3 and imaginary parts 4..7 become pairs (0,4), (1,5), ...
    assert p[:8, 0].tolist() == [0.0, 12.0, 3.0, 15.0, 6.0, 18.0, 9.0, 21.0]
    assert torch.equal(interleaved_to_rotate_half(p, 2), w)


def test_f16_with_tokenizer(checkpoints, sp_model_path, tmp_path):
    import sentencepiece as spm

    ckpt, model = checkpoints["shared"]
    export_gguf(ckpt, tmp_path / "m.gguf", dtype="f16", tokenizer=sp_model_path, progress=False)
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    for name, (ggml_type, data) in tensors.items():
        expected = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else gguf.GGMLQuantizationType.F16
        assert ggml_type == expected, name
    emb = torch.from_numpy(tensors["token_embd.weight"][1].astype(np.float32))
    assert torch.allclose(emb, model.state_dict()["embed_tokens.weight"], atol=1e-3, rtol=1e-3)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    types = fields["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is True


def test_refusals(checkpoints, sp_model_path, tmp_path):
    ckpt, _ = checkpoints["shared"]
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(ConversionError, match="already exists"):
        export_gguf(ckpt, tmp_path / "m.gguf", progress=False)
    with pytest.raises(ConversionError, match="choose one of"):
        export_gguf(ckpt, tmp_path / "n.gguf", dtype="q4", progress=False)
    with pytest.raises(ConversionError, match="tokenizer file not found"):
        export_gguf(ckpt, tmp_path / "n.gguf", tokenizer=tmp_path / "missing.model", progress=False)
