"""megamobi checkpoint -> one GGUF file for llama.cpp (architecture `llama`).

llama.cpp has no shared-FFN notion either, so every block gets the shared FFN (`blk.N.ffn_*`), as in
the Hugging Face export. Two layout details matter for llama.cpp to compute the same function:

- RoPE: megamobi (like HF Llama) rotates the two HALVES of each head (x[i] with x[i + d/2]);
  llama.cpp's llama architecture rotates adjacent PAIRS (x[2i] with x[2i+1]). The q and k rows of
  each head are therefore reordered from [r0..r{d/2-1}, i0..i{d/2-1}] to [r0, i0, r1, i1, ...],
  which is what llama.cpp's own HF converter does. Attention scores are unchanged because q and k
  are permuted alike, and v / o are untouched.
- Types: with f16, only matrices become f16; 1-D norm weights stay f32 (llama.cpp's MOSTLY_F16).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from megamobi.convert.checkpoint_input import load_checkpoint
from megamobi.convert.errors import ConversionError
from megamobi.convert.tokenizer import TOKEN_UNUSED, SentencePieceInfo, read_sentencepiece
from megamobi.model_config import ModelConfig

GGUF_DTYPES = {"f32": np.float32, "f16": np.float16}


def rotate_half_to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection for llama.cpp's pairwise RoPE (see module doc)."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def interleaved_to_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `rotate_half_to_interleaved`."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """(GGUF tensor name, torch tensor in megamobi's [out, in] shape) in llama.cpp's usual order.
    The shared MLP appears once per block as the same tensor object."""
    out = [("token_embd.weight", state_dict["embed_tokens.weight"])]
    for i in range(config.num_layers):
        j = 0 if config.ffn_sharing == "shared" else i
        attn = f"layers.{i}.self_attn"
        out += [
            (f"blk.{i}.attn_norm.weight", state_dict[f"layers.{i}.input_layernorm.weight"]),
            (f"blk.{i}.attn_q.weight", rotate_half_to_interleaved(state_dict[f"{attn}.q_proj.weight"], config.num_attention_heads)),
            (f"blk.{i}.attn_k.weight", rotate_half_to_interleaved(state_dict[f"{attn}.k_proj.weight"], config.kv_heads)),
            (f"blk.{i}.attn_v.weight", state_dict[f"{attn}.v_proj.weight"]),
            (f"blk.{i}.attn_output.weight", state_dict[f"{attn}.o_proj.weight"]),
            (f"blk.{i}.ffn_norm.weight", state_dict[f"layers.{i}.post_attention_layernorm.weight"]),
            (f"blk.{i}.ffn_gate.weight", state_dict[f"mlps.{j}.gate_proj.weight"]),
            (f"blk.{i}.ffn_up.weight", state_dict[f"mlps.{j}.up_proj.weight"]),
            (f"blk.{i}.ffn_down.weight", state_dict[f"mlps.{j}.down_proj.weight"]),
        ]
    return out + [("output_norm.weight", state_dict["norm.weight"]), ("output.weight", state_dict["lm_head.weight"])]


def _add_vocab(writer, sp: SentencePieceInfo | None, config: ModelConfig) -> None:
    if sp is None:
        # llama.cpp requires tokenizer.ggml.model; "no_vocab" loads a model that takes token ids only.
        writer.add_tokenizer_model("no_vocab")
        return
    if sp.vocab_size > config.vocab_size:
        raise ConversionError(f"{sp.path}: {sp.vocab_size} tokens, more than the model's vocab_size {config.vocab_size}")
    pad = config.vocab_size - sp.vocab_size
    # llama.cpp wants one token per embedding row; rows past the tokenizer become unused pad tokens,
    # the way llama.cpp's own converter fills them.
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(sp.pieces + [f"[PAD{i}]" for i in range(sp.vocab_size, config.vocab_size)])
    writer.add_token_scores(sp.scores + [-1000.0] * pad)
    writer.add_token_types(sp.types + [TOKEN_UNUSED] * pad)
    for token_id, add in ((sp.bos_id, writer.add_bos_token_id), (sp.eos_id, writer.add_eos_token_id),
                          (sp.unk_id, writer.add_unk_token_id), (sp.pad_id, writer.add_pad_token_id)):
        if token_id >= 0:
            add(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def export_gguf(
    checkpoint_dir: str | Path,
    output_file: str | Path,
    *,
    dtype: str = "f16",
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    try:
        import gguf
    except ImportError as err:
        raise ConversionError("to-gguf needs the gguf package: pip install 'megamobi[convert]' (or pip install gguf)") from err
    if dtype not in GGUF_DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    output_file = Path(output_file)
    if output_file.is_dir() or str(output_file).endswith("/"):
        raise ConversionError(f"--output {output_file}: is a directory; give a file name such as "
                              f"{output_file / 'model.gguf'} (--overwrite replaces files, never directories)")
    if output_file.exists() and not overwrite:
        raise ConversionError(f"{output_file}: already exists; choose a new name or pass --overwrite")
    sp = read_sentencepiece(tokenizer) if tokenizer is not None else None
    config, state_dict = load_checkpoint(checkpoint_dir)
    if sp is None:
        print("note: no tokenizer: the GGUF file has no vocabulary (llama.cpp accepts token ids only)")

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    output_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_file.with_name(output_file.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(config.name)
    writer.add_description(f"MobiLlama ({config.ffn_sharing} FFN, written into every block), exported by megamobi")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    # Harmless to llama.cpp (unknown keys are ignored); records the sharing for readers of the file.
    writer.add_string(f"{arch}.megamobi.ffn_sharing", config.ffn_sharing)
    _add_vocab(writer, sp, config)

    matrix_dtype = GGUF_DTYPES[dtype]
    converted: dict[int, np.ndarray] = {}  # the shared FFN is converted once and written into every block
    for name, tensor in gguf_tensors(state_dict, config):
        if id(tensor) not in converted:
            array = tensor.detach().to(torch.float32).numpy()
            converted[id(tensor)] = array if array.ndim == 1 else array.astype(matrix_dtype)
        writer.add_tensor(name, converted[id(tensor)])
    try:
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=progress)
        finally:
            writer.close()
        os.replace(tmp, output_file)
    finally:
        tmp.unlink(missing_ok=True)  # an interrupted or failed write leaves nothing half-written behind
