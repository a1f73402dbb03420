"""`kdstore train --hint LAYER:STUDENT_MODULE[:WEIGHT]`: a student whose named modules learn to predict stored
teacher features through learned linear regressors (FitNets hints), trained together with the logit loss.

`HintedStudent` wraps the student: its forward returns the student's logits and keeps each hinted module's output
(captured by a forward hook, pooled like the stored feature, flattened) mapped through its regressor, so a DDP
wrapper sees the regressors as part of the module it reduces gradients for. Checkpoints hold the regressors (so
`--resume` continues them); the saved student is `HintedStudent.student` alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
        out.append(StoredFeature(s.layer, layer["column"], int(layer["stored_shape"][-1]), layer["pool"],
                                 variance if variance > 0 else 1.0))
    return out


class HintedStudent(nn.Module):
    """A student plus one linear regressor per hint, from its module's (pooled, flattened) output to the stored
    feature's width. After a forward pass `hinted` holds the regressed outputs, by feature column."""

    def __init__(self, student: nn.Module, specs: Sequence[HintSpec], stored: Sequence[StoredFeature],
                 example: Tensor) -> None:
        super().__init__()
        self.student, self.specs, self.stored = student, list(specs), list(stored)
        self.hinted: dict[str, Tensor] = {}
        modules = dict(student.named_modules())
        widths = _probe(student, modules, self.specs, self.stored, example)
        self.regressors = nn.ModuleList(nn.Linear(w, f.width) for w, f in zip(widths, self.stored, strict=True))
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
        self.hinted = {f.column: reg(features.reduce_output(self._captured[i], f.pool, self.specs[i].module, len(x)))
                       for i, (f, reg) in enumerate(zip(self.stored, self.regressors, strict=True))}
        return logits

    def hint_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Sum over hints of weight x `feature_losses.feature_mse` of the last forward pass against the batch's
        stored features (``feature:COLUMN``)."""
        return sum((s.weight * feature_losses.feature_mse(self.hinted[f.column], batch[f"feature:{f.column}"],
                                                          scale=f.scale)
                    for s, f in zip(self.specs, self.stored, strict=True)), torch.zeros((), device=_device(self)))


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


@torch.no_grad()
def _probe(student: nn.Module, modules: dict[str, nn.Module], specs: Sequence[HintSpec],
           stored: Sequence[StoredFeature], example: Tensor) -> list[int]:
    """The width of each hinted module's (pooled, flattened) output, from a forward pass over `example`."""
    for s in specs:
        if s.module not in modules or not s.module:
            shown = [n for n in modules if n][:12]
            raise ConfigError(f"{arg('hint')} {s.layer}:{s.module}: the student has no module {s.module!r}; it has "
                              f"{', '.join(shown)}{', ...' if len(modules) > 13 else ''}")
    got: dict[str, Tensor] = {}
    handles = [modules[s.module].register_forward_hook(
        lambda _m, _i, out, name=s.module: got.__setitem__(name, out[0] if isinstance(out, (tuple, list)) else out))
        for s in specs]
    was_training = student.training
    try:
        student.eval()
        student(example)
    finally:
        student.train(was_training)
        for h in handles:
            h.remove()
    widths = []
    for s, f in zip(specs, stored, strict=True):
        out = got.get(s.module)
        if not isinstance(out, Tensor) or out.ndim < 2 or out.shape[0] != len(example):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeMismatchError(f"{arg('hint')} {s.layer}:{s.module}: the student module's output {shape} is "
                                     "not a tensor with one entry per row")
        widths.append(int(features.reduce_output(out, f.pool, s.module, len(example)).shape[1]))
    return widths
