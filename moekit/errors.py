"""The exceptions moekit raises. Each names the offending key, value, file, layer, rank or step."""

from __future__ import annotations


class MoekitError(Exception):
    """Base class for every error moekit raises on purpose."""


class ConfigError(MoekitError, ValueError):
    """A configuration field or argument has a bad name or value."""


class ShapeError(MoekitError, ValueError):
    """A tensor argument has the wrong shape or dtype."""


class CheckpointError(MoekitError):
    """A checkpoint is missing, truncated, inconsistent or of another model."""


class UnsafeFileError(CheckpointError):
    """A file would need unpickling (or other code execution) to load; moekit refuses."""


class NonFiniteError(MoekitError, FloatingPointError):
    """A loss or gradient became NaN or infinite; no weight was updated."""


class DataError(MoekitError, ValueError):
    """An input data file is empty, binary, too short or malformed."""


class TrainingInterrupted(MoekitError):
    """SIGINT or SIGTERM stopped a training run after its current step; a checkpoint was written first."""
