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

from kdstore import feature_convert, memory, versioning
from kdstore.errors import ConfigError, arg
from kdstore.feature_convert import FeaturePlan, plan_features
from kdstore.features import FeatureStatistics
from kdstore.options import LOGITS_DTYPES
from kdstore.soft_targets import tensor
from kdstore.store import FORMATS, Version, VersionWriter, check_name
from kdstore.store.remote import is_remote, is_url, resolve_any, shown_ref
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
        sample, sample_seed: per-token versions only: draw `sample` tokens per position from the stored top-k's
            rebuilt distribution (`kdstore.token_convert`).
        drop_features, feature_rank: stored teacher features dropped, or their projections cut to `feature_rank`
            directions (`kdstore.feature_convert`); kept as they are by default.
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
    sample: int | None = None
    sample_seed: int = 0
    drop_features: bool = False
    feature_rank: int | None = None

    def __post_init__(self) -> None:
        errors = []
        if self.sample is not None and not 1 <= self.sample <= 32767:
            errors.append(f"{arg('sample')} {self.sample}: draws per position must be in 1..32767")
        if not 0 <= self.sample_seed < 2**63:
            errors.append(f"{arg('sample_seed')} {self.sample_seed}: must be in [0, 2**63)")
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
    dtype: str  # precision of logits and top-k values
    keep_logits: bool
    from_logits: bool  # top-k recomputed from the full logits (else truncated from the stored top-k)
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
    from_logits = bool(k) and (src_k is None or k > src_k or (src.has_logits and src.format_version < 2))
    if from_logits and not src.has_logits:
        raise ConfigError(f"{arg('top_k')} {k}: {src.ref} stores top-{src_k} and no full logits, so a larger top-k "
                          f"cannot be made; use {arg('top_k')} {src_k} or less (or relabel with `kdstore label`)")
    storage = m["storage"]
    return _Plan(cfg.to or storage["format"], k, str(dtype), keep, from_logits,
                 cfg.shard_rows or storage["shard_rows"], cfg.row_group_rows or storage["row_group_rows"])


def _columns(src: Version, plan: _Plan, feats: FeaturePlan | None) -> list[dict[str, Any]]:
    """Column specs of the new version, in the order `kdstore label` writes them; unknown roles are kept, features
    as `feats` says."""
    c = src.num_classes
    cols = versioning.column_specs(src.teacher_ids, c, k=plan.k, keep_logits=plan.keep_logits, dtype=plan.dtype,
                                   labels=src.column_for("label") is not None)
    known = {"sample_id", "label", "feature", *TEACHER_ROLES}
    cols += [dict(col) for col in src.manifest["columns"] if col["role"] not in known]
    return cols + (feats.columns(src) if feats else [])


def convert(cfg: ConvertConfig, progress: Callable[[int], None] | None = None) -> ConvertResult:
    """Write a new version converted from `cfg.source` (see module docstring); return its path and manifest."""
    if cfg.out is None and is_remote(cfg.source):
        raise ConfigError(f"{cfg.source} is remote: pass {arg('out')} STORE (a local directory) for the new version, "
                          "then `kdstore push` it")
    if cfg.out is not None and is_url(cfg.out):
        raise ConfigError(f"{arg('out')} {cfg.out}: convert writes to a local store directory; write there, then "
                          "`kdstore push` the new version to the URL")
    memory.keep_large_blocks_mapped()
    ref = resolve_any(cfg.source, option="")
    src = Version(ref)
    name = cfg.name or src.ref.name
    out = Path(cfg.out) if cfg.out is not None else src.ref.store
    if src.manifest["targets"].get("kind") == "tokens":
        from kdstore.token_convert import convert_tokens

        path, resumed = convert_tokens(src, cfg, out, name, shown_ref(cfg.source, src.ref), progress)
        return ConvertResult(path, json.loads((path / "manifest.json").read_text("utf-8")),
                             shown_ref(cfg.source, src.ref), resumed)
    if cfg.sample is not None:
        raise ConfigError(f"{arg('sample')}: {src.ref} is a classification version; sampled targets are per token "
                          "(language-model versions)")
    plan = _plan(src, cfg)
    feats = plan_features(src, cfg.drop_features, cfg.feature_rank)
    columns = _columns(src, plan, feats)
    shard_meta = versioning.shard_metadata(name, columns, [t["sha256"] for t in src.manifest["teachers"]])
    run_key = versioning.run_key({"source_files": [f["sha256"] for f in src.files], "format": 2,
                                  "settings": {**asdict(plan), "name": name,
                                               "features": feats.widths if feats else None}})
    tail = (src.manifest["targets"]["top_k"] or {}).get("tail", "uniform")
    with VersionWriter(out, name, run_key=run_key, fmt=plan.fmt, columns=columns, shard_rows=plan.shard_rows,
                       row_group_rows=plan.row_group_rows, shard_metadata=shard_meta) as writer:
        if feats is not None:
            feats.stage(src, writer, plan.fmt)
        done = writer.completed()
        n_shards = math.ceil(src.num_rows / plan.shard_rows)
        for index in range(n_shards):
            start, stop = index * plan.shard_rows, min((index + 1) * plan.shard_rows, src.num_rows)
            if index not in done:
                stats = versioning.TargetStatistics(src.teacher_ids, src.num_classes, plan.k, tail)
                cols, fsums = _convert_rows(src, start, stop, columns, plan, stats, feats)
                writer.write(index, start, cols, {**stats.partial(), "features": fsums})
            if progress:
                progress(stop - start)
        infos = writer.completed()
        stats = versioning.TargetStatistics(src.teacher_ids, src.num_classes, plan.k, tail)
        reference = ("stored logits" if plan.keep_logits else "stored logits of the parent" if src.has_logits
                     else None)
        parts = [infos[i]["stats"] for i in sorted(infos)]
        statistics = stats.combine(parts, reference)
        manifest = _manifest(src, plan, columns, statistics, shown_ref(cfg.source, src.ref))
        if feats is not None:
            feature_convert.record(manifest, src, plan.fmt, feats, [p["features"] for p in parts])
        path = writer.commit(manifest)
    return ConvertResult(path, json.loads((path / "manifest.json").read_text("utf-8")), shown_ref(cfg.source, src.ref),
                         len(done))


