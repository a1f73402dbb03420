"""Counter-based random numbers: a value that depends only on its key, never on how work was batched.

`uniforms(seed, rows, positions, draws)` returns float64 uniforms in [0, 1) keyed by (seed, row, position, draw
index): the j-th output of a SplitMix64 stream (Steele et al. 2014) whose seed hashes (seed, row, position). Labeling
uses them wherever a random choice must survive resume, sharding and any batch size bit for bit: sampled per-token
targets draw from them, and augmentation views draw their parameters from them (row = sample, position = view).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kdstore.errors import ConfigError, arg

_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MAX_SEED = 2**63


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (arithmetic wraps modulo 2**64; numpy arrays do not warn)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, rows: Sequence[int] | np.ndarray | torch.Tensor,
             positions: Sequence[int] | np.ndarray | torch.Tensor, draws: int) -> torch.Tensor:
    """float64 uniforms in [0, 1) of shape (R, L, draws); entry [r, l, j] depends only on
    (seed, rows[r], positions[l], j) and has 53 random bits.

    Raises:
        ConfigError: seed, row ids or positions outside [0, 2**63), or draws < 1.
    """
    if not 0 <= seed < _MAX_SEED:
        raise ConfigError(f"{arg('seed')} {seed}: must be in [0, 2**63)")
    if draws < 1:
        raise ConfigError(f"{arg('draws')} {draws}: must be >= 1")
    r = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1, 1, 1)
    p = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions,
                   dtype=np.int64).reshape(1, -1, 1)
    if (r.size and r.min() < 0) or (p.size and p.min() < 0):
        raise ConfigError("row ids and positions must be >= 0")
    shape = (r.shape[0], p.shape[1], 1)
    h = np.full(shape, seed, dtype=np.uint64) + np.uint64(_GOLDEN)
    h = _mix64(_mix64(h) ^ r.astype(np.uint64))
    h = _mix64(h ^ p.astype(np.uint64))
    j = np.arange(1, draws + 1, dtype=np.uint64).reshape(1, 1, -1) * np.uint64(_GOLDEN)
    bits = _mix64(h + j) >> np.uint64(11)  # the j-th output of a SplitMix64 stream seeded with h
    return torch.from_numpy(bits.astype(np.float64) * (1.0 / 2**53))
