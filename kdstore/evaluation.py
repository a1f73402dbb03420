"""How a trained student is measured: accuracy, errors and NLL on a labeled evaluation set, and its agreement with
the (ensembled) teacher on the transfer set."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from kdstore.device import autocast
from kdstore.errors import InputError, arg
from kdstore.transfer import open_transfer

AGREEMENT_BATCH = 4096  # rows per forward when measuring agreement with the teacher


class EvalResult(NamedTuple):
    accuracy: float
    errors: int
    nll: float


def load_eval_set(path: str, *, input_columns: tuple[str, ...], label_column: str | None,
                  input_shape: tuple[int, ...], num_classes: int, argument: str = "eval") -> tuple[Tensor, Tensor]:
    """A labeled evaluation set as (inputs reshaped to `input_shape`, labels), checked against the store's shape
    and classes."""
    ts = open_transfer(path, input_columns=input_columns or None, label_column=label_column, option=argument)
    try:
        if not ts.has_labels:
            hint = f" ({arg(argument + '_label_column')} NAME)" if argument == "eval" else " in 'label' or 'y'"
            raise InputError(f"{arg(argument)} {path}: no label column found; an evaluation set needs labels{hint}")
        x, y = ts.read_rows(0, ts.rows)
    finally:
        ts.close()
    assert y is not None
    if int(np.prod(x.shape[1:])) != int(np.prod(input_shape)):
        raise InputError(f"{arg(argument)} {path}: inputs of shape {x.shape[1:]}, but the transfer set's are "
                         f"{input_shape}; evaluate on data of the same kind")
    if y.min() < 0 or y.max() >= num_classes:
        raise InputError(f"{arg(argument)} {path}: labels span {y.min()}..{y.max()}, outside 0..{num_classes - 1}")
    return torch.from_numpy(x.reshape(len(x), *input_shape)), torch.from_numpy(y)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, precision: str,
             chunk: int = 4096) -> EvalResult:
    """Accuracy, errors and mean NLL of `model` on (x, y), in chunks of `chunk` rows."""
    return evaluate_batches(model, ((x[a : a + chunk], y[a : a + chunk]) for a in range(0, len(x), chunk)), device,
                            precision)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                     precision: str) -> EvalResult:
    """Accuracy, errors and mean NLL of `model` over (inputs, labels) batches (in memory or streamed)."""
    was_training = model.training
    model.eval()
    correct, nll, rows = 0, 0.0, 0
    for xb, yb in batches:
        xb, yb = xb.to(device), yb.to(device)
        with autocast(device, precision):
            out = model(xb)
        logp = torch.log_softmax(out.float(), dim=1)
        correct += int((logp.argmax(1) == yb).sum())
        nll += float(-logp.gather(1, yb[:, None]).sum())
        rows += len(yb)
    model.train(was_training)
    return EvalResult(correct / max(rows, 1), rows - correct, nll / max(rows, 1))


@torch.no_grad()
def agreement_counts(model: nn.Module, batches: Iterable[dict[str, Tensor]],
                     teacher_argmax: Callable[[dict[str, Tensor]], Tensor], device: torch.device,
                     precision: str) -> tuple[int, int]:
    """(rows where the student's argmax equals the teacher's, rows) over `batches`."""
    was_training = model.training
    model.eval()
    agree = total = 0
    for batch in batches:
        if not len(batch["x"]):
            continue
        with autocast(device, precision):
            out = model(batch["x"])
        teacher = teacher_argmax(batch)
        agree += int((out.float().argmax(1) == teacher).sum())
        total += len(teacher)
    model.train(was_training)
    return agree, total
