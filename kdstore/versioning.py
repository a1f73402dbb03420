"""How a version of teacher targets is laid out and described: the one place `labeling` and `convert` share.

The stored targets of a chunk of rows (`stored_targets`), the column specs, the run key that makes a rerun
resume, the manifest's ``storage`` and ``targets`` blocks, and the statistics of the stored targets, accumulated
chunk by chunk (`TargetStatistics`) so that memory is bounded by a chunk of rows, never by a shard, and a resumed
run keeps the partial sums of the shards it does not redo. The store writes whatever these describe; it knows
nothing of teachers or targets. Every statistic is defined in docs/format.md ("Statistics").
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdstore import __version__, reproducible, targets
from kdstore.store import decode_bfloat16
from kdstore.store.manifest import FORMAT_VERSION

FIDELITY_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
TEACHER_ROLES = ("logits", "topk_indices", "topk_values", "logsumexp", "tail_logmass")
FIDELITY_CLASSES = 2048  # above this many classes, fidelity is measured on every ceil(C / 2048)-th row
CHUNK_ELEMENTS = 1 << 24  # rows x classes handled at once when computing targets and statistics (64 MiB float32)
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- encodings ----------------------------------------------------------------------------------------------------


def index_dtype(num_classes: int) -> str:
    """The dtype of top-k class indices: int16 while every class index fits, else int32."""
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def logits_storage(precision: str) -> str:
    """The on-disk dtype of full logits of `precision`: float16 as float16, bfloat16 and float32 as float32."""
    return "float16" if precision == "float16" else "float32"


def as_stored(values: Tensor, precision: str) -> Tensor:
    """`values` rounded to `precision` and back to float32: exactly what a reader of the version will see."""
    return values.to(_TORCH_DTYPES[precision]).float()


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A stored float column back to numbers (format 1's bfloat16 bits -> float32; others unchanged)."""
    return decode_bfloat16(raw) if dtype == "bfloat16" else raw


