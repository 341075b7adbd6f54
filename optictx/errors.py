"""Typed errors. Every user mistake raises one of these with a message the user can act on.

The CLI and the server catch ``OptictxError`` and print / return its message without a traceback.
"""


class OptictxError(Exception):
    """Base class of every error optictx raises on purpose."""

    exit_code = 2
    http_status = 400


class ConfigError(OptictxError):
    """A config.json or preset is invalid or inconsistent."""


class ImageError(OptictxError):
    """An image could not be read: corrupt, truncated, empty, too large (decompression bomb), ..."""


class PDFError(OptictxError):
    """A PDF could not be read: corrupt, encrypted, no pages, absurd page size, ..."""


class RenderError(OptictxError):
    """Text could not be rendered: empty text, characters no installed font can draw, bad page style."""


class WeightsError(OptictxError):
    """A checkpoint is missing, not safetensors (pickle is refused), has a lying header or wrong shapes."""


class TokenizerError(OptictxError):
    """A tokenizer file is missing or does not have the special tokens the model needs."""


class ModelNotFoundError(WeightsError):
    """A model name/path/hub id could not be resolved (offline, not cached, unknown alias)."""

    http_status = 404


class GenerationError(OptictxError):
    """Bad generation settings (e.g. prompt longer than the context, no <image> slot)."""


class InputTooLargeError(OptictxError):
    """The request is over a configured limit (pixels, pages, bytes, tokens)."""

    http_status = 413


class PrimitiveError(OptictxError):
    """A box, point or label cannot be written in the grounding language (out of 0-999, tag inside a label)."""


class MetricError(OptictxError):
    """Metric inputs are inconsistent (lengths differ, no ground-truth table, missing radius, bad box shape)."""


class MemoryStoreError(OptictxError):
    """A saved optical memory folder is missing, corrupt (a page fails its checksum) or of an unknown format."""
