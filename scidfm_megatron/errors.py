"""Every error this library raises on purpose, under one base class.

A command-line tool catches :class:`ScidfmError` (or the subclasses it expects) and prints its message as
one line (exit 2, or 1 where the tool says so) instead of a traceback. Each class also keeps the builtin
base it always had, so existing
``except ValueError`` / ``except RuntimeError`` / ``except OSError`` callers still catch it. The modules
that used to define them re-export them (``from scidfm_megatron.config import ConfigError`` still works).
Not here: tokenizer/core.py's NotScienceTokenizer (that file ships alone in exported HF folders, importing
nothing of the package) and testing/'s TorchrunError (a test helper's).
"""

from __future__ import annotations


class ScidfmError(Exception):
    """Base of the library's own errors: the message is the one line a user sees and names the fix."""


# ---------------------------------------------------------------------------- configuration
class ConfigError(ScidfmError, ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class ParallelConfigError(ScidfmError, ValueError):
    """A parallel layout that does not fit the model or the world size; the message names the degree and fix."""


# ---------------------------------------------------------------------------- training
class RunStopped(ScidfmError, RuntimeError):
    """A fault policy stopped the run; the message is the one line the user sees (exit code 1)."""


class SaveFailed(ScidfmError, OSError):
    """A checkpoint save failed on at least one rank; every rank raises it after the cleanup."""


class CheckpointMismatch(ScidfmError, RuntimeError):
    """A checkpoint that is incomplete or does not fit this model or run."""


# ---------------------------------------------------------------------------- tokenizer
class TokenizerError(ScidfmError, ValueError):
    """A tokenizer that cannot go with this conversion (reported as one line, exit 2)."""


class LossyBaseError(ScidfmError, ValueError):
    """The base model's normaliser changes text: encode + decode does not give the text back."""


class PlainExportError(ScidfmError, ValueError):
    """A plain SentencePiece tokenizer that cannot be exported to Hugging Face as asked."""


# ---------------------------------------------------------------------------- checkpoint conversion
class HFCheckpointError(ScidfmError, RuntimeError):
    """A Hugging Face checkpoint folder that is incomplete, corrupt or does not fit its config."""


class McoreCheckpointError(ScidfmError, RuntimeError):
    """An incomplete or corrupt megatron checkpoint directory, or one this tool cannot interpret."""


class VerifyError(ScidfmError, RuntimeError):
    """The converted model does not reproduce its source (the message names the first layer)."""


# ---------------------------------------------------------------------------- data
class PreprocessError(ScidfmError, RuntimeError):
    """Preprocessing cannot go on (a bad input file, a failed worker); the message names the file."""


class PreprocessUsageError(PreprocessError):
    """Bad arguments (the tokenizer cannot do what the flags ask): the CLI exits 2."""


class SFTFormatError(ScidfmError, ValueError):
    """A file whose records are in none of the formats (the CLI exits 2)."""


class ShardError(ScidfmError, RuntimeError):
    """A shard cannot be merged (or a --shard value is wrong); the message names the shard and the fix."""


# ---------------------------------------------------------------------------- evaluation
class TaskDataError(ScidfmError, ValueError):
    """An evaluation task file (or task name) the harness cannot use."""


class ConvertError(ScidfmError, ValueError):
    """A benchmark file that cannot be converted to the harness's task format."""


class CorpusError(ScidfmError, ValueError):
    """A corpus folder the analysis cannot use (the CLI prints it as one line, exit 2)."""


__all__ = [
    "CheckpointMismatch", "ConfigError", "ConvertError", "CorpusError", "HFCheckpointError", "LossyBaseError",
    "McoreCheckpointError", "ParallelConfigError", "PlainExportError", "PreprocessError",
    "PreprocessUsageError", "RunStopped", "SFTFormatError", "SaveFailed", "ScidfmError", "ShardError",
    "TaskDataError", "TokenizerError", "VerifyError",
]