def rows_per_chunk(num_classes: int) -> int:
    """How many rows of C classes to handle at once so a chunk holds about CHUNK_ELEMENTS values."""
    return max(1, CHUNK_ELEMENTS // max(num_classes, 1))


def fidelity_stride(num_classes: int) -> int:
    """Fidelity is measured on the rows with ``sample_id % stride == 0`` (every row up to FIDELITY_CLASSES): it costs
    ten softmaxes over C per row, more than the rest of labeling together at LLM-sized C."""
    return max(1, math.ceil(num_classes / FIDELITY_CLASSES))


@dataclass
class StoredTargets:
    """One teacher's targets for a chunk of rows, as a reader of the version will see them (float32 on the
    compute device; `logits` in its storage dtype). `values` are largest first."""

    logits: Tensor | None  # (N, C)
    values: Tensor | None  # (N, k) float32, rounded to the storage precision
    indices: Tensor | None  # (N, k) int64
    lse: Tensor  # (N,) float32, of the unrounded logits
    tail: Tensor | None  # (N,) float32 log mass outside the top-k, of the unrounded logits

    def columns(self, teacher: str, index_dtype_name: str) -> dict[str, np.ndarray]:
        """The chunk's column arrays for teacher `teacher` (names as `column_specs` gives them)."""
        out = {f"{teacher}_logsumexp": self.lse.cpu().numpy()}
        if self.logits is not None:
            out[f"{teacher}_logits"] = self.logits.cpu().numpy()
        if self.values is not None and self.indices is not None and self.tail is not None:
            out[f"{teacher}_topk_indices"] = self.indices.cpu().numpy().astype(index_dtype_name)
            out[f"{teacher}_topk_values"] = self.values.cpu().numpy()
            out[f"{teacher}_tail_logmass"] = self.tail.cpu().numpy()
        return out

    def log_probs(self, num_classes: int, tail: str) -> Tensor:
        """(N, C) float32 log soft targets at T = 1 as a reader rebuilds them (full logits if stored)."""
        if self.logits is not None:
            return torch.log_softmax(self.logits.float(), dim=1)
        assert self.values is not None and self.indices is not None
        return targets.log_soft_targets_topk(self.values, self.indices, self.lse, num_classes, 1.0, tail, self.tail)


def stored_targets(z: Tensor, *, k: int | None, keep_logits: bool, precision: str,
                   lse: Tensor | None = None, scratch: Tensor | None = None) -> StoredTargets:
    """What a version stores of the (N, C) float32 logits `z`: the logits at their storage dtype, the top-k
    (values rounded to `precision`, largest first), and the log-sum-exp and log tail mass of the unrounded logits.

    Args:
        lse: overrides the log-sum-exp (`convert` keeps the one computed at label time from the unrounded logits).
        scratch: an (N, C) float32 buffer reused across calls: the log-sum-exp and the tail then take one
            exponential pass and no allocation (`targets.logsumexp_and_tail`).
    """
    z = z.float()
    logits = None
    if keep_logits:
        logits = (as_stored(z, precision) if precision == "bfloat16"
                  else z.to(_TORCH_DTYPES[logits_storage(precision)], copy=True))
    if not k:
        lse = (targets.logsumexp_into(z, scratch) if scratch is not None else targets.logsumexp(z)) if lse is None \
            else lse
        return StoredTargets(logits, None, None, lse.float(), None)
    v, idx = targets.top_k(z, k)
    if lse is None and scratch is not None:  # labeling: one exponential pass for both
        lse, tail = targets.logsumexp_and_tail(z, idx, scratch)
    else:
        lse = targets.logsumexp(z) if lse is None else lse.float()
        tail = targets.tail_logmass(z, idx, lse)
    return StoredTargets(logits, as_stored(v, precision), idx, lse, tail)


def truncated_targets(values: Tensor, indices: Tensor, lse: Tensor, tail: Tensor | None, *, k: int,
                      precision: str) -> StoredTargets:
    """A stored top-k cut to its first `k` entries (largest first), its values re-rounded to `precision`.

    The new tail holds the old tail plus the dropped entries: ``t' = logaddexp(t, logsumexp(v_dropped - L))``. A
    format-1 top-k has no tail column; its tail is then derived as format-1 readers derive it,
    ``log(1 - sum_{i<k} exp(v_i - L))`` with the sum capped below 1 (docs/format.md)."""
    v, lse = values.float(), lse.float()
    if tail is None:
        mass = torch.exp(torch.logsumexp(v[:, :k] - lse[:, None], dim=1)).clamp(max=1.0 - 1e-7)
        tail = torch.log1p(-mass)
    kept, idx, new_tail = targets.truncate_topk(v, indices, lse, tail, k)
    assert new_tail is not None
    return StoredTargets(None, as_stored(kept, precision), idx.long(), lse, new_tail)


# --- columns, keys, manifest blocks ----------------------------------------------------------------------------------


def column_specs(teacher_ids: Sequence[str], num_classes: int, *, k: int | None, keep_logits: bool, dtype: str,
                 labels: bool, indices_dtype: str | None = None) -> list[dict[str, Any]]:
    """The column specs of a classification version, in file order: sample_id, label, then per teacher its
    logits, top-k indices and values, log-sum-exp and log tail mass. `dtype` is the storage precision of logits and
    top-k values; a spec's ``dtype`` is the on-disk type and ``precision`` says when its values are exact in a
    narrower float (docs/format.md)."""
    cols: list[dict[str, Any]] = [{"name": "sample_id", "role": "sample_id", "teacher": None, "dtype": "int64",
                                   "shape": []}]
    if labels:
        cols.append({"name": "label", "role": "label", "teacher": None, "dtype": "int64", "shape": []})
    for tid in teacher_ids:
        if keep_logits:
            spec = {"name": f"{tid}_logits", "role": "logits", "teacher": tid, "dtype": logits_storage(dtype),
                    "shape": [num_classes]}
            cols.append({**spec, "precision": dtype} if dtype == "bfloat16" else spec)
        if k:
            cols.append({"name": f"{tid}_topk_indices", "role": "topk_indices", "teacher": tid,
                         "dtype": indices_dtype or index_dtype(num_classes), "shape": [k]})
            spec = {"name": f"{tid}_topk_values", "role": "topk_values", "teacher": tid, "dtype": "float32",
                    "shape": [k]}
            cols.append({**spec, "precision": dtype} if dtype != "float32" else spec)
        cols.append({"name": f"{tid}_logsumexp", "role": "logsumexp", "teacher": tid, "dtype": "float32", "shape": []})
        if k:
            cols.append({"name": f"{tid}_tail_logmass", "role": "tail_logmass", "teacher": tid, "dtype": "float32",
                         "shape": []})
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
        "kind": "classification",
        "logits": {"dtype": dtype} if keep_logits else None,
        "top_k": ({"k": k, "values_dtype": dtype, "indices_dtype": indices_dtype, "tail": tail,
                   "tail_logmass": True} if k else None),
        "logsumexp": {"dtype": "float32"},
        "labels": labels,
    }


