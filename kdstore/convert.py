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
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore import __version__, targets
from kdstore.compare import tensor
from kdstore.errors import ConfigError
from kdstore.manifest import FORMAT_VERSION
from kdstore.remote import is_remote, is_url, resolve_any
from kdstore.store import Version, VersionWriter, check_name, decode_bfloat16, encode_bfloat16
from kdstore.store.formats import FORMATS

LOGITS_DTYPES = ("float16", "bfloat16", "float32")
_TEACHER_ROLES = ("logits", "topk_indices", "topk_values", "logsumexp")


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
            errors.append(f"--to {self.to!r}: expected one of {', '.join(FORMATS)}")
        if self.top_k is not None and self.top_k < 0:
            errors.append(f"--top-k {self.top_k}: must be >= 1, or 0 to store no top-k")
        if self.logits_dtype is not None and self.logits_dtype not in LOGITS_DTYPES:
            errors.append(f"--logits-dtype {self.logits_dtype!r}: expected one of {', '.join(LOGITS_DTYPES)}")
        for opt, v in (("--shard-rows", self.shard_rows), ("--row-group-rows", self.row_group_rows)):
            if v is not None and v < 1:
                errors.append(f"{opt} {v}: must be >= 1")
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


def _index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def _plan(src: Version, cfg: ConvertConfig) -> _Plan:
    m = src.manifest
    c = src.num_classes
    src_k = src.top_k
    src_dtype = (m["targets"]["logits"] or {}).get("dtype") or (m["targets"]["top_k"] or {}).get("values_dtype")
    k = src_k if cfg.top_k is None else (cfg.top_k or None)
    keep = src.has_logits if cfg.keep_logits is None else cfg.keep_logits
    dtype = cfg.logits_dtype or src_dtype
    if keep and not src.has_logits:
        raise ConfigError(f"--logits: {src.ref} stores no full logits (labeled with --no-logits), so the new version "
                          "cannot have them; pass --no-logits")
    if not keep and not k:
        raise ConfigError("--no-logits with --top-k 0 would store no targets; keep the logits or give --top-k K")
    if k is not None and k > c:
        raise ConfigError(f"--top-k {k}: {src.ref} has {c} classes; use 1..{c}")
    from_logits = bool(k) and (src_k is None or k > src_k)
    if from_logits and not src.has_logits:
        raise ConfigError(f"--top-k {k}: {src.ref} stores top-{src_k} and no full logits, so a larger top-k cannot be "
                          f"made; use --top-k {src_k} or less (or relabel with `kdstore label`)")
    src_vdtype = (m["targets"]["top_k"] or {}).get("values_dtype")
    recompute = bool(k) and (k != src_k or dtype != src_vdtype)
    storage = m["storage"]
    return _Plan(cfg.to or storage["format"], k, str(dtype), keep, from_logits, recompute,
                 cfg.shard_rows or storage["shard_rows"], cfg.row_group_rows or storage["row_group_rows"])


def _columns(src: Version, plan: _Plan) -> list[dict[str, Any]]:
    """Column specs of the new version, in the order `kdstore label` writes them; unknown roles are kept."""
    c = src.num_classes
    by_role = {(col["role"], col.get("teacher")): col for col in src.manifest["columns"]}
    cols: list[dict[str, Any]] = [dict(by_role[("sample_id", None)])]
    if ("label", None) in by_role:
        cols.append(dict(by_role[("label", None)]))
    for tid in src.teacher_ids:
        if plan.keep_logits:
            cols.append({"name": f"{tid}_logits", "role": "logits", "teacher": tid, "dtype": plan.dtype, "shape": [c]})
        if plan.k:
            src_idx = by_role.get(("topk_indices", tid))
            idx_dtype = src_idx["dtype"] if (src_idx and not plan.from_logits) else _index_dtype(c)
            cols.append({"name": f"{tid}_topk_indices", "role": "topk_indices", "teacher": tid, "dtype": idx_dtype,
                         "shape": [plan.k]})
            cols.append({"name": f"{tid}_topk_values", "role": "topk_values", "teacher": tid, "dtype": plan.dtype,
                         "shape": [plan.k]})
        cols.append(dict(by_role[("logsumexp", tid)]))
    known = {"sample_id", "label", *_TEACHER_ROLES}
    cols += [dict(col) for col in src.manifest["columns"] if col["role"] not in known]
    return cols


