"""The target store: versioned, checksummed Parquet/HDF5 datasets of teacher targets, local or remote.

The package boundary is the "no torch" rule: everything under kdstore.store works with numpy, pyarrow, h5py and
fsspec alone, so a dataset can be listed, verified, read and published without torch.

    layout    names, version directories, references and their resolution (local and remote)
    files     sha256 and atomic writes shared by every writer
    manifest  the JSON manifest: schema, format version, path safety
    formats   one Parquet/HDF5 shard: write, read, row groups
    writer    a new version: staged shards (written in the background), manifest last, one rename
    reader    an open committed version: typed column access and cheap checks
    remote    fsspec stores: URLs, listing, materialize into a verified cache
    publish   push: resumable, idempotent (by content), manifest last
    uploads   a push's record and lease on the remote; unfinished uploads: list, prune
    catalog   ls and full verify, local or remote
"""

from kdstore.store.files import sha256_file
from kdstore.store.formats import FORMATS, decode_bfloat16, encode_bfloat16
from kdstore.store.layout import VersionRef, check_name, existing_versions, resolve
from kdstore.store.reader import Version, list_datasets, open_version
from kdstore.store.writer import VersionWriter

__all__ = [
    "FORMATS", "Version", "VersionRef", "VersionWriter", "check_name", "decode_bfloat16", "encode_bfloat16",
    "existing_versions", "list_datasets", "open_version", "resolve", "sha256_file",
]