def manifest_head() -> dict[str, Any]:
    """The fields every new manifest starts with (the writer adds name, version, created_at and files)."""
    return {"format_version": FORMAT_VERSION, "kdstore_version": __version__}


# --- statistics ------------------------------------------------------------------------------------------------------


class TargetStatistics:
    """The partial sums behind a version's ``statistics``, added chunk by chunk (`add`), kept per shard in the
    staging directory (`partial`), combined at commit (`combine`). Definitions: docs/format.md, "Statistics"."""

    def __init__(self, teacher_ids: Sequence[str], num_classes: int, k: int | None, tail: str) -> None:
        self.ids, self.c, self.k, self.tail = list(teacher_ids), num_classes, k, tail
        self.stride = fidelity_stride(num_classes)
        self.sums: dict[str, Any] = {"rows": 0, "labeled": 0, "ensemble_correct": 0, "teachers": {
            tid: {"correct": 0, "entropy_sum": 0.0, "topk_mass_sum": 0.0, "fidelity_rows": 0,
                  "fidelity_sum": {str(t): 0.0 for t in FIDELITY_TEMPERATURES}, "identity_correct": 0,
                  "identity_labeled": 0} for tid in self.ids}}

    def fidelity_rows(self, sample_ids: Tensor) -> Tensor:
        """Positions (in a chunk of rows) of the rows the top-k fidelity is measured on: ``sample_id % stride == 0``."""
        return torch.nonzero(sample_ids % self.stride == 0).flatten()

    def add(self, sample_ids: Tensor, labels: Tensor | None, stored: Mapping[str, StoredTargets],
            reference: Mapping[str, Tensor | None], identity: Tensor | None = None) -> None:
        """Add a chunk of rows: every teacher's stored targets, and the logits of the chunk's `fidelity_rows` to
        measure the top-k against when no full logits are stored (the teacher's exact logits at label time, or the
        parent's stored ones; None: not measurable). `identity` marks rows that are unaugmented views, whose
        accuracy is also counted apart (teacher accuracy on views against originals)."""
        n = len(sample_ids)
        self.sums["rows"] += n
        self.sums["labeled"] += n if labels is not None else 0
        probs_sum = None
        for tid in self.ids:
            st, s = stored[tid], self.sums["teachers"][tid]
            dense = st.logits is not None or (labels is not None and len(self.ids) > 1)
            logp = st.log_probs(self.c, self.tail) if dense else None
            if logp is not None:
                s["entropy_sum"] += float(targets.entropy(logp).double().sum())
            else:  # top-k only: O(k) per row, whatever C; small operations, on one thread (`one_thread`)
                assert st.values is not None and st.tail is not None
                with reproducible.one_thread():
                    s["entropy_sum"] += float(targets.topk_entropy(st.values, st.lse, st.tail, self.c, self.tail)
                                              .double().sum())
            if labels is not None:
                top1 = logp.argmax(1) if logp is not None else st.indices[:, 0]  # type: ignore[index]
                s["correct"] += int((top1 == labels).sum())
                if identity is not None:
                    s["identity_correct"] += int(((top1 == labels) & identity).sum())
                    s["identity_labeled"] += int(identity.sum())
                if logp is not None and len(self.ids) > 1:
                    probs_sum = logp.exp() if probs_sum is None else probs_sum + logp.exp()
            if st.tail is not None:
                with reproducible.one_thread():  # a few rows (1 in `stride` at large C) and (N,) arrays
                    s["topk_mass_sum"] += float((-torch.expm1(st.tail.double())).sum())
                    rows = self.fidelity_rows(sample_ids)
                    ref = st.logits[rows] if st.logits is not None else reference.get(tid)
                    if ref is not None and len(rows):
                        self._add_fidelity(s, rows, ref, st)
        if probs_sum is not None and labels is not None:
            self.sums["ensemble_correct"] += int((probs_sum.argmax(1) == labels).sum())

    def _add_fidelity(self, s: dict[str, Any], rows: Tensor, ref: Tensor, st: StoredTargets) -> None:
        assert st.values is not None and st.indices is not None
        kl = targets.topk_fidelity(ref.float(), st.values[rows], st.indices[rows], st.lse[rows],
                                   FIDELITY_TEMPERATURES, self.tail, st.tail[rows] if st.tail is not None else None)
        s["fidelity_rows"] += len(rows)
        for t, v in kl.items():
            s["fidelity_sum"][str(t)] += float(v.double().sum())

    def partial(self) -> dict[str, Any]:
        """The JSON-able partial sums (kept in a shard's sidecar)."""
        return json.loads(json.dumps(self.sums))

    def combine(self, parts: Sequence[Mapping[str, Any]], fidelity_reference: str | None) -> dict[str, Any]:
        """The manifest's ``statistics`` from the shards' partial sums (`partial`).

        Args:
            fidelity_reference: what the top-k was measured against ("stored logits", "teacher logits at label
                time") or None when it could not be measured.
        """
        rows = sum(p["rows"] for p in parts)
        labeled = sum(p["labeled"] for p in parts)
        out: dict[str, Any] = {"rows": rows, "labeled_rows": labeled, "teachers": {}}
        for tid in self.ids:
            tp = [p["teachers"][tid] for p in parts]
            correct = sum(s["correct"] for s in tp)
            entry: dict[str, Any] = {"accuracy": (correct / labeled) if labeled else None,
                                     "errors": (labeled - correct) if labeled else None,
                                     "mean_entropy_nats": sum(s["entropy_sum"] for s in tp) / rows}
            id_labeled = sum(s.get("identity_labeled", 0) for s in tp)
            if id_labeled:  # views: the teacher on unaugmented views against augmented ones
                id_correct = sum(s["identity_correct"] for s in tp)
                entry["accuracy_identity_views"] = id_correct / id_labeled
                entry["accuracy_augmented_views"] = ((correct - id_correct) / (labeled - id_labeled)
                                                     if labeled > id_labeled else None)
            if self.k:
                entry["topk_mass_mean"] = sum(s["topk_mass_sum"] for s in tp) / rows
                fid_rows = sum(s["fidelity_rows"] for s in tp)
                entry["topk_fidelity_kl"] = (mean_fidelity([s["fidelity_sum"] for s in tp], fid_rows)
                                             if fid_rows and fidelity_reference else None)
                entry["topk_fidelity_rows"] = fid_rows if fidelity_reference else 0
                entry["topk_fidelity_reference"] = fidelity_reference
            out["teachers"][tid] = entry
        if self.k:
            out["fidelity_stride"] = self.stride
        if len(self.ids) > 1 and labeled:
            correct = sum(p["ensemble_correct"] for p in parts)
            out["ensemble"] = {"combine": "mean-prob", "accuracy": correct / labeled, "errors": labeled - correct}
        return out


def mean_fidelity(sums: Sequence[Mapping[str, float]], rows: int) -> dict[str, float | None]:
    """Per-temperature mean KL from per-shard sums; JSON has no Infinity, so a KL that is not finite (always,
    for the "drop" tail) is recorded as null."""
    out: dict[str, float | None] = {}
    for t in (str(float(x)) for x in FIDELITY_TEMPERATURES):
        mean = sum(s.get(t, 0.0) for s in sums) / max(rows, 1)
        out[t] = mean if math.isfinite(mean) else None
    return out
