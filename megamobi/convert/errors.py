"""The one exception type of the converters: a user mistake or a broken input, told in one line."""


class ConversionError(ValueError):
    """Input that cannot be converted (broken checkpoint, unsupported HF config, differing MLP copies,
    output in the way). The CLI prints the message on one line and exits 2, without a traceback."""
