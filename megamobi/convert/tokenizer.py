"""The SentencePiece tokenizer, read once for both exports (HF tokenizer files, GGUF vocab)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from megamobi.convert.errors import ConversionError

# SentencePiece piece kinds as GGUF / llama.cpp number them (gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class SentencePieceInfo:
    path: Path
    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def piece(self, token_id: int, default: str) -> str:
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else default


def read_sentencepiece(path: str | Path) -> SentencePieceInfo:
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: tokenizer file not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise ConversionError(f"{path}: not a SentencePiece model: {err}") from err
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(TOKEN_UNKNOWN)
        elif sp.is_control(i):
            types.append(TOKEN_CONTROL)
        elif sp.is_unused(i):
            types.append(TOKEN_UNUSED)
        elif sp.is_byte(i):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    return SentencePieceInfo(path=path, pieces=pieces, scores=scores, types=types,
                             bos_id=sp.bos_id(), eos_id=sp.eos_id(), unk_id=sp.unk_id(), pad_id=sp.pad_id())


def write_hf_tokenizer_files(sp: SentencePieceInfo, output_dir: Path, *, model_max_length: int) -> None:
    """tokenizer.model + the small JSON files with which `AutoTokenizer` / `LlamaTokenizer(Fast)`
    build the Llama tokenizer from the SentencePiece model (transformers converts it on first load,
    offline; no tokenizer.json is needed)."""
    shutil.copyfile(sp.path, output_dir / "tokenizer.model")
    special = {
        "bos_token": sp.piece(sp.bos_id, "<s>"),
        "eos_token": sp.piece(sp.eos_id, "</s>"),
        "unk_token": sp.piece(sp.unk_id, "<unk>"),
    }
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "pad_token": sp.piece(sp.pad_id, None) if sp.pad_id >= 0 else None,
        # Llama's convention at inference; the Amber training data itself carries no BOS.
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (output_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