def _convert_rows(src: Version, start: int, stop: int, columns: list[dict[str, Any]], plan: _Plan,
                  stats: versioning.TargetStatistics,
                  feats: FeaturePlan | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The new version's columns for rows [start, stop), read and converted one source row group at a time (memory
    bounded by a row group, whatever C), and the features' partial sums; statistics are added to `stats` as they
    go."""
    names = [col["name"] for col in src.manifest["columns"]]
    wanted = [col["name"] for col in columns]
    step = src.manifest["storage"]["row_group_rows"]
    idx_dtype = versioning.index_dtype(src.num_classes)
    parts = []
    norms: dict[str, list[float]] = {}
    fstats = FeatureStatistics()
    for a in range(start, stop, step):
        block = src.read_rows(a, min(a + step, stop), names)
        out: dict[str, np.ndarray] = {n: block[n] for n in wanted if n in block}  # sample_id, label, unknown roles
        if feats is not None:
            out.update(feats.rows(block, norms, fstats))
        stored, refs = {}, {}
        for tid in src.teacher_ids:
            stored[tid], refs[tid] = _teacher_rows(src, tid, block, plan)
            out.update(stored[tid].columns(tid, idx_dtype))
        labels = torch.from_numpy(block["label"].astype(np.int64)) if "label" in block else None
        stats.add(torch.from_numpy(block["sample_id"].astype(np.int64)), labels, stored, refs)
        parts.append({n: out[n] for n in wanted})
    return {n: np.concatenate([p[n] for p in parts]) for n in wanted}, {"norms": norms, "sums": fstats.partial()}


def _teacher_rows(src: Version, tid: str, block: dict[str, np.ndarray],
                  plan: _Plan) -> tuple[versioning.StoredTargets, torch.Tensor | None]:
    """One teacher's stored targets in the new version for a block of source rows, and the fidelity reference
    (the source's full logits, when the new version does not keep them)."""
    lcol = src.column_for("logits", tid)
    z = tensor(block[lcol]) if lcol else None
    lse = tensor(block[src.column_for("logsumexp", tid) or ""])
    if plan.from_logits or not plan.k:
        assert z is not None  # _plan: a new top-k from logits, or logits only, both need the source's logits
        st = versioning.stored_targets(z, k=plan.k, keep_logits=plan.keep_logits, precision=plan.dtype, lse=lse)
    else:
        values = tensor(block[src.column_for("topk_values", tid) or ""])
        indices = tensor(block[src.column_for("topk_indices", tid) or ""], np.int64)
        tcol = src.column_for("tail_logmass", tid)
        st = versioning.truncated_targets(values, indices, lse, tensor(block[tcol]) if tcol else None, k=plan.k,
                                          precision=plan.dtype)
        if plan.keep_logits and z is not None:
            st.logits = versioning.stored_targets(z, k=None, keep_logits=True, precision=plan.dtype, lse=lse).logits
    return st, (z if not plan.keep_logits else None)


def _manifest(src: Version, plan: _Plan, columns: list[dict[str, Any]], statistics: dict[str, Any],
              source: str) -> dict[str, Any]:
    m = copy.deepcopy(src.manifest)
    for key in ("name", "version", "created_at", "files", "derived_files", "attachments", "features"):
        m.pop(key, None)  # attachments and features: the writer and `_feature_manifest` write the new ones
    tail = (m["targets"]["top_k"] or {}).get("tail", "uniform")
    c = src.num_classes
    m.update(versioning.manifest_head())
    settings = {"format": plan.fmt, "top_k": plan.k, "logits_dtype": plan.dtype, "keep_logits": plan.keep_logits,
                "topk_from": ("logits" if plan.from_logits else "stored top-k") if plan.k else None,
                "shard_rows": plan.shard_rows, "row_group_rows": plan.row_group_rows, "source": source,
                "source_format_version": src.format_version}
    m["parent"] = {"name": src.manifest["name"], "version": src.manifest["version"], "relation": "convert",
                   "settings": settings}
    m["storage"] = versioning.storage_block(plan.fmt, plan.shard_rows, plan.row_group_rows)
    idx_dtype = next((col["dtype"] for col in columns if col["role"] == "topk_indices"), versioning.index_dtype(c))
    m["targets"] = versioning.targets_block(keep_logits=plan.keep_logits, dtype=plan.dtype, k=plan.k,
                                            indices_dtype=idx_dtype, tail=tail, labels=m["targets"]["labels"])
    m["columns"] = columns
    m["statistics"] = statistics
    return m
