"""Augmentation at train time: replaying a version's stored views, or fresh views for a hard-label baseline.

A version labeled with ``--views N --augment SPEC`` (`kdstore.views`) holds N rows per transfer-set sample, each
with its augmentation parameters and the teacher's targets for that exact view. Each epoch the trainer draws one
stored view per sample, applies its parameters to the sample's input (`kdstore.augment.apply`, the function label
ran) and trains on that view's targets: FKD's replay (Shen & Xing 2022), no teacher and no materialised images.

``kdstore train --augment SPEC`` on a version without views draws *fresh* parameters each epoch instead; no
targets exist for those views, so only hard-label losses may use them (the baseline that tells augmentation and
distillation apart).

Every choice comes from `kdstore.counters.uniforms` keyed by (seed, sample, epoch): the in-memory path, the
streamed one and every rank of a DDP job pick the same view of a sample in the same epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdstore import augment
from kdstore.counters import uniforms
from kdstore.errors import ConfigError, arg

_EPOCH_SEED = 0x5EED_0F_E90C  # mixed into a seed so view choices never reuse the labeler's parameter streams
_MAX_SEED = 2**62


@dataclass(frozen=True)
class Replay:
    """How a trainer augments its inputs.

    Attributes:
        spec: the augmentation.
        input_shape: one input's shape.
        views: stored views per sample (rows ``s * views + v`` of the version); 0 for fresh views each epoch.
    """

    spec: augment.AugmentSpec
    input_shape: tuple[int, ...]
    views: int

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Replay | None:
        """The stored views of a version (its ``views`` block), or None without one."""
        block = manifest.get("views")
        if not block:
            return None
        spec = augment.parse_augment(block["augment"], argument="targets")
        return cls(spec, tuple(block["input_shape"]), int(block["count"]))

    @classmethod
    def fresh(cls, text: str, input_shape: tuple[int, ...]) -> Replay:
        """Fresh views of `text` (``--augment``) for inputs of `input_shape`.

        Raises:
            ConfigError: the spec does not parse, or needs images and the inputs are not (H, W) / (C, H, W).
        """
        spec = augment.parse_augment(text)
        augment.check_shape(spec, input_shape)
        return cls(spec, input_shape, 0)

    @property
    def stored(self) -> bool:
        return self.views > 0

    @property
    def param_names(self) -> list[str]:
        """The parameter columns (and batch keys) of a view."""
        return [c["name"] for c in augment.param_columns(self.spec)]

    def choose(self, seed: int, epoch: int, samples: np.ndarray) -> np.ndarray:
        """(S,) int64: the stored view each of `samples` (sample ids) trains on in `epoch`, uniform over 0..views-1."""
        u = uniforms(_epoch_seed(seed, epoch), np.asarray(samples, np.int64), [0], 1)[:, 0, 0].numpy()
        return np.minimum((u * self.views).astype(np.int64), self.views - 1)

    def fresh_params(self, seed: int, epoch: int, samples: np.ndarray) -> dict[str, np.ndarray]:
        """Fresh parameters for `samples` in `epoch` (``--augment``): a new view of every sample every epoch."""
        samples = np.asarray(samples, np.int64)
        return augment.draw_params(self.spec, self.input_shape, seed=_epoch_seed(seed, epoch), samples=samples,
                                   views=np.zeros(len(samples), np.int64))

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """The views of a batch of inputs (B, *input_shape) under their parameters (B, ...), on x's device."""
        return augment.apply(self.spec, x, {k: v.to(x.device) for k, v in params.items()})


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + _EPOCH_SEED) % _MAX_SEED


def params_tensors(params: Mapping[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Parameter arrays as int64 tensors on `device`."""
    return {k: torch.from_numpy(np.asarray(v, np.int64)).to(device) for k, v in params.items()}


def check_train_augment(text: str | None, manifest: Mapping[str, Any], losses: tuple[str, ...],
                        where: str) -> Replay | None:
    """The trainer's augmentation: the version's stored views, or ``--augment`` fresh views for hard-label losses.

    Raises:
        ConfigError: --augment on a version that stores views (they replay already), or with a loss that reads
            the teacher's targets (those were made for the unaugmented inputs), or a spec that does not fit.
    """
    stored = Replay.from_manifest(manifest)
    if text is None:
        return stored
    if stored is not None:
        raise ConfigError(f"{arg('augment')} {text}: {where} stores {stored.views} views per row "
                          f"(augment {stored.spec}), which training replays with their targets; drop {arg('augment')}")
    soft = [loss for loss in losses if loss not in ("hard", "ls")]
    if soft:
        raise ConfigError(f"{arg('augment')} {text} with {arg('loss')} {soft[0]}: the targets in {where} are the "
                          f"teacher's on unaugmented inputs, wrong for a view; relabel with `kdstore label --views N "
                          f"--augment {text}` to distil augmented views, or use {arg('augment')} only with "
                          f"{arg('loss')} hard/ls")
    return Replay.fresh(text, tuple(manifest["transfer_set"]["inputs"]["shape"]))
