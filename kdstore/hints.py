"""`kdstore train --hint LAYER:STUDENT_MODULE[:WEIGHT]`: a student whose named modules learn to predict stored
teacher features through learned linear regressors (FitNets hints), trained together with the logit loss.

`HintedStudent` wraps the student: its forward returns the student's logits and keeps each hinted module's output
(captured by a forward hook, pooled like the stored feature, flattened) mapped through its regressor, so a DDP
wrapper sees the regressors as part of the module it reduces gradients for. Checkpoints hold the regressors (so
`--resume` continues them); the saved student is `HintedStudent.student` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdstore import feature_losses, features
from kdstore.errors import ConfigError, ShapeMismatchError, arg

HINT_HELP = "LAYER:STUDENT_MODULE[:WEIGHT], e.g. layers.1:layers.3:1.0"


@dataclass(frozen=True)
class HintSpec:
    """A stored teacher feature (by its module name at label time), the student module that learns it, the
    weight of its loss."""

    layer: str
    module: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> HintSpec:
        parts = text.split(":")
        weight = 1.0
        if len(parts) == 3:
            try:
                weight = float(parts[2])
            except ValueError:
                parts = [text]  # reported below
        if len(parts) not in (2, 3) or not all(parts[:2]) or not weight > 0:
            raise ConfigError(f"{arg('hint')} {text!r}: expected {HINT_HELP} (WEIGHT > 0)")
        return cls(parts[0], parts[1], weight)


@dataclass(frozen=True)
class StoredFeature:
    """What a version stores of one teacher feature: its column, width, pooling and variance (the loss scale)."""

    layer: str
    column: str
    width: int
    pool: str
    scale: float
    map_shape: tuple[int, ...] | None = None  # (C, H, W) of a feature map stored whole (no pooling, no projection)


def stored_features(specs: Sequence[HintSpec], manifest: Mapping[str, Any], where: str) -> list[StoredFeature]:
    """The stored feature each hint reads, from the manifest's ``features`` block.

    Raises:
        ConfigError: a version without features, or a LAYER it does not store (the stored ones are listed).
    """
    block = manifest.get("features")
    if not block:
        raise ConfigError(f"{arg('hint')}: {where} stores no teacher features; relabel with `kdstore label "
                          "--features NAME[,NAME...]`")
    layers = {layer["module"]: layer for layer in block["layers"]}
    stats = manifest["statistics"].get("features", {})
    out = []
    for s in specs:
        if s.layer not in layers:
            raise ConfigError(f"{arg('hint')} {s.layer}:{s.module}: {where} stores features of "
                              f"{', '.join(layers)}, not {s.layer!r}")
        layer = layers[s.layer]
        variance = float(stats.get(layer["column"], {}).get("stored_variance") or 1.0)
        shape = tuple(int(x) for x in layer["output_shape"])
        whole_map = len(shape) == 3 and layer["projection"] is None and layer["pool"] == "none"
        out.append(StoredFeature(s.layer, layer["column"], int(layer["stored_shape"][-1]), layer["pool"],
                                 variance if variance > 0 else 1.0, shape if whole_map else None))
    return out


class ConvRegressor(nn.Module):
    """FitNets' convolutional regressor: a student feature map (N, Cs, Hs, Ws) to the teacher's (N, Ct, Ht, Wt)
    stored whole, by one convolution of kernel (Hs - Ht + 1, Ws - Wt + 1) (Romero et al. 2015, section 2.2: far fewer
    parameters than a linear map of the flattened maps), flattened like the stored feature."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
        self.conv = nn.Conv2d(cs, ct, (hs - ht + 1, ws - wt + 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).flatten(1)  # type: ignore[no-any-return]


class HintedStudent(nn.Module):
    """A student plus one regressor per hint: a convolution (`ConvRegressor`) from a student feature map to a teacher
    map stored whole when the student's map is at least as large, else a linear map of the student module's (pooled,
    flattened) output to the stored feature's width. After a forward pass `hinted` holds the regressed outputs, by
    feature column."""

    def __init__(self, student: nn.Module, specs: Sequence[HintSpec], stored: Sequence[StoredFeature],
                 example: Tensor) -> None:
        super().__init__()
        self.student, self.specs, self.stored = student, list(specs), list(stored)
        self.hinted: dict[str, Tensor] = {}
        modules = dict(student.named_modules())
        shapes = _probe(student, modules, self.specs, self.stored, example)
        self.regressors = nn.ModuleList(_regressor(shape, f) for shape, f in zip(shapes, self.stored, strict=True))
        self._captured: dict[int, Tensor] = {}
        for i, s in enumerate(self.specs):
            modules[s.module].register_forward_hook(self._hook(i))

    def _hook(self, i: int) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            self._captured[i] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    def forward(self, x: Tensor) -> Tensor:
        self._captured.clear()
        logits = self.student(x)
        self.hinted = {f.column: reg(self._captured[i] if isinstance(reg, ConvRegressor) else
                                     features.reduce_output(self._captured[i], f.pool, self.specs[i].module, len(x)))
                       for i, (f, reg) in enumerate(zip(self.stored, self.regressors, strict=True))}
        return logits

    def hint_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Sum over hints of weight x `feature_losses.feature_mse` of the last forward pass against the batch's
        stored features (``feature:COLUMN``)."""
        return sum((s.weight * feature_losses.feature_mse(self.hinted[f.column], batch[f"feature:{f.column}"],
                                                          scale=f.scale)
                    for s, f in zip(self.specs, self.stored, strict=True)), torch.zeros((), device=_device(self)))


def with_hints(model: nn.Module, logit_loss: Callable[[Tensor, Mapping[str, Tensor]], Tensor], out: Tensor,
               batch: Mapping[str, Tensor], epoch: int, hint_epochs: int) -> Tensor:
    """A training step's loss: `logit_loss(out, batch)` plus, for a `HintedStudent`, its hints' (FitNets: the
    regressed student features against the stored ones); during the first `hint_epochs` epochs the hints' alone
    (FitNets' stage 1)."""
    if not isinstance(model, HintedStudent):
        return logit_loss(out, batch)
    hint = model.hint_loss(batch)
    return hint if epoch < hint_epochs else logit_loss(out, batch) + hint


def check_student_modules(modules: dict[str, nn.Module], specs: Sequence[HintSpec]) -> None:
    """ConfigError: a hinted module the student does not have (some it has are listed)."""
    for s in specs:
        if not s.module or s.module not in modules:
            shown = [n for n in modules if n and n.count(".") <= 1][:12]
            raise ConfigError(f"{arg('hint')} {s.layer}:{s.module}: the student has no module {s.module!r}; it has "
                              f"{', '.join(shown)}{', ...' if len(modules) > 13 else ''}")


def _regressor(student_shape: tuple[int, ...], f: StoredFeature) -> nn.Module:
    """A convolution for a student map at least as large as a teacher map stored whole, else a linear map of the
    student's (pooled, flattened) output."""
    if f.map_shape is not None and len(student_shape) == 3 and all(
            a >= b for a, b in zip(student_shape[1:], f.map_shape[1:], strict=True)):
        return ConvRegressor(student_shape, f.map_shape)
    width = math.prod(student_shape) if f.pool == "none" or len(student_shape) < 2 else student_shape[0]
    return nn.Linear(width, f.width)


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


@torch.no_grad()
def _probe(student: nn.Module, modules: dict[str, nn.Module], specs: Sequence[HintSpec],
           stored: Sequence[StoredFeature], example: Tensor) -> list[tuple[int, ...]]:
    """The per-row shape of each hinted module's output, from a forward pass over `example`."""
    check_student_modules(modules, specs)
    got = features.probe_outputs(student, [s.module for s in specs], lambda: student(example), "the student",
                                 option="hint")
    shapes = []
    for s in specs:
        out = got.get(s.module)
        if not isinstance(out, Tensor) or out.ndim < 2 or out.shape[0] != len(example):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeMismatchError(f"{arg('hint')} {s.layer}:{s.module}: the student module's output {shape} is "
                                     "not a tensor with one entry per row")
        shapes.append(tuple(int(x) for x in out.shape[1:]))
    return shapes
