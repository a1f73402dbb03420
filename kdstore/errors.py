"""Exceptions raised by kdstore; every message says what was found, what was expected, and what to do.

A message names the argument it is about with `arg`: the Python API shows the argument's name (``top_k``), the
command line shows its option (``--top-k``), so neither speaks the other's language::

    raise ConfigError(f"{arg('top_k')} {k}: must be >= 1")   # str(e): "top_k 0: must be >= 1"
    e.render({"top_k": "--top-k"})                            # "--top-k 0: must be >= 1"
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_MARK = "\x1f"  # ASCII unit separator: never part of a path, option or value kdstore prints
_ARG_RE = re.compile(_MARK + r"([A-Za-z_][A-Za-z0-9_]*)" + _MARK)


def arg(name: str) -> str:
    """Mark the argument `name` in an error message (see the module docstring); anything that is not an identifier
    (an option a caller already spelled out, say) is returned as it is."""
    return f"{_MARK}{name}{_MARK}" if name.isidentifier() else name


def _render(template: str, names: Mapping[str, str]) -> str:
    return _ARG_RE.sub(lambda m: names.get(m.group(1), m.group(1)), template)


class KdstoreError(Exception):
    """Base class of every error kdstore raises on bad input or bad data."""

    def __init__(self, message: str = "") -> None:
        self.template = message
        super().__init__(_render(message, {}))

    @property
    def fields(self) -> tuple[str, ...]:
        """The argument names the message refers to, in order."""
        return tuple(dict.fromkeys(_ARG_RE.findall(self.template)))

    def render(self, names: Mapping[str, str]) -> str:
        """The message with each marked argument shown as `names[argument]` (e.g. its command-line option)."""
        return _render(self.template, names)


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
