"""Exceptions that the command line turns into a one-line message and a non-zero exit code."""


class RobustTrainError(Exception):
    """Base class: a user-facing error. Its message must name the bad key or path and what is allowed."""


class ConfigError(RobustTrainError):
    """A configuration value or combination is invalid."""


class DataError(RobustTrainError):
    """Dataset files are missing, unreadable or inconsistent."""


class CheckpointError(RobustTrainError):
    """A checkpoint is missing, truncated, corrupt or from an incompatible model."""
