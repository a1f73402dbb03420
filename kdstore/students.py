"""Build models from a spec string: built-in `mlp:IN-H-...-C` / `cnn:HxW-C` or `package.module:factory`."""

from __future__ import annotations

import importlib
import itertools
import math
import re
from typing import Any

import torch
from torch import nn

from kdstore.errors import StudentError, arg

_MLP_RE = re.compile(r"^mlp:(\d+(?:-\d+)+)$")
_CNN_RE = re.compile(r"^cnn:(\d+)x(\d+)(?:x(\d+))?-(\d+)$")
_FACTORY_RE = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*):([A-Za-z_]\w*)$")


class MLP(nn.Module):
    """Fully connected ReLU network; inputs are flattened. Dropout only if asked for (teachers).

    Dropout is applied functionally, so the state-dict keys (``layers.{i}.weight``) are the same with or
    without it: weights trained with dropout load into the same spec built without.
    """

    def __init__(self, sizes: list[int], dropout: float = 0.0, input_dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.sizes, self.dropout, self.input_dropout = list(sizes), dropout, input_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.dropout(x.flatten(1), self.input_dropout, self.training)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.functional.dropout(torch.relu(x), self.dropout, self.training)
        return x


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head for C x H x W images (a flat input is reshaped)."""

    def __init__(self, height: int, width: int, channels: int, num_classes: int, width_mult: int = 32) -> None:
        super().__init__()
        self.shape = (channels, height, width)
        c1, c2 = width_mult, 2 * width_mult
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(c2 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.shape)
        return self.head(self.features(x).flatten(1))  # type: ignore[no-any-return]


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build a model from a spec.

    Args:
        spec: ``mlp:784-800-800-10`` (input size, hidden sizes, classes), ``cnn:28x28-10`` or
            ``cnn:32x32x3-10`` (height x width [x channels] - classes), or ``package.module:factory``
            where ``factory()`` returns an ``nn.Module``.
        kwargs: passed to the built-in constructors (e.g. ``dropout``); ignored for factories.

    Raises:
        StudentError: the spec is malformed, the module cannot be imported, or the factory fails.
    """
    m = _MLP_RE.match(spec)
    if m:
        sizes = [int(s) for s in m.group(1).split("-")]
        if len(sizes) < 2 or min(sizes) < 1:
            raise StudentError(f"model spec {spec!r}: every size must be >= 1 and at least IN-C are needed")
        return MLP(sizes, **kwargs)
    m = _CNN_RE.match(spec)
    if m:
        h, w, c, k = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1), int(m.group(4))
        return SmallCNN(h, w, c, k)
    m = _FACTORY_RE.match(spec)
    if m:
        return _call_factory(spec, m.group(1), m.group(2))
    raise StudentError(
        f"model spec {spec!r} is not understood; expected 'mlp:IN-H1-...-C', 'cnn:HxW[xC]-C' "
        "or 'package.module:factory'"
    )


def build_student(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`build_model(spec)`, checked to map inputs of `input_shape` to `num_classes` logits.

    Raises:
        StudentError: naming the spec, what it did and what the data needs.
    """
    model = build_model(spec)
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        raise StudentError(f"{arg('student')} {spec}: forward failed on inputs of shape {(2, *input_shape)} "
                           f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); "
                           "match its input size to the data") from None
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise StudentError(f"{arg('student')} {spec}: outputs {tuple(out.shape[1:])} classes, but the store has "
                           f"{num_classes}; make its last size {num_classes}")
    return model


def is_model_spec(spec: str) -> bool:
    """True if `spec` has the shape of a built-in or factory spec (not a file path)."""
    return bool(_MLP_RE.match(spec) or _CNN_RE.match(spec) or _FACTORY_RE.match(spec))


def _call_factory(spec: str, module_name: str, attr: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of user code is a user error
        raise StudentError(
            f"cannot import module {module_name!r} for {spec!r}: {type(e).__name__}: {e}; "
            "check the name and that it is on PYTHONPATH"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise StudentError(f"{spec!r}: module {module_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as e:
        raise StudentError(f"{spec!r}: calling {attr}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise StudentError(f"{spec!r}: {attr}() returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def max_norm_(model: nn.Module, max_norm: float) -> None:
    """Constrain each unit's incoming weight vector to L2 norm <= max_norm (Hinton/Srivastava max-norm)."""
    if not math.isfinite(max_norm) or max_norm <= 0:
        return
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.renorm(mod.weight, 2, 0, max_norm))
