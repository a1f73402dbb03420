"""The version manifest: JSON validated against schemas/manifest.v{format_version}.json, written last, read first."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from kdstore.errors import ManifestError, UnsafePathError, UnsupportedFormatVersion
from kdstore.store.files import atomic_write_text
from kdstore.store.layout import MANIFEST_NAME

FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)


@functools.cache
def schema(format_version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The normative JSON Schema for a manifest of `format_version`, shipped inside the package."""
    text = resources.files("kdstore.schemas").joinpath(f"manifest.v{format_version}.json").read_text("utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


def validate(manifest: dict[str, Any], where: str = "manifest") -> None:
    """Check `format_version`, then the schema, then the invariants a schema cannot express.

    Raises:
        UnsupportedFormatVersion: written by a newer kdstore.
        ManifestError: listing every schema violation found.
    """
    fv = manifest.get("format_version") if isinstance(manifest, dict) else None
    if fv not in SUPPORTED_FORMAT_VERSIONS:
        if isinstance(fv, int) and fv > max(SUPPORTED_FORMAT_VERSIONS):
            raise UnsupportedFormatVersion(
                f"{where}: format_version {fv}; this kdstore reads "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}; upgrade kdstore (pip install -U kdstore)"
            )
        raise ManifestError(f"{where}: format_version is {fv!r}, expected one of {SUPPORTED_FORMAT_VERSIONS}")
    # Path escapes first: they are a safety problem (UnsafePathError), not just a schema violation.
    for key in ("files", "derived_files", "attachments"):
        entries = manifest.get(key)
        for f in entries if isinstance(entries, list) else []:
            if isinstance(f, dict) and isinstance(f.get("path"), str):
                check_relative_path(f["path"], where)
    validator = jsonschema.Draft202012Validator(schema(fv))
    problems = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if problems:
        shown = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ManifestError(f"{where} does not match schema manifest.v{fv}.json: {shown}{more}")
    rows = sum(f["rows"] for f in manifest["files"])
    if rows != manifest["num_rows"]:
        raise ManifestError(f"{where}: files hold {rows} rows but num_rows is {manifest['num_rows']}")
    names = [c["name"] for c in manifest["columns"]]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: duplicate column names in {names}")


def attachments(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's attachments: checksummed files beside the data that are not shards (a feature projection);
    empty for versions without them."""
    return list(manifest.get("attachments") or [])


def check_relative_path(rel: str, where: str = "manifest") -> None:
    """Refuse a path that is absolute or climbs out of its directory (`..`)."""
    p = Path(rel)
    # "." and empty components are refused too: "data/." names the directory itself, never a file.
    components = rel.replace("\\", "/").split("/")
    if (p.is_absolute() or rel.startswith(("/", "\\")) or ".." in p.parts or ":" in rel
            or any(c in ("", ".", "..") for c in components)):
        raise UnsafePathError(
            f"{where} names {rel!r}, which is outside its version directory; "
            "a manifest may only name files under data/ (the dataset may have been tampered with)"
        )


def resolve_inside(root: Path, rel: str, where: str = "manifest") -> Path:
    """Join `rel` to `root`, refusing anything (including a symlink) that resolves outside `root`."""
    check_relative_path(rel, where)
    base = root.resolve()
    target = (root / rel).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(
            f"{where} names {rel!r}, which resolves to {target} outside {base} (a symlink out?); refusing to follow it"
        )
    return target


def load(version_dir: Path) -> dict[str, Any]:
    """Read and validate `version_dir/manifest.json`.

    Raises:
        ManifestError: missing, not JSON, or invalid; UnsupportedFormatVersion for a newer format.
    """
    path = version_dir / MANIFEST_NAME
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"{path} not found: {version_dir} is not a complete kdstore version "
            "(an interrupted `kdstore label` leaves none; rerun it to resume)"
        ) from None
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}") from None
    return loads(text, str(path))


def loads(text: str, where: str = "manifest") -> dict[str, Any]:
    """Parse and validate manifest JSON text."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}); the file is corrupted") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {type(data).__name__}")
    validate(data, where)
    return data


def dumps(manifest: dict[str, Any]) -> str:
    """Canonical JSON text of a manifest (sorted keys are *not* used: the order is documented)."""
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


def save(version_dir: Path, manifest: dict[str, Any]) -> Path:
    """Validate and write `manifest.json` atomically (per-process temporary file, fsync, rename)."""
    validate(manifest, f"manifest for {manifest.get('name')!r}")
    return atomic_write_text(version_dir / MANIFEST_NAME, dumps(manifest))
