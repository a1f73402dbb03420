"""The embedded default job: label the shipped digits set with the shipped teacher, then distill students.

Data: UCI optical digits (8x8, 10 classes) as shipped in kdstore/datasets (see its README.md); teacher: an
MLP built reproducibly by scripts/build_digits_teacher.py. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore.labeling import LabelConfig, LabelResult, label
from kdstore.rundir import RunResult
from kdstore.store.files import atomic_path
from kdstore.teachers import load_teacher
from kdstore.training import TrainConfig, Trainer
from kdstore.transfer import open_transfer

STUDENT = "mlp:64-32-10"
TEMPERATURES = (2.0, 4.0, 8.0)
ALPHA = 0.9
EPOCHS = 100
LR = 1e-2
# Hinton et al.'s point: soft targets carry much more information per example than hard labels, which shows
# most when the transfer set is small. The teacher was trained on all 1,347 training images; the student
# gets the first TRANSFER_ROWS of them. (On all 1,347 the gain is ~0.8 points; see kdstore/datasets/README.md.)
TRANSFER_ROWS = 200


def dataset_file(name: str) -> Path:
    """Path of a file shipped in kdstore/datasets."""
    return Path(str(resources.files("kdstore.datasets").joinpath(name)))


def teacher_spec() -> str:
    meta = json.loads(dataset_file("digits_teacher.json").read_text("utf-8"))
    return f"{meta['spec']}@{dataset_file('digits_teacher.safetensors')}"


@dataclass
class QuickstartResult:
    label: LabelResult
    teacher_test_accuracy: float
    teacher_test_errors: int
    runs: list[RunResult]
    out: Path


def teacher_test_accuracy(spec: str, test: Path) -> tuple[float, int]:
    """The teacher's accuracy on the test set (the teacher runs here, once; training never runs it)."""
    t = load_teacher(spec)
    ts = open_transfer(test, option="eval")
    x, y = ts.read_rows(0, ts.rows)
    with torch.inference_mode():
        pred = t.module(torch.from_numpy(x)).argmax(1).numpy()
    assert y is not None
    errors = int((pred != y).sum())
    return 1 - errors / len(y), errors


def run(out: Path, *, student: str = STUDENT, temperatures: tuple[float, ...] = TEMPERATURES,
        epochs: int = EPOCHS, device: str = "auto", seed: int = 0, progress: Any = None) -> QuickstartResult:
    """label -> hard-label student -> distilled students at each temperature; outputs under `out`."""
    test = dataset_file("digits_test.parquet")
    train = write_subset(dataset_file("digits_train.parquet"), out / f"digits_train_first{TRANSFER_ROWS}.parquet",
                         TRANSFER_ROWS)
    spec = teacher_spec()
    lab = label(LabelConfig(teachers=(spec,), transfer=str(train), out=str(out / "targets"), name="digits",
                            top_k=3, device=device, batch_size=512), progress=progress)
    acc, errors = teacher_test_accuracy(spec, test)
    ref = f"{lab.path.parent}@v{lab.manifest['version']}"
    runs_dir = out / f"runs-v{lab.manifest['version']}"
    common: dict[str, Any] = dict(targets=ref, student=student, epochs=epochs, batch_size=64, lr=LR,
                                  eval=str(test), device=device, seeds=(seed,), transfer=str(train))
    results: list[RunResult] = []
    results += Trainer(TrainConfig(out=str(runs_dir / "hard"), losses="hard", **common)).run()
    results += Trainer(TrainConfig(out=str(runs_dir / "kd"), losses="kd", temperatures=temperatures,
                                   alphas=(ALPHA,), **common)).run()
    return QuickstartResult(lab, acc, errors, results, runs_dir)


def write_subset(source: Path, dest: Path, rows: int) -> Path:
    """The first `rows` rows of a Parquet file (same schema and metadata), written once, atomically."""
    import pyarrow.parquet as pq

    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(source).slice(0, rows)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, row_group_size=64, compression="zstd")
    return dest


def seconds_summary(results: list[RunResult]) -> float:
    return float(np.sum([r.train_seconds for r in results]))
