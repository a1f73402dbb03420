"""`kdstore convert`: a new version from an existing one in another format, dtype or top-k, without the teacher.

The new version is written by the same `VersionWriter` as `kdstore label` (staged shard by shard, resumable,
manifest last, atomic rename) and records where it came from in its manifest::

    "parent": {"name": "mnist", "version": 2, "relation": "convert", "settings": {...}}

Top-k. ``--top-k K`` at most the stored k *truncates* the stored top-k (its entries are sorted largest first); a
larger K, or a version without stored top-k, *recomputes* it from the full logits (ties broken by lower class
index, as at label time). Whenever the stored top-k changes (k or dtype), ``topk_mass_mean`` and
``topk_fidelity_kl`` are recomputed: fidelity against the stored full logits if the source has them, else it
cannot be measured and is recorded as null. Every other statistic (accuracy, entropy, ensemble) is the teacher's
and is carried over unchanged. The log-sum-exp column (computed from the exact float32 logits at label time)
is always copied as is.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore import targets, versioning
from kdstore.errors import ConfigError, arg
from kdstore.options import LOGITS_DTYPES
from kdstore.soft_targets import tensor
from kdstore.store import FORMATS, Version, VersionWriter, check_name
from kdstore.store.remote import is_remote, is_url, resolve_any
from kdstore.versioning import TEACHER_ROLES


@dataclass(frozen=True)
class ConvertConfig:
    """What `kdstore convert` changes; None keeps the source's setting.

    Attributes:
        source: version reference (local or remote).
        to: "parquet" or "hdf5".
        top_k: K to store; 0 stores no top-k.
        logits_dtype: storage dtype of logits and top-k values.
        keep_logits: False drops the full logits (top-k only).
        name: dataset name of the new version (default: the source's).
        out: store directory of the new version (default: the source's store; required for a remote source).
        shard_rows, row_group_rows: layout of the new files.
    """

    source: str
    to: str | None = None
    top_k: int | None = None
    logits_dtype: str | None = None
    keep_logits: bool | None = None
    name: str | None = None
    out: str | None = None
    shard_rows: int | None = None
    row_group_rows: int | None = None

    def __post_init__(self) -> None:
        errors = []
        if self.to is not None and self.to not in FORMATS:
            errors.append(f"{arg('format')} {self.to!r}: expected one of {', '.join(FORMATS)}")
        if self.top_k is not None and self.top_k < 0:
            errors.append(f"{arg('top_k')} {self.top_k}: must be >= 1, or 0 to store no top-k")
        if self.logits_dtype is not None and self.logits_dtype not in LOGITS_DTYPES:
            errors.append(f"{arg('logits_dtype')} {self.logits_dtype!r}: expected one of {', '.join(LOGITS_DTYPES)}")
        for opt, v in (("shard_rows", self.shard_rows), ("row_group_rows", self.row_group_rows)):
            if v is not None and v < 1:
                errors.append(f"{arg(opt)} {v}: must be >= 1")
        if self.name is not None:
            check_name(self.name)
        if errors:
            raise ConfigError("; ".join(errors))


@dataclass
class ConvertResult:
    path: Path
    manifest: dict[str, Any]
    source: str
    resumed_shards: int = 0


@dataclass(frozen=True)
class _Plan:
    fmt: str
    k: int | None
    dtype: str  # logits and top-k values
    keep_logits: bool
    from_logits: bool  # top-k recomputed from the full logits (else truncated from the stored top-k)
    recompute_topk_stats: bool
    shard_rows: int
    row_group_rows: int


def _plan(src: Version, cfg: ConvertConfig) -> _Plan:
    m = src.manifest
    c = src.num_classes
    src_k = src.top_k
    src_dtype = (m["targets"]["logits"] or {}).get("dtype") or (m["targets"]["top_k"] or {}).get("values_dtype")
    k = src_k if cfg.top_k is None else (cfg.top_k or None)
    keep = src.has_logits if cfg.keep_logits is None else cfg.keep_logits
    dtype = cfg.logits_dtype or src_dtype
    if keep and not src.has_logits:
        raise ConfigError(f"{src.ref} stores no full logits, so the new version cannot have them; set "
                          f"{arg('keep_logits')} False")
    if not keep and not k:
        raise ConfigError(f"nothing to store: no full logits ({arg('keep_logits')} False) and no top-k "
                          f"({arg('top_k')} 0); keep the logits or give {arg('top_k')} K")
    if k is not None and k > c:
        raise ConfigError(f"{arg('top_k')} {k}: {src.ref} has {c} classes; use 1..{c}")
    from_logits = bool(k) and (src_k is None or k > src_k)
    if from_logits and not src.has_logits:
        raise ConfigError(f"{arg('top_k')} {k}: {src.ref} stores top-{src_k} and no full logits, so a larger top-k "
                          "cannot be "
                          f"made; use {arg('top_k')} {src_k} or less (or relabel with `kdstore label`)")
    src_vdtype = (m["targets"]["top_k"] or {}).get("values_dtype")
    recompute = bool(k) and (k != src_k or dtype != src_vdtype)
    storage = m["storage"]
    return _Plan(cfg.to or storage["format"], k, str(dtype), keep, from_logits, recompute,
                 cfg.shard_rows or storage["shard_rows"], cfg.row_group_rows or storage["row_group_rows"])


def _columns(src: Version, plan: _Plan) -> list[dict[str, Any]]:
    """Column specs of the new version, in the order `kdstore label` writes them; unknown roles are kept."""
    c = src.num_classes
    src_idx = [col["dtype"] for col in src.manifest["columns"] if col["role"] == "topk_indices"]
    idx_dtype = src_idx[0] if (src_idx and not plan.from_logits) else versioning.index_dtype(c)
    cols = versioning.column_specs(src.teacher_ids, c, k=plan.k, keep_logits=plan.keep_logits, dtype=plan.dtype,
                                   labels=src.column_for("label") is not None, indices_dtype=idx_dtype)
    known = {"sample_id", "label", *TEACHER_ROLES}
    cols += [dict(col) for col in src.manifest["columns"] if col["role"] not in known]
    return cols


def convert(cfg: ConvertConfig, progress: Callable[[int], None] | None = None) -> ConvertResult:
    """Write a new version converted from `cfg.source` (see module docstring); return its path and manifest."""
    if cfg.out is None and is_remote(cfg.source):
        raise ConfigError(f"{cfg.source} is remote: pass {arg('out')} STORE (a local directory) for the new version, "
                          "then `kdstore push` it")
    if cfg.out is not None and is_url(cfg.out):
        raise ConfigError(f"{arg('out')} {cfg.out}: convert writes to a local store directory; write there, then "
                          "`kdstore push` the new version to the URL")
    ref = resolve_any(cfg.source, option="")
    src = Version(ref)
    plan = _plan(src, cfg)
    name = cfg.name or src.ref.name
    out = Path(cfg.out) if cfg.out is not None else src.ref.store
    columns = _columns(src, plan)
    settings = {"format": plan.fmt, "top_k": plan.k, "logits_dtype": plan.dtype, "keep_logits": plan.keep_logits,
                "topk_from": ("logits" if plan.from_logits else "stored top-k") if plan.k else None,
                "shard_rows": plan.shard_rows, "row_group_rows": plan.row_group_rows, "source": cfg.source}
    shard_meta = versioning.shard_metadata(name, columns, [t["sha256"] for t in src.manifest["teachers"]])
    run_key = versioning.run_key({"source_files": [f["sha256"] for f in src.files],
                                  "settings": {**asdict(plan), "name": name}})
    acc: dict[str, dict[str, Any]] = {tid: {"mass": 0.0, "fid": {}} for tid in src.teacher_ids}
    read_names = [col["name"] for col in src.manifest["columns"]]
    with VersionWriter(out, name, run_key=run_key, fmt=plan.fmt, columns=columns, shard_rows=plan.shard_rows,
                       row_group_rows=plan.row_group_rows, shard_metadata=shard_meta) as writer:
        done = writer.completed()
        n_shards = math.ceil(src.num_rows / plan.shard_rows)
        for index in range(n_shards):
            start, stop = index * plan.shard_rows, min((index + 1) * plan.shard_rows, src.num_rows)
            if index in done and not plan.recompute_topk_stats:
                if progress:
                    progress(stop - start)
                continue
            block = src.read_rows(start, stop, read_names, decode=False)
            cols, stats = _convert_block(src, block, columns, plan)
            for tid, s in stats.items():
                acc[tid]["mass"] += s["mass"]
                for t, v in s["fid"].items():
                    acc[tid]["fid"][t] = acc[tid]["fid"].get(t, 0.0) + v
            if index not in done:
                writer.write(index, start, cols, {})
            if progress:
                progress(stop - start)
        manifest = _manifest(src, plan, columns, acc, settings)
        path = writer.commit(manifest)
    return ConvertResult(path, json.loads((path / "manifest.json").read_text("utf-8")), str(src.ref), len(done))


def _convert_block(src: Version, block: dict[str, np.ndarray], columns: list[dict[str, Any]],
                   plan: _Plan) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    out: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {}
    for tid in src.teacher_ids:
        lcol = src.column_for("logits", tid)
        z = None
        if lcol:
            z = torch.from_numpy(versioning.decode(block[lcol], src.columns[lcol]["dtype"]).astype(np.float32))
        lse_name = src.column_for("logsumexp", tid) or ""
        lse = tensor(block[lse_name])
        if plan.keep_logits:
            assert lcol is not None and z is not None
            same = src.columns[lcol]["dtype"] == plan.dtype
            out[f"{tid}_logits"] = block[lcol] if same else versioning.encode(z, plan.dtype)
        if plan.k:
            if plan.from_logits:
                assert z is not None
                v, idx = targets.top_k(z, plan.k)
                values = versioning.encode(v, plan.dtype)
                indices = idx.numpy()
            else:
                icol, vcol = src.column_for("topk_indices", tid) or "", src.column_for("topk_values", tid) or ""
                indices = block[icol][:, : plan.k]
                same = src.columns[vcol]["dtype"] == plan.dtype
                kept = block[vcol][:, : plan.k]
                values = (np.ascontiguousarray(kept) if same
                          else versioning.encode(versioning.decode(kept, src.columns[vcol]["dtype"]), plan.dtype))
            idx_spec = next(col for col in columns if col["name"] == f"{tid}_topk_indices")
            out[f"{tid}_topk_indices"] = np.ascontiguousarray(indices).astype(idx_spec["dtype"])
            out[f"{tid}_topk_values"] = values
            if plan.recompute_topk_stats:
                vq = torch.from_numpy(versioning.decode(values, plan.dtype).astype(np.float32))
                iq = torch.from_numpy(out[f"{tid}_topk_indices"].astype(np.int64))
                tail = (src.manifest["targets"]["top_k"] or {}).get("tail", "uniform")
                stats[tid] = {"mass": versioning.stored_topk_mass_sum(vq, lse),
                              "fid": versioning.fidelity_sums(z, vq, iq, lse, tail) if z is not None else {}}
    for col in columns:
        if col["name"] not in out:
            out[col["name"]] = block[col["name"]]  # sample_id, label, log-sum-exp, unknown roles: as stored
    return out, stats


def _manifest(src: Version, plan: _Plan, columns: list[dict[str, Any]], acc: dict[str, Any],
              settings: dict[str, Any]) -> dict[str, Any]:
    m = copy.deepcopy(src.manifest)
    for key in ("name", "version", "created_at", "files", "derived_files"):
        m.pop(key, None)
    tail = (m["targets"]["top_k"] or {}).get("tail", "uniform")
    c = src.num_classes
    m.update(versioning.manifest_head())
    m["parent"] = {"name": src.manifest["name"], "version": src.manifest["version"], "relation": "convert",
                   "settings": settings}
    m["storage"] = versioning.storage_block(plan.fmt, plan.shard_rows, plan.row_group_rows)
    idx_dtype = next((col["dtype"] for col in columns if col["role"] == "topk_indices"), versioning.index_dtype(c))
    m["targets"] = versioning.targets_block(keep_logits=plan.keep_logits, dtype=plan.dtype, k=plan.k,
                                            indices_dtype=idx_dtype, tail=tail, labels=m["targets"]["labels"])
    m["columns"] = columns
    rows = src.num_rows
    for tid, entry in m["statistics"].get("teachers", {}).items():
        if not plan.k:
            entry.pop("topk_mass_mean", None)
            entry.pop("topk_fidelity_kl", None)
        elif plan.recompute_topk_stats and tid in acc:
            entry["topk_mass_mean"] = acc[tid]["mass"] / rows
            if src.has_logits:
                entry["topk_fidelity_kl"] = versioning.mean_fidelity([acc[tid]["fid"]], rows)
                entry["topk_fidelity_reference"] = (f"stored {src.manifest['targets']['logits']['dtype']} "
                                                    "logits of the parent")
            else:
                entry["topk_fidelity_kl"] = None  # no full logits: the error of a truncated top-k cannot be measured
    return m
