"""Exceptions raised by kdstore; every message says what was found, what was expected, and what to do."""

from __future__ import annotations


class KdstoreError(Exception):
    """Base class of every error kdstore raises on bad input or bad data."""


class ConfigError(KdstoreError, ValueError):
    """An option or configuration value is invalid."""


class InputError(KdstoreError):
    """A user-supplied file (transfer set, teacher, student, eval set) is missing or malformed."""


class TeacherError(KdstoreError):
    """A teacher could not be loaded, or produced output of the wrong shape or values."""


class StudentError(KdstoreError):
    """A student could not be built, or does not fit the store it is trained on."""


class ManifestError(KdstoreError):
    """A manifest is missing, unreadable, or does not satisfy the schema."""


class UnsupportedFormatVersion(ManifestError):
    """A manifest was written by a kdstore with a newer on-disk format."""


class StoreNotFoundError(KdstoreError, FileNotFoundError):
    """A store, dataset name or version does not exist."""


class StoreFormatError(KdstoreError):
    """A data file is missing, corrupted, or disagrees with its manifest."""


class UnsafePathError(StoreFormatError):
    """A manifest names a path outside its version directory."""


class ShapeMismatchError(KdstoreError, ValueError):
    """Tensors or datasets disagree in shape (classes, rows, features)."""


class TrainingDiverged(KdstoreError):
    """The training loss became NaN or infinite."""


class RemoteError(KdstoreError):
    """A remote store (s3://, gs://, memory://, ...) could not be reached, read or written."""
