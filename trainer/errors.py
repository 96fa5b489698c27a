"""One exception root for trainer/. Every leaf says what failed and whether a retry can help.

The commit protocol branches on ``retryable``: a retryable failure (out of memory, a flaky disk, a broker hiccup)
backs off and trains the same traces again; a fatal one (bad config, a base model that does not exist) is reported
in a ``failed`` event and needs an operator, because retrying would fail the same way.
"""

from __future__ import annotations

from schemas.runtime.preflight import UserError


class TrainerError(Exception):
    """Root of every error raised by ``trainer``."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:  # a call site may know better than the class default
            self.retryable = retryable


class ConfigError(TrainerError):
    """A setting is invalid or the settings contradict each other (the message names the variable)."""

    retryable = False


class RunNotEvaluated(ConfigError, UserError):
    """The gate was asked about a run with no ``evaluated`` event (unknown, or not evaluated yet): a user's
    mistake, one line and exit code 2 in the CLI."""


class DatasetError(TrainerError):
    """The traces could not be projected into a dataset (e.g. nothing left to train on after the holdout)."""

    retryable = False


class EmptyDataset(DatasetError):
    """No training example is left (all traces were holdout, duplicates or unusable)."""

    retryable = False


class BackendUnavailable(TrainerError):
    """The requested training backend cannot run here (unsloth without CUDA, or not installed)."""

    retryable = False


class BaseModelError(TrainerError):
    """The base model or its tokenizer could not be loaded, or its chat template cannot mask the assistant turn."""

    retryable = False


class TrainingFailed(TrainerError):
    """Training itself raised (out of memory, NaN loss, I/O). Usually worth another try after a back-off."""

    retryable = True


class AdapterError(TrainerError):
    """A trained adapter could not be written, moved into place or loaded back."""

    retryable = True


class ManifestError(TrainerError):
    """A run manifest could not be written or read back."""

    retryable = True


class CommitFailed(TrainerError):
    """The broker did not accept the offset commit (rebalance, lost partitions, broker down)."""

    retryable = True


class EvaluationError(TrainerError):
    """The student could not be evaluated on the holdout."""

    retryable = True


class ExportError(TrainerError):
    """Merging, GGUF conversion or Ollama registration failed."""

    retryable = False


class ServeError(TrainerError):
    """The local inference server could not serve the exported student (not installed, no export, failed to
    start, or it does not answer)."""

    retryable = False
