"""ctxext's error types for user mistakes (pure Python: no torch, no transformers).

Every error a user can fix (a bad method parameter, a missing file, an invalid config) is a ``CtxextError``; its
message names the bad value and the fix. The CLI turns exactly these into exit code 2 (``exit_code`` for the
few that need another). Anything else is a bug in ctxext or below it and keeps its traceback (exit 1).
"""

from __future__ import annotations


class CtxextError(Exception):
    """A user mistake; the message says what is wrong and what to do instead."""

    exit_code = 2


class MethodError(CtxextError, ValueError):
    """A method name, parameter or chain that cannot be used."""


class CheckpointError(CtxextError, ValueError):
    """A source or output path that cannot be used."""


class UnsupportedModelError(CtxextError, ValueError):
    """The checkpoint is not a RoPE model of a supported family."""


class DataError(CtxextError, ValueError):
    """A data source that cannot be read or is too small."""


class ConfigError(CtxextError, ValueError):
    """An invalid fine-tuning, recipe or sweep configuration; the message names every bad field."""


class TrainingError(CtxextError, RuntimeError):
    """Training cannot go on (a diverged loss, an occupied run folder); the message says what is kept."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class SearchError(CtxextError, ValueError):
    """A factor search that cannot run: a target length, budget or population out of range, a checkpoint without
    plain RoPE, or a state file that belongs to another search."""


class OutputError(CtxextError, RuntimeError):
    """An output that cannot be written now (another run is writing it, the disk is full); the message says what
    is kept and what to do."""


class EvalError(CtxextError, ValueError):
    """An evaluation request that cannot be run (a length, depth, stride or trial count out of range)."""
