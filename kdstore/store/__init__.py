"""The target store: versioned, checksummed Parquet/HDF5 datasets of teacher targets. Imports no torch."""

from __future__ import annotations

from kdstore.store.formats import FORMATS, decode_bfloat16, encode_bfloat16, sha256_file
from kdstore.store.reader import Version, VersionRef, list_datasets, open_version, resolve
from kdstore.store.writer import VersionWriter, check_name, existing_versions

__all__ = [
    "FORMATS", "Version", "VersionRef", "VersionWriter", "check_name", "decode_bfloat16", "encode_bfloat16",
    "existing_versions", "list_datasets", "open_version", "resolve", "sha256_file",
]
