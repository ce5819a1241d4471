"""Strict parsing of one input line. Each function returns data or raises LineRejected(reason, detail);
reasons are short stable keys used for the per-reason counts in the manifest."""
import json

import msgspec
import numpy as np

from .indexed_format import SEQ_LEN


class LineRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _decode_json_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineRejected("bad_utf8", f"undecodable UTF-8 at byte {err.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise LineRejected("bad_json", f"invalid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise LineRejected("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_amber_line(raw: bytes, *, vocab_size: int) -> tuple[np.ndarray, str]:
    """`{"token_ids": [SEQ_LEN ints], "source": str}` -> (uint16 tokens, source)."""
    obj = _decode_json_object(raw)
    if "token_ids" not in obj:
        hint = (" (the line has a 'text' field: raw text needs --format text --tokenizer MODEL.model)"
                if "text" in obj else "")
        raise LineRejected("missing_field", "missing field 'token_ids'" + hint)
    if "source" not in obj:
        raise LineRejected("missing_field", "missing field 'source'")
    source = obj["source"]
    if not isinstance(source, str) or not source:
        raise LineRejected("bad_source", f"'source' must be a non-empty string, got {source!r:.60}")
    ids = obj["token_ids"]
    if not isinstance(ids, list):
        raise LineRejected("bad_token_ids", f"'token_ids' must be a list, got {type(ids).__name__}")
    if len(ids) != SEQ_LEN:
        raise LineRejected("wrong_length", f"'token_ids' has {len(ids)} entries, expected {SEQ_LEN}")
    # numpy conversion is the fast type check: floats, strings, nested lists or huge ints give a
    # non-integer dtype. Booleans are the exception (numpy turns True into 1), so they are looked
    # for only when the raw line can contain one at all.
    try:
        array = np.array(ids)
    except (ValueError, OverflowError):
        array = np.array(ids, dtype=object)
    if array.dtype.kind not in "iu" or array.ndim != 1 or (
        (b"true" in raw or b"false" in raw) and any(type(x) is bool for x in ids)
    ):
        bad = next((x for x in ids if type(x) is not int), None)
        raise LineRejected("non_integer", f"'token_ids' contains a non-integer: {bad!r:.40}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab_size:
        value = low if low < 0 else high
        raise LineRejected("out_of_range", f"token id {value} outside [0, {vocab_size})")
    return array.astype(np.uint16), source


def parse_text_jsonl_line(raw: bytes, *, default_source: str) -> tuple[str, str]:
    """RedPajama style `{"text": str, "meta": {...}}` -> (text, source).
    Source: meta.redpajama_set_name, else meta.source, else the file's stem."""
    obj = _decode_json_object(raw)
    if "text" not in obj:
        raise LineRejected("missing_field", "missing field 'text'")
    text = obj["text"]
    if not isinstance(text, str):
        raise LineRejected("bad_text", f"'text' must be a string, got {type(text).__name__}")
    meta = obj.get("meta")
    source = default_source
    if isinstance(meta, dict):
        for key in ("redpajama_set_name", "source"):
            if isinstance(meta.get(key), str) and meta[key]:
                source = meta[key]
                break
    return text, source


class _AmberRow(msgspec.Struct):
    token_ids: list[int]
    source: str


class AmberLineParser:
    """parse_amber_line at the speed of msgspec. The fast path (typed decode in C, then one
    conversion to uint16) accepts only lines that parse_amber_line accepts too; any line it does
    not accept is handed to parse_amber_line, whose answer (tokens, or the reason) is final. So the
    accepted lines and every error message are exactly those of the reference parser."""

    def __init__(self, *, vocab_size: int) -> None:
        self._decode = msgspec.json.Decoder(_AmberRow).decode
        self._vocab_size = vocab_size

    def __call__(self, raw: bytes) -> tuple[np.ndarray, str]:
        try:
            # msgspec does not check the UTF-8 of fields it skips; json.loads(raw.decode()) does.
            if not raw.isascii():
                raw.decode("utf-8")
            row = self._decode(raw)
            ids = row.token_ids
            if len(ids) == SEQ_LEN and row.source:
                # list[int] refused bools and floats; fromiter refuses ids outside uint16.
                tokens = np.fromiter(ids, dtype=np.uint16, count=SEQ_LEN)
                if self._vocab_size > 0xFFFF or int(tokens.max()) < self._vocab_size:
                    return tokens, row.source
        except (msgspec.DecodeError, UnicodeDecodeError, OverflowError):
            pass
        return parse_amber_line(raw, vocab_size=self._vocab_size)
