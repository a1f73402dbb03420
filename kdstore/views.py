"""Augmentation views at label time: N rows per sample, each a view of it that the teacher labels once.

A version labeled with ``--views N --augment SPEC`` has N rows per transfer-set sample, sample-major (row
``s * N + v`` is view v of sample s). Each row stores ``sample_id``, ``view`` and the view's parameters
(`kdstore.augment.param_columns`), beside the teacher's targets for that view. Shards and row groups hold whole
samples, so a reader of one row group has every view of its samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdstore import augment
from kdstore.errors import ConfigError, arg

MAX_VIEWS = 1024  # views are keyed by sample * 1024 + view (kdstore.augment)


@dataclass(frozen=True)
class ViewPlan:
    """How many views per sample, of which augmentation, from which seed; view 0 unaugmented if `identity_first`."""

    count: int
    spec: augment.AugmentSpec
    seed: int
    identity_first: bool
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_VIEWS:
            raise ConfigError(f"{arg('views')} {self.count}: must be in 1..{MAX_VIEWS}")
        if self.identity_first and self.count == 1:
            raise ConfigError(f"{arg('views')} 1 with the identity view first leaves no augmented view; ask for "
                              f"{arg('views')} 2 or more, or drop the identity view")
        augment.check_shape(self.spec, self.input_shape)

    def samples_per(self, rows: int) -> int:
        """How many samples fit in `rows` version rows (at least one)."""
        return max(1, rows // self.count)

    def expand(self, x: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """A batch of samples [first, first + len(x)) as its views: (inputs (B * N, ...), sample ids, view
        indices, parameters), sample-major."""
        b = len(x)
        samples = np.repeat(np.arange(first, first + b, dtype=np.int64), self.count)
        views = np.tile(np.arange(self.count, dtype=np.int64), b)
        params = augment.draw_params(self.spec, self.input_shape, seed=self.seed, samples=samples, views=views,
                                     identity=(views == 0) if self.identity_first else None)
        inputs = torch.from_numpy(np.repeat(np.ascontiguousarray(x, dtype=np.float32), self.count, axis=0))
        out = augment.apply(self.spec, inputs, {k: torch.from_numpy(v) for k, v in params.items()})
        return out.numpy(), samples, views, params

    def columns(self) -> list[dict[str, Any]]:
        """The view columns of a version: ``view`` and the parameters."""
        return [{"name": "view", "role": "view", "teacher": None, "dtype": "int16", "shape": []},
                *augment.param_columns(self.spec)]

    def describe(self) -> dict[str, Any]:
        """The manifest's ``views`` block."""
        return {"count": self.count, "augment": str(self.spec), "seed": self.seed,
                "identity_first": self.identity_first, "input_shape": list(self.input_shape),
                "params": [c["name"] for c in augment.param_columns(self.spec)]}
