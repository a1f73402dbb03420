"""The rows that choose the best point of a sweep: a ``--val`` file, or the rows ``--val-fraction`` holds out of the
transfer set (`kdstore.data.Holdout`: a hash of sample_id, the same rows in memory and streamed). This, never
``--eval``, is what `kdstore.rundir.best_by_validation` reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdstore.data import Holdout, TrainingData
from kdstore.evaluation import EvalResult, evaluate, evaluate_batches, load_eval_set


@dataclass
class Validation:
    """Where a training run's validation rows come from.

    Attributes:
        data: the run's training data (streamed validation reads the held-out rows from it).
        holdout: the held-out split (``--val-fraction``), or None.
        val_path: a ``--val`` file, or None; `val_set` its (inputs, labels).
        train_rows: the transfer rows left for training.
        memory: the held-out rows as tensors, set by the trainer in memory mode (`kdstore.data.split_memory`).
    """

    data: TrainingData
    holdout: Holdout | None
    val_path: str | None
    val_set: tuple[Tensor, Tensor] | None
    train_rows: int
    memory: dict[str, Tensor] | None = None

    @classmethod
    def open(cls, data: TrainingData, holdout: Holdout | None, val_path: str | None, input_shape: tuple[int, ...],
             train_rows: int) -> Validation:
        """Read a ``--val`` file now (errors before ``--out`` is created)."""
        val_set = None if not val_path else _val_file(data.version.manifest, val_path, input_shape, data.num_classes)
        return cls(data, holdout, val_path, val_set, train_rows)

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> EvalResult | None:
        """(accuracy, errors, mean NLL) on the validation rows, or None without any."""
        if self.val_set is not None:
            return evaluate(model, *self.val_set, device, precision)
        if self.holdout is None:
            return None
        if self.memory is not None:
            return evaluate(model, self.memory["x"], self.memory["label"], device, precision)
        stream = self.data.stream(4096, shuffle=False, holdout=self.holdout, part="val")
        return evaluate_batches(model, ((b["x"], b["label"]) for b in stream), device, precision)

    def info(self) -> dict[str, Any] | None:
        """Where the validation rows come from and how many there are (config.json, summary.json), or None."""
        if self.val_set is not None:
            return {"source": self.val_path, "rows": len(self.val_set[1])}
        if self.holdout is None:
            return None
        return {"source": "held out of the transfer set (a hash of sample_id)", "fraction": self.holdout.fraction,
                "seed": self.holdout.seed, "rows": self.holdout.rows, "train_rows": self.train_rows}


def _val_file(manifest: dict[str, Any], path: str, input_shape: tuple[int, ...],
              num_classes: int) -> tuple[Tensor, Tensor]:
    """A --val file, read with the transfer set's input columns and its label column (or label / y)."""
    label = manifest["transfer_set"]["label_column"]
    cols = manifest["transfer_set"]["inputs"]["columns"]
    return load_eval_set(path, input_columns=() if cols == ["<array>"] else tuple(cols), argument="val",
                         label_column=None if label in (None, "label", "y") else label,
                         input_shape=input_shape, num_classes=num_classes)
