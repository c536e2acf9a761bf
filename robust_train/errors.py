"""Exceptions that the command line turns into a one-line message and a non-zero exit code."""


class RobustTrainError(Exception):
    """Base class: a user-facing error. Its message must name the bad key or path and what is allowed."""


class ConfigError(RobustTrainError):
    """A configuration value or combination is invalid."""


class DataError(RobustTrainError):
    """Dataset files are missing, unreadable or inconsistent."""


class CheckpointError(RobustTrainError):
    """A checkpoint is missing, truncated, corrupt or from an incompatible model."""


class ResultsError(RobustTrainError):
    """A results file is unreadable or was written by another format version."""


class StorageError(RobustTrainError, OSError):
    """Writing to disk failed (disk full, quota, permissions); the previous file is left intact.

    Also an OSError, so code that handles I/O failures generically still catches it.
    """


class NumericalError(RobustTrainError):
    """Training produced a non-finite or exploding loss; the message names epoch, step and loss terms."""
