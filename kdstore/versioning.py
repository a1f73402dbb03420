"""How a version of teacher targets is laid out and described: the one place `labeling` and `convert` share.

Storage encodings of logits, the column specs, the run key that makes a rerun resume, the manifest's ``storage``
and ``targets`` blocks, and the statistics of the stored targets (accumulated per shard so a resumed run keeps
the partial sums of the shards it does not redo). The store writes whatever these describe; the store itself
knows nothing of teachers or targets.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdstore import __version__, targets
from kdstore.store import decode_bfloat16, encode_bfloat16
from kdstore.store.manifest import FORMAT_VERSION

FIDELITY_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
TEACHER_ROLES = ("logits", "topk_indices", "topk_values", "logsumexp")
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- encodings ----------------------------------------------------------------------------------------------------


def index_dtype(num_classes: int) -> str:
    """The dtype of top-k class indices: int16 while every class index fits, else int32."""
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def encode(values: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> their storage array of `dtype` (bfloat16 as uint16 bits, rounded to nearest even)."""
    a = values.float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=np.float32)
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.astype(np.float16)
    return encode_bfloat16(a)


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A stored float column back to numbers (bfloat16 bits -> float32; others unchanged)."""
    return decode_bfloat16(raw) if dtype == "bfloat16" else raw


def as_stored(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """`values` rounded to the storage dtype and back to float32: what a reader of the version will see."""
    return values.to(_TORCH_DTYPES[dtype]).float()


# --- columns, keys, manifest blocks ----------------------------------------------------------------------------------


def column_specs(teacher_ids: Sequence[str], num_classes: int, *, k: int | None, keep_logits: bool, dtype: str,
                 labels: bool, indices_dtype: str | None = None) -> list[dict[str, Any]]:
    """The column specs of a classification version, in file order: sample_id, label, then per teacher its
    logits, top-k indices and values, and log-sum-exp."""
    cols: list[dict[str, Any]] = [{"name": "sample_id", "role": "sample_id", "teacher": None, "dtype": "int64",
                                   "shape": []}]
    if labels:
        cols.append({"name": "label", "role": "label", "teacher": None, "dtype": "int64", "shape": []})
    for tid in teacher_ids:
        if keep_logits:
            cols.append({"name": f"{tid}_logits", "role": "logits", "teacher": tid, "dtype": dtype,
                         "shape": [num_classes]})
        if k:
            cols.append({"name": f"{tid}_topk_indices", "role": "topk_indices", "teacher": tid,
                         "dtype": indices_dtype or index_dtype(num_classes), "shape": [k]})
            cols.append({"name": f"{tid}_topk_values", "role": "topk_values", "teacher": tid, "dtype": dtype,
                         "shape": [k]})
        cols.append({"name": f"{tid}_logsumexp", "role": "logsumexp", "teacher": tid, "dtype": "float32", "shape": []})
    return cols


def run_key(material: dict[str, Any]) -> str:
    """The hex digest of everything that determines a version's bytes: a rerun with the same key resumes."""
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def shard_metadata(name: str, columns: list[dict[str, Any]], teacher_sha256: Sequence[str]) -> dict[str, Any]:
    """The JSON embedded in every data file (no times: it must not vary between runs)."""
    return {"format_version": FORMAT_VERSION, "name": name, "columns": columns, "teachers": list(teacher_sha256)}


def storage_block(fmt: str, shard_rows: int, row_group_rows: int) -> dict[str, Any]:
    return {"format": fmt, "shard_rows": shard_rows, "row_group_rows": row_group_rows,
            "compression": "zstd" if fmt == "parquet" else "none"}


def targets_block(*, keep_logits: bool, dtype: str, k: int | None, indices_dtype: str, tail: str,
                  labels: bool) -> dict[str, Any]:
    return {
        "logits": {"dtype": dtype} if keep_logits else None,
        "top_k": {"k": k, "values_dtype": dtype, "indices_dtype": indices_dtype, "tail": tail} if k else None,
        "logsumexp": {"dtype": "float32"},
        "labels": labels,
    }


