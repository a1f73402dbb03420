"""MNIST for benchmarks/hinton_mnist.py: the Parquet files read through kdstore, subsets, and the pixel shifts
(the teacher's jitter, and materialised shifted copies: what `kdstore label --views` replaces, measured by
benchmarks/bench_views.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdstore.transfer import open_transfer


def load_xy(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 784) float32, y (N,) int64) through kdstore's own transfer-set reader."""
    ts = open_transfer(str(path))
    x, y = ts.read_rows(0, ts.rows)
    ts.close()
    assert y is not None
    return torch.from_numpy(x.reshape(len(x), -1)), torch.from_numpy(y)


def subset_parquet(src: Path, dst: Path, rows: int) -> Path:
    """The first `rows` rows of src, same schema and metadata (for --quick)."""
    import pyarrow.parquet as pq

    if not dst.exists():
        t = pq.read_table(src).slice(0, rows)
        dst.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, dst, compression="zstd", row_group_size=4096)
    return dst


def jittered_copies(src: Path, dst: Path, copies: int, pixels: int, seed: int) -> Path:
    """src followed by `copies` copies of it, each image shifted by up to `pixels` pixels (seeded): a bigger
    transfer set for the teacher to label once (Hinton's teacher saw such shifts; the paper's student did not)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if dst.exists():
        return dst
    x, y = load_xy(src)
    meta = {"derived_from": src.name, "copies": copies, "jitter_pixels": pixels, "seed": seed,
            "rows": len(x) * (copies + 1), "order": "the original rows, then each jittered copy in turn"}
    schema = pa.schema([("image", pa.list_(pa.float32(), 784)), ("label", pa.int64())],
                       metadata={"kdstore": json.dumps({"shape": [28, 28], "source": meta})})
    gen = torch.Generator().manual_seed(seed)
    tmp = dst.with_suffix(".tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        for c in range(copies + 1):
            xc = x if c == 0 else jitter(x, pixels, torch.randint(0, 2 * pixels + 1, (2, len(x)), generator=gen))
            flat = pa.array(xc.numpy().reshape(-1), pa.float32())
            w.write_table(pa.table({"image": pa.FixedSizeListArray.from_arrays(flat, 784),
                                    "label": pa.array(y.numpy())}, schema=schema), row_group_size=8192)
    tmp.replace(dst)
    return dst


def drop_class(src: Path, dst: Path, cls: int) -> Path:
    """src without the rows of class `cls` (the omitted-3 transfer set of a --quick subset)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not dst.exists():
        t = pq.read_table(src)
        pq.write_table(t.filter(pc.not_equal(t.column("label"), cls)), dst, compression="zstd", row_group_size=4096)
    return dst


def jitter(x: torch.Tensor, pixels: int, d: torch.Tensor) -> torch.Tensor:
    """Shift each 28x28 image by (dy, dx) = d[:, i] - pixels, filling with zeros; d (2, B) holds random
    integers in [0, 2 * pixels] drawn on the host once per epoch (one copy, no per-step device sync)."""
    if pixels == 0:
        return x
    b = x.shape[0]
    img = torch.nn.functional.pad(x.view(b, 28, 28), (pixels,) * 4)
    ar = torch.arange(28, device=x.device)
    rows = (ar[None, :] + d[0][:, None])[:, :, None]  # (b, 28, 1)
    cols = (ar[None, :] + d[1][:, None])[:, None, :]  # (b, 1, 28)
    return img[torch.arange(b, device=x.device)[:, None, None], rows, cols].reshape(b, 784)