def _encode(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> storage array of `dtype` (bfloat16 as uint16 bits)."""
    a32 = np.asarray(a, dtype=np.float32)
    if dtype == "float32":
        return a32
    if dtype == "float16":
        return a32.astype(np.float16)
    return encode_bfloat16(a32)


def _decoded(src: Version, name: str, raw: np.ndarray) -> np.ndarray:
    return decode_bfloat16(raw) if src.columns[name]["dtype"] == "bfloat16" else raw


def convert(cfg: ConvertConfig, progress: Callable[[int], None] | None = None) -> ConvertResult:
    """Write a new version converted from `cfg.source` (see module docstring); return its path and manifest."""
    if cfg.out is None and is_remote(cfg.source):
        raise ConfigError(f"{cfg.source} is remote: pass --out STORE (a local directory) for the new version, "
                          "then `kdstore push` it")
    if cfg.out is not None and is_url(cfg.out):
        raise ConfigError(f"--out {cfg.out}: convert writes to a local store directory; write there, then "
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
    shard_meta = {"format_version": FORMAT_VERSION, "name": name, "columns": columns,
                  "teachers": [t["sha256"] for t in src.manifest["teachers"]]}
    key = {"source_files": [f["sha256"] for f in src.files], "settings": {**asdict(_plan(src, cfg)), "name": name}}
    run_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    c = src.num_classes
    acc = {tid: {"mass": 0.0, "fid": {}} for tid in src.teacher_ids}
    from kdstore.labeling import FIDELITY_TEMPERATURES

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
            cols, stats = _convert_block(src, block, columns, plan, c, FIDELITY_TEMPERATURES)
            for tid, s in stats.items():
                acc[tid]["mass"] += s["mass"]
                for t, v in s["fid"].items():
                    acc[tid]["fid"][t] = acc[tid]["fid"].get(t, 0.0) + v
            if index not in done:
                writer.write(index, start, cols, {})
            if progress:
                progress(stop - start)
        manifest = _manifest(src, plan, columns, acc, settings, FIDELITY_TEMPERATURES)
        path = writer.commit(manifest)
    return ConvertResult(path, json.loads((path / "manifest.json").read_text("utf-8")), str(src.ref), len(done))


def _convert_block(src: Version, block: dict[str, np.ndarray], columns: list[dict[str, Any]], plan: _Plan, c: int,
                   temps: tuple[float, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    out: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {}
    for tid in src.teacher_ids:
        lcol = src.column_for("logits", tid)
        z = torch.from_numpy(_decoded(src, lcol, block[lcol]).astype(np.float32)) if lcol else None
        lse_name = src.column_for("logsumexp", tid) or ""
        lse = tensor(block[lse_name])
        if plan.keep_logits:
            assert lcol is not None and z is not None
            same = src.columns[lcol]["dtype"] == plan.dtype
            out[f"{tid}_logits"] = block[lcol] if same else _encode(z.numpy(), plan.dtype)
        if plan.k:
            if plan.from_logits:
                assert z is not None
                v, idx = targets.top_k(z, plan.k)
                values = _encode(v.numpy(), plan.dtype)
                indices = idx.numpy()
            else:
                icol, vcol = src.column_for("topk_indices", tid) or "", src.column_for("topk_values", tid) or ""
                indices = block[icol][:, : plan.k]
                same = src.columns[vcol]["dtype"] == plan.dtype
                values = (np.ascontiguousarray(block[vcol][:, : plan.k]) if same
                          else _encode(_decoded(src, vcol, block[vcol][:, : plan.k]), plan.dtype))
            idx_spec = next(col for col in columns if col["name"] == f"{tid}_topk_indices")
            out[f"{tid}_topk_indices"] = np.ascontiguousarray(indices).astype(idx_spec["dtype"])
            out[f"{tid}_topk_values"] = values
            if plan.recompute_topk_stats:
                vq = torch.from_numpy(decode_bfloat16(values) if plan.dtype == "bfloat16"
                                      else values.astype(np.float32))
                iq = torch.from_numpy(out[f"{tid}_topk_indices"].astype(np.int64))
                s: dict[str, Any] = {"mass": float(torch.exp(vq.double() - lse.double()[:, None])
                                                   .sum(1).clamp(max=1.0).sum()),
                                     "fid": {}}
                if z is not None:
                    tail = (src.manifest["targets"]["top_k"] or {}).get("tail", "uniform")
                    for t, kl in targets.topk_fidelity(z, vq, iq, lse, temps, tail).items():  # type: ignore[arg-type]
                        s["fid"][str(float(t))] = float(kl.double().sum())
                stats[tid] = s
    for col in columns:
        if col["name"] not in out:
            out[col["name"]] = block[col["name"]]  # sample_id, label, log-sum-exp, unknown roles: as stored
    return out, stats


def _manifest(src: Version, plan: _Plan, columns: list[dict[str, Any]], acc: dict[str, Any],
              settings: dict[str, Any], temps: tuple[float, ...]) -> dict[str, Any]:
    m = copy.deepcopy(src.manifest)
    for key in ("name", "version", "created_at", "files", "derived_files"):
        m.pop(key, None)
    tail = (m["targets"]["top_k"] or {}).get("tail", "uniform")
    c = src.num_classes
    m["format_version"] = FORMAT_VERSION
    m["kdstore_version"] = __version__
    m["parent"] = {"name": src.manifest["name"], "version": src.manifest["version"], "relation": "convert",
                   "settings": settings}
    m["storage"] = {"format": plan.fmt, "shard_rows": plan.shard_rows, "row_group_rows": plan.row_group_rows,
                    "compression": "zstd" if plan.fmt == "parquet" else "none"}
    idx_dtype = next((col["dtype"] for col in columns if col["role"] == "topk_indices"), _index_dtype(c))
    m["targets"] = {
        "logits": {"dtype": plan.dtype} if plan.keep_logits else None,
        "top_k": ({"k": plan.k, "values_dtype": plan.dtype, "indices_dtype": idx_dtype, "tail": tail}
                  if plan.k else None),
        "logsumexp": {"dtype": "float32"},
        "labels": m["targets"]["labels"],
    }
    m["columns"] = columns
    rows = src.num_rows
    for tid, entry in m["statistics"].get("teachers", {}).items():
        if not plan.k:
            entry.pop("topk_mass_mean", None)
            entry.pop("topk_fidelity_kl", None)
        elif plan.recompute_topk_stats and tid in acc:
            entry["topk_mass_mean"] = acc[tid]["mass"] / rows
            if src.has_logits:
                fid = acc[tid]["fid"]
                entry["topk_fidelity_kl"] = {t: (fid[t] / rows if math.isfinite(fid.get(t, math.inf)) else None)
                                             for t in (str(float(x)) for x in temps)}
                entry["topk_fidelity_reference"] = (f"stored {src.manifest['targets']['logits']['dtype']} "
                                                    "logits of the parent")
            else:
                entry["topk_fidelity_kl"] = None  # no full logits: the error of a truncated top-k cannot be measured
    return m
