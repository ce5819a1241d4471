"""Exceptions raised by the data pipeline; every message names the file and says what to do."""


class DataError(Exception):
    """Base class: any problem with input data, shards or data configuration."""


class BadInputError(DataError):
    """An input line that cannot be turned into tokens safely."""

    def __init__(self, *, path: str, line: int, reason: str, detail: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        self.detail = detail
        super().__init__(
            f"{path}:{line}: bad input ({reason}): {detail}. "
            "Fix or remove the line, or re-run with --skip-bad to skip such lines "
            "(they are counted and listed in manifest.json)."
        )


class ShardError(DataError):
    """A shard on disk that does not match its manifest (truncated, corrupted, foreign)."""


class DataConfigError(DataError):
    """Invalid arguments (sizes, divisibility, unknown source names, ...)."""
