"""Tiny, seeded fixtures: teachers (TorchScript file, factory + safetensors weights) and a 100-row transfer set
in every supported format. Session-scoped files are shared and must not be modified by tests."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests import fixtures_models as fm
from tests.helpers import FIX

ROWS = 100

# Every tensor here is tiny: one intra-op thread avoids OpenMP wake-up stalls (milliseconds per op on a busy
# machine) that would otherwise dominate the suite's runtime.
torch.set_num_threads(1)


@dataclass(frozen=True)
class Data:
    root: Path
    x: np.ndarray  # (100, 8) float32
    y: np.ndarray  # (100,) int64, in 0..4; the teacher is right on ~70% of rows
    teacher_pt: Path  # TorchScript of fixtures_models.tiny_teacher()
    weights: Path  # safetensors of fixtures_models.mlp(seed=1)
    parquet: Path  # 'x' fixed_size_list<float32>[8] + 'label'; row groups of 30
    parquet_numeric: Path  # f0..f7 + 'weight' (extra numeric) + 'note' (string) + 'label'; row groups of 30
    npz: Path  # x, y
    npy: Path  # x only
    h5: Path  # x, y

    @property
    def factory_spec(self) -> str:
        """A factory teacher with safetensors weights: tests.fixtures_models:tiny_teacher@weights."""
        return f"{FIX}:tiny_teacher@{self.weights}"


def teacher_logits(x: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Reference logits of fixtures_models.mlp(seed=seed) in float32."""
    with torch.inference_mode():
        return fm.mlp(seed=seed)(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float()


def write_parquet_array(path: Path, x: np.ndarray, y: np.ndarray | None, row_group_size: int = 30) -> Path:
    cols = {"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1).astype(np.float32)), x.shape[1])}
    if y is not None:
        cols["label"] = pa.array(y.astype(np.int64))
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((ROWS, fm.IN_FEATURES)).astype(np.float32)
    pred = teacher_logits(x).argmax(1).numpy()
    flip = rng.random(ROWS) < 0.3
    y = np.where(flip, (pred + 1) % fm.NUM_CLASSES, pred).astype(np.int64)

    teacher_pt = root / "teacher.pt"
    with warnings.catch_warnings():  # torch.jit.script is deprecated in recent torch; still the documented format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(fm.tiny_teacher()).save(str(teacher_pt))

    from safetensors.torch import save_file

    weights = root / "tiny_seed1.safetensors"
    save_file({k: v.contiguous() for k, v in fm.mlp(seed=1).state_dict().items()}, str(weights))

    parquet = write_parquet_array(root / "transfer.parquet", x, y)
    numeric = {f"f{i}": pa.array(x[:, i]) for i in range(x.shape[1])}
    numeric["weight"] = pa.array(rng.random(ROWS))
    numeric["note"] = pa.array([f"row{i}" for i in range(ROWS)])
    numeric["label"] = pa.array(y)
    parquet_numeric = root / "numeric.parquet"
    pq.write_table(pa.table(numeric), parquet_numeric, row_group_size=30)

    npz = root / "transfer.npz"
    np.savez(npz, x=x, y=y)
    npy = root / "transfer.npy"
    np.save(npy, x)
    h5 = root / "transfer.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("x", data=x)
        f.create_dataset("y", data=y)
    return Data(root, x, y, teacher_pt, weights, parquet, parquet_numeric, npz, npy, h5)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty store directory (created by the writer on first use)."""
    return tmp_path / "store"
