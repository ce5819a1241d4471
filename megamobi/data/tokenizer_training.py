"""Train a LLaMA-style SentencePiece BPE tokenizer (byte fallback; unk 0, bos 1, eos 2)."""
import io
from collections.abc import Iterator
from pathlib import Path

from .errors import DataConfigError
from .input_files import compression_of, expand_inputs, logical_name, open_decompressed
from .line_parsers import LineRejected, parse_text_jsonl_line


def iter_training_text(paths: list[Path]) -> Iterator[str]:
    """Sentences for the trainer: jsonl 'text' fields (split at newlines) or plain-text lines."""
    for path in paths:
        is_jsonl = logical_name(path).endswith((".jsonl", ".json"))
        with open_decompressed(path, compression=compression_of(path)) as stream:
            for line_no, raw in enumerate(stream, 1):
                if is_jsonl:
                    if not raw.strip():
                        continue
                    try:
                        text, _ = parse_text_jsonl_line(raw, default_source="")
                    except LineRejected as err:
                        raise DataConfigError(f"{path}:{line_no}: {err.detail}") from None
                    yield from (t for t in text.split("\n") if t.strip())
                else:
                    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if text.strip():
                        yield text


def train_tokenizer(*, inputs: list[str], output_prefix: str, vocab_size: int,
                    max_sentences: int = 2_000_000, num_threads: int = 1) -> Path:
    """Writes output_prefix.model / .vocab and returns the .model path. Byte fallback needs
    vocab_size >= 256 bytes + 3 specials + the distinct characters kept; the error says so."""
    import sentencepiece

    files = expand_inputs(inputs)
    if vocab_size > 65535:
        raise DataConfigError(f"--vocab-size {vocab_size} does not fit uint16 shards (max 65535)")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter_training_text(files), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995,
            split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2,
            hard_vocab_limit=True, max_sentence_length=1 << 16,
        )
    except RuntimeError as err:
        raise DataConfigError(
            f"sentencepiece training failed: {err}. With byte fallback the vocabulary needs room "
            "for 256 byte pieces + 3 specials + every distinct character; raise --vocab-size"
        ) from None
    path = Path(output_prefix + ".model")
    path.write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    with open(output_prefix + ".vocab", "w") as stream:
        for i in range(processor.vocab_size()):
            stream.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n")
    return path
