"""The pipeline's errors: one hierarchy, each a message a user can act on. The CLI prints any of them as
`error: <message>` and exits 2; anything else is a bug and keeps its traceback.

The builtin bases (ValueError, RuntimeError) are kept for callers that catch those."""
from __future__ import annotations


class PipelineError(Exception):
    """A run that cannot go on because of its input, config or environment; the message says what to do."""


class ConfigError(PipelineError, ValueError):
    """A config value that cannot work; the message names the key and what to do."""


class DataError(PipelineError, ValueError):
    """Bad input data; the message names the file and line (or row) and what to do."""


class ConversionError(PipelineError, ValueError):
    """A checkpoint that cannot be converted; the message names the tensor and what is wrong."""


class StageError(PipelineError, RuntimeError):
    """A stage cannot run or failed; the message says which and what to do."""


class StorageError(StageError):
    """A write failed for the storage (full, over quota, read-only, no permission); the message names the path."""
