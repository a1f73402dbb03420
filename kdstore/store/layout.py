"""Where things are in a store: dataset names, version directories, references, and resolving them.

A store is a directory (or a URL, see `kdstore.store.remote`) holding ``NAME/vN/`` version directories; a
version exists once its ``manifest.json`` does. A reference is ``STORE/NAME`` (the latest version),
``STORE/NAME@vN`` (``@N`` and ``@latest`` too) or the version directory ``STORE/NAME/vN``. The same rules
resolve local and remote references: `split_ref` parses, `pick_version` chooses among committed versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kdstore.errors import ConfigError, StoreNotFoundError, arg

MANIFEST_NAME = "manifest.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
REF_RE = re.compile(r"^(?P<path>.+?)(?:@v?(?P<version>[0-9]+|latest))?$")
STAGING_PREFIX = ".staging-"


def check_name(name: str, argument: str = "name") -> None:
    """A dataset name is one path component of safe characters (`argument` names it in the error)."""
    if not NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(
            f"{arg(argument)} {name!r} is not a valid dataset name; use letters, digits, '.', '_' and '-' "
            "(start with a letter or digit, at most 128 characters)"
        )


def version_dir_name(version: int) -> str:
    return f"v{version}"


def parse_version_dir(name: str) -> int | None:
    """``"v3"`` -> 3; None for anything that is not a version directory name."""
    m = VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def split_ref(ref: str) -> tuple[str, int | None]:
    """``PATH@vN`` / ``PATH@latest`` / ``PATH`` -> (PATH, N or None for the latest)."""
    m = REF_RE.match(ref)
    if m is None:  # only the empty string
        raise ConfigError("an empty reference; expected STORE/NAME or STORE/NAME@vN")
    want = m.group("version")
    return m.group("path"), (None if want in (None, "latest") else int(want))


def pick_version(versions: list[int], want: int | None, what: str, where: str, hint: str = "") -> int:
    """The version to open among the committed `versions` (ascending): `want`, or the latest when None.

    Args:
        what: how error messages name the reference (e.g. ``targets s3://b/t/mnist``).
        where: the dataset's location, for the message when it holds nothing.
        hint: appended when no version is committed (e.g. that a run is staged there).
    """
    if not versions:
        raise StoreNotFoundError(f"{what}: {where} holds no committed version{hint}")
    if want is None:
        return versions[-1]
    if want not in versions:
        raise StoreNotFoundError(f"{what}: version v{want} not found; {Path(where).name} has "
                                 f"{', '.join(f'v{v}' for v in versions)}")
    return want


def existing_versions(dataset_dir: Path) -> list[int]:
    """Committed version numbers under a local dataset directory, ascending."""
    if not dataset_dir.is_dir():
        return []
    found = (parse_version_dir(p.name) for p in dataset_dir.iterdir() if (p / MANIFEST_NAME).exists())
    return sorted(v for v in found if v is not None)


def staged_runs(dataset_dir: Path) -> list[Path]:
    """Staging directories (unfinished or running writes) of a local dataset directory."""
    return sorted(p for p in dataset_dir.glob(STAGING_PREFIX + "*") if p.is_dir()) if dataset_dir.is_dir() else []


@dataclass(frozen=True)
class VersionRef:
    """A resolved reference to one committed local version."""

    store: Path
    name: str
    version: int

    @property
    def path(self) -> Path:
        return self.store / self.name / version_dir_name(self.version)

    def __str__(self) -> str:
        return f"{self.store / self.name}@v{self.version}"


def resolve(ref: str | Path, option: str = "targets") -> VersionRef:
    """Resolve a local `STORE/NAME` (latest), `STORE/NAME@vN` or `STORE/NAME/vN` to a committed version.

    Args:
        ref: the reference.
        option: how error messages name the reference (the option or argument it came from).

    Raises:
        StoreNotFoundError: naming what was looked for and what exists.
    """
    text = str(ref)
    what = f"{arg(option)} {text}" if option else text
    path_text, want = split_ref(text)
    path = Path(path_text)
    n = parse_version_dir(path.name)
    if want is None and n is not None and (path / MANIFEST_NAME).exists():
        return VersionRef(path.parent.parent, path.parent.name, n)
    if not path.is_dir():
        raise StoreNotFoundError(
            f"{what}: no dataset directory {path}; expected STORE/NAME or STORE/NAME@vN "
            "(run `kdstore ls STORE` to list datasets)"
        )
    hint = " (an unfinished `kdstore label` run is staged there: rerun it to finish)" if staged_runs(path) else ""
    return VersionRef(path.parent, path.name, pick_version(existing_versions(path), want, what, str(path), hint))
