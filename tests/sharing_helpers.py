"""Helpers shared by the tests of ls / inspect / verify / convert / diff / push (plain functions)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.helpers import run_label


def label_store(data: Any, store: Path) -> dict[str, Path]:
    """A small store with the shapes the sharing commands care about (read-only for the tests: copy first).

    pq: parquet, fp16 logits + top-3, labeled (v1); pq@v2: hdf5, bf16 logits + top-3 (same transfer set)
    topk: parquet, top-2 only, labeled;  ens: two teachers, fp32 logits + top-2, unlabeled (npy transfer set)
    """
    out = {
        "pq": run_label(data.teacher_pt, data.parquet, store, "pq", format="parquet", top_k=3).path,
        "pq2": run_label(data.teacher_pt, data.parquet, store, "pq", format="hdf5", top_k=3,
                         logits_dtype="bfloat16").path,
        "topk": run_label(data.teacher_pt, data.parquet, store, "topk", top_k=2, keep_logits=False).path,
        "ens": run_label([str(data.teacher_pt), data.factory_spec], data.npy, store, "ens", top_k=2,
                         logits_dtype="float32").path,
    }
    return out


def copy_version(src: Path, store: Path, name: str = "copy", version: int = 1) -> Path:
    dst = store / name / f"v{version}"
    shutil.copytree(src, dst)
    return dst


def edit_manifest(version_dir: Path, edit: Any) -> None:
    path = version_dir / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def flip_byte(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    i = len(raw) // 2 if offset is None else offset
    raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])