def manifest_head() -> dict[str, Any]:
    """The fields every new manifest starts with (the writer adds name, version, created_at and files)."""
    return {"format_version": FORMAT_VERSION, "kdstore_version": __version__}


# --- statistics ------------------------------------------------------------------------------------------------------


def fidelity_sums(logits: torch.Tensor, stored_values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
                  tail: str) -> dict[str, float]:
    """Summed per-row KL(exact || rebuilt from the stored top-k) at each of FIDELITY_TEMPERATURES."""
    fid = targets.topk_fidelity(logits, stored_values, indices, lse, FIDELITY_TEMPERATURES, tail)  # type: ignore[arg-type]
    return {str(float(t)): float(kl.double().sum()) for t, kl in fid.items()}


def teacher_partial(z: torch.Tensor, logp: torch.Tensor, y: torch.Tensor | None, lse: torch.Tensor,
                    topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, tail: str) -> dict[str, Any]:
    """One shard's partial statistics of one teacher, from its exact float32 logits `z` (N, C).

    Args:
        logp: (N, C) ``log_softmax(z)``.
        y: (N,) labels on the same device, or None.
        lse: (N,) log-sum-exp of `z`.
        topk: (values as computed, values as stored, indices) when a top-k is stored.
    """
    entry: dict[str, Any] = {"entropy_sum": float(targets.entropy(logp).double().sum()),
                             "correct": int((z.argmax(1) == y).sum()) if y is not None else 0,
                             "topk_mass_sum": 0.0, "fidelity_sum": {}}
    if topk is not None:
        v, vq, idx = topk
        entry["topk_mass_sum"] = float(torch.exp(v - lse[:, None]).double().sum())
        entry["fidelity_sum"] = fidelity_sums(z, vq, idx, lse, tail)
    return entry


def combine_statistics(parts: list[dict[str, Any]], ids: Sequence[str], k: int | None) -> dict[str, Any]:
    """The manifest's ``statistics`` block from the shards' partial statistics."""
    rows = sum(p["rows"] for p in parts)
    labeled = sum(p["labeled"] for p in parts)
    out: dict[str, Any] = {"rows": rows, "labeled_rows": labeled, "teachers": {}}
    for tid in ids:
        tp = [p["teachers"][tid] for p in parts]
        correct = sum(s["correct"] for s in tp)
        entry: dict[str, Any] = {
            "accuracy": (correct / labeled) if labeled else None,
            "errors": (labeled - correct) if labeled else None,
            "mean_entropy_nats": sum(s["entropy_sum"] for s in tp) / rows,
        }
        if k:
            entry["topk_mass_mean"] = sum(s["topk_mass_sum"] for s in tp) / rows
            entry["topk_fidelity_kl"] = mean_fidelity([s["fidelity_sum"] for s in tp], rows)
        out["teachers"][tid] = entry
    if len(ids) > 1 and labeled:
        correct = sum(p["ensemble_correct"] for p in parts)
        out["ensemble"] = {"combine": "mean-prob", "accuracy": correct / labeled, "errors": labeled - correct}
    return out


def mean_fidelity(sums: list[dict[str, float]], rows: int) -> dict[str, float | None]:
    """Per-temperature mean KL from per-shard sums; JSON has no Infinity, so a KL that is not finite (always,
    for the "drop" tail) is recorded as null."""
    out: dict[str, float | None] = {}
    for t in (str(float(x)) for x in FIDELITY_TEMPERATURES):
        mean = sum(s.get(t, 0.0) for s in sums) / rows
        out[t] = mean if math.isfinite(mean) else None
    return out


def stored_topk_mass_sum(stored_values: torch.Tensor, lse: torch.Tensor) -> float:
    """Summed per-row probability mass of the stored top-k values (float64, each row capped at 1)."""
    return float(torch.exp(stored_values.double() - lse.double()[:, None]).sum(1).clamp(max=1.0).sum())
