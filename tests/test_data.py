"""kdstore.data: stored targets joined with transfer-set inputs, streamed (workers, ranks, epochs) or in memory."""

from __future__ import annotations

import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdstore.data import StreamingTargets, TrainingData, describe_need, open_training_data
from kdstore.errors import ConfigError, InputError
from kdstore.store import Version
from tests.conftest import Data, teacher_logits, write_parquet_array
from tests.helpers import run_label

# torch warns when a DataLoader has more workers than CPUs; 3 workers on a 2-CPU machine is what is tested here
MANY_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def stores(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small versions (3 shards of 40/40/20 rows, row groups of 16: 8 blocks of 16/16/8/16/16/8/16/4 rows)."""
    root = tmp_path_factory.mktemp("data_stores")
    store = root / "store"
    moved = shutil.copy(data.parquet, root / "moved.parquet")
    return {
        "pq": run_label(data.teacher_pt, data.parquet, store, "pq", top_k=3).path,
        "h5": run_label(data.teacher_pt, data.h5, store, "h5", format="hdf5", top_k=3, logits_dtype="bfloat16").path,
        "nolog": run_label(data.teacher_pt, data.parquet, store, "nolog", top_k=3, keep_logits=False).path,
        "unl": run_label(data.teacher_pt, data.parquet, store, "unl", top_k=None, label_column="none").path,
        "moved": run_label(data.teacher_pt, moved, store, "moved", top_k=3).path,
        "root": root,
    }


def collect(ds: StreamingTargets, workers: int = 0, epoch: int = 0) -> dict[str, torch.Tensor]:
    """Every batch of one epoch, concatenated in the order the loader yields them."""
    ds.set_epoch(epoch)
    batches = list(DataLoader(ds, batch_size=None, num_workers=workers))
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def stored(version_dir: Path, names: list[str]) -> dict[str, np.ndarray]:
    return Version(version_dir).read_all(names)


def check_rows_joined(got: dict[str, torch.Tensor], data: Data, version_dir: Path) -> None:
    """Each streamed row carries the input, label and targets of its own sample_id."""
    ids = got["sample_id"].numpy()
    raw = stored(version_dir, ["label", "t0_logits", "t0_topk_values", "t0_topk_indices", "t0_logsumexp"])
    np.testing.assert_array_equal(got["x"].numpy(), data.x[ids])
    np.testing.assert_array_equal(got["label"].numpy(), data.y[ids])
    np.testing.assert_array_equal(got["logits"][:, 0].numpy(), raw["t0_logits"][ids])
    np.testing.assert_array_equal(got["topk_values"][:, 0].numpy(), raw["t0_topk_values"][ids])
    np.testing.assert_array_equal(got["topk_indices"][:, 0].numpy(), raw["t0_topk_indices"][ids])
    np.testing.assert_array_equal(got["lse"][:, 0].numpy(), raw["t0_logsumexp"][ids])
    # and the stored logits are the teacher's on that row (float16 storage)
    np.testing.assert_allclose(got["logits"][:, 0].float().numpy(), teacher_logits(data.x)[ids].numpy(),
                               rtol=2e-3, atol=2e-3)


def test_blocks_span_shards_and_row_groups(stores: dict[str, Path]) -> None:
    ds = open_training_data(stores["pq"], need=()).stream(8)
    assert [b[3] for b in ds.blocks] == [16, 16, 8, 16, 16, 8, 16, 4]
    assert [b[2] for b in ds.blocks] == [0, 16, 32, 40, 56, 72, 80, 96]
    assert sorted({b[0] for b in ds.blocks}) == [0, 1, 2]


@MANY_WORKERS
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_every_row_once_per_epoch_and_joined(data: Data, stores: dict[str, Path], workers: int) -> None:
    td = open_training_data(stores["pq"], need=("logits", "topk", "label"))
    ds = td.stream(7, seed=3, buffer_row_groups=2)
    for epoch in (0, 1):
        got = collect(ds, workers, epoch)
        assert sorted(got["sample_id"].tolist()) == list(range(100))
        assert got["logits"].shape == (100, 1, 5) and got["topk_values"].shape == (100, 1, 3)
        assert got["lse"].shape == (100, 1) and got["x"].shape == (100, 8)
        check_rows_joined(got, data, stores["pq"])


@MANY_WORKERS
@pytest.mark.parametrize(("world", "workers"), [(2, 0), (3, 0), (2, 2), (3, 3)])
def test_ranks_split_rows_without_duplicates(stores: dict[str, Path], world: int, workers: int) -> None:
    td = open_training_data(stores["pq"], need=("logits", "label"))
    per_rank = [collect(td.stream(5, seed=1, rank=r, world_size=world), workers, epoch=2)["sample_id"].tolist()
                for r in range(world)]
    union = [i for ids in per_rank for i in ids]
    assert sorted(union) == list(range(100))  # every row exactly once over all ranks
    assert len({len(ids) for ids in per_rank}) > 1  # 100 rows in 8 uneven blocks: ranks get different counts
    # a rank's share is a fixed function of (seed, epoch): the same again
    again = collect(td.stream(5, seed=1, rank=0, world_size=world), workers, epoch=2)["sample_id"].tolist()
    assert again == per_rank[0]


@MANY_WORKERS
def test_more_global_workers_than_blocks(stores: dict[str, Path]) -> None:
    td = open_training_data(stores["pq"], need=())
    ids = [collect(td.stream(64, rank=r, world_size=3), 3)["sample_id"] for r in range(3)]  # 9 slots, 8 blocks
    assert sorted(torch.cat(ids).tolist()) == list(range(100))


@pytest.mark.parametrize("workers", [0, 2])
def test_order_depends_on_seed_and_epoch_only(stores: dict[str, Path], workers: int) -> None:
    td = open_training_data(stores["pq"], need=())

    def order(seed: int, epoch: int) -> list[int]:
        return collect(td.stream(10, seed=seed), workers, epoch)["sample_id"].tolist()

    base = order(0, 0)
    assert order(0, 0) == base  # same seed and epoch, a new dataset object: identical
    assert order(0, 1) != base  # another epoch
    assert order(1, 0) != base  # another seed
    assert base != list(range(100))
    assert all(sorted(o) == list(range(100)) for o in (order(0, 1), order(1, 0)))


def test_no_shuffle_reads_in_row_order(stores: dict[str, Path]) -> None:
    td = open_training_data(stores["pq"], need=("label",))
    got = collect(td.stream(7, shuffle=False))
    assert got["sample_id"].tolist() == list(range(100))


def _decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every Parquet row group the transfer-set reader decodes (its index)."""
    import pyarrow.parquet as pq

    seen: list[int] = []
    read = pq.ParquetFile.read_row_group

    def counting(self: pq.ParquetFile, i: int, *a: object, **kw: object) -> object:
        seen.append(i)
        return read(self, i, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    return seen


@pytest.mark.parametrize(("buffer", "once"), [(8, True), (3, False)])
def test_transfer_row_groups_decoded_once_per_epoch(data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    buffer: int, once: bool) -> None:
    """Target row groups of 16 rows inside transfer row groups of 32 (4 of them for 100 rows): with a buffer of 8
    the halves of a transfer row group are read one after the other and each is decoded once per epoch; with a
    buffer under 4 blocks stay alone (a unit is at most a quarter of a buffer) and some are decoded twice."""
    transfer = write_parquet_array(tmp_path / "t32.parquet", data.x, data.y, row_group_size=32)
    version = run_label(data.teacher_pt, transfer, tmp_path / "s", "u", shard_rows=100).path
    td = open_training_data(version, need=("logits", "label"))
    ds = td.stream(10, seed=5, buffer_row_groups=buffer)
    seen = _decodes(monkeypatch)
    for epoch in (0, 1):
        seen.clear()
        got = collect(ds, epoch=epoch)
        assert sorted(got["sample_id"].tolist()) == list(range(100))
        np.testing.assert_array_equal(got["x"].numpy(), data.x[got["sample_id"].numpy()])
        per_group = Counter(seen[1:])  # seen[0]: opening the file checks its first row group
        assert set(per_group) <= {0, 1, 2, 3} and max(per_group.values()) == (1 if once else 2), seen
    units = ds.epoch_blocks(1, td.open_transfer().chunk_starts)
    assert sorted(b[2] for b in units) == [b[2] for b in ds.blocks]  # a permutation of the blocks


def test_to_memory_equals_streamed_content(data: Data, stores: dict[str, Path]) -> None:
    td = open_training_data(stores["pq"], need=("logits", "topk", "label"))
    mem = td.to_memory()
    assert mem["sample_id"].tolist() == list(range(100))
    check_rows_joined(mem, data, stores["pq"])
    got = collect(td.stream(9, seed=5), 2)
    order = torch.argsort(got["sample_id"])
    assert set(got) == set(mem)
    for k in mem:
        assert got[k].dtype == mem[k].dtype, k
        assert torch.equal(got[k][order], mem[k]), k


def test_hdf5_version_streams_with_workers(data: Data, stores: dict[str, Path]) -> None:
    td = open_training_data(stores["h5"], need=("logits", "topk", "label"))
    assert td.version.fmt == "hdf5" and td.transfer_path == data.h5
    ds = td.stream(6, seed=2, buffer_row_groups=3)
    pickle.dumps(ds)  # holds no open file handle: workers open the HDF5 files themselves
    mem = td.to_memory()
    for workers in (0, 2):
        got = collect(ds, workers, epoch=1)
        order = torch.argsort(got["sample_id"])
        assert got["sample_id"][order].tolist() == list(range(100))
        for k in mem:
            assert torch.equal(got[k][order], mem[k]), k
    pickle.dumps(ds)  # still none after iterating in this process
    np.testing.assert_array_equal(mem["x"].numpy(), data.x)
    np.testing.assert_array_equal(mem["label"].numpy(), data.y)
    assert mem["logits"].dtype == torch.float32  # bfloat16 storage decoded
    np.testing.assert_allclose(mem["logits"][:, 0].numpy(), teacher_logits(data.x).numpy(), rtol=2**-7, atol=2**-7)


def test_topk_only_and_unlabeled_versions(data: Data, stores: dict[str, Path]) -> None:
    mem = open_training_data(stores["nolog"], need=("topk", "label")).to_memory()
    assert "logits" not in mem and mem["topk_indices"].shape == (100, 1, 3)
    mem = open_training_data(stores["unl"], need=("logits",)).to_memory()
    assert "label" not in mem and "topk_values" not in mem
    np.testing.assert_array_equal(mem["x"].numpy(), data.x)


def test_moved_transfer_set_is_accepted_by_fingerprint(data: Data, stores: dict[str, Path]) -> None:
    td = open_training_data(stores["pq"], need=("label",), transfer=str(stores["root"] / "moved.parquet"))
    assert td.transfer_path == stores["root"] / "moved.parquet"
    np.testing.assert_array_equal(td.to_memory()["x"].numpy(), data.x)


# --- errors ---------------------------------------------------------------------------------------------------------


def test_logits_needed_on_a_topk_only_store(stores: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"nolog@v1 stores only top-k targets, no full logits; this "
                                          r"needs full logits: use loss kd/topk .* or relabel keeping the logits"):
        open_training_data(stores["nolog"], need=("logits",))


def test_topk_needed_on_a_store_without_topk(stores: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"unl@v1 stores no top-k targets; use loss kd, or relabel with a top-k"):
        open_training_data(stores["unl"], need=("topk",))


def test_labels_needed_on_an_unlabeled_store(stores: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"unl@v1 is unlabeled .*hard-label terms need labels; use loss kd with "
                                          r"alpha 1"):
        open_training_data(stores["unl"], need=("logits", "label"))


def test_transfer_fingerprint_mismatch(data: Data, stores: dict[str, Path], tmp_path: Path) -> None:
    x = data.x.copy()
    x[10, 3] += 1.0
    other = write_parquet_array(tmp_path / "other.parquet", x, data.y)
    with pytest.raises(InputError, match=r"transfer .*other.parquet: sha256 [0-9a-f]{12}\.\.\. differs from "
                                         r"[0-9a-f]{12}\.\.\. recorded in .*pq@v1; .*pass the right transfer"):
        open_training_data(stores["pq"], transfer=other)
    td = open_training_data(stores["pq"], need=(), transfer=other, verify_transfer=False)  # an explicit opt-out
    assert td.to_memory()["x"][10, 3] == float(x[10, 3])


def test_transfer_missing(stores: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"transfer set .*nope.parquet \(recorded in .*pq@v1\) not found; pass "
                                         r"transfer PATH"):
        open_training_data(stores["pq"], transfer=tmp_path / "nope.parquet")


def test_recorded_transfer_missing(data: Data, tmp_path: Path) -> None:
    gone = Path(shutil.copy(data.parquet, tmp_path / "gone.parquet"))
    v = run_label(data.teacher_pt, gone, tmp_path / "store", "gone", top_k=None).path
    gone.unlink()
    with pytest.raises(InputError, match=r"transfer set .*gone.parquet \(recorded in .*gone@v1\) not found"):
        open_training_data(v)
    assert open_training_data(v, transfer=data.parquet).num_rows == 100  # same bytes elsewhere: fine


def test_transfer_row_count_mismatch(data: Data, stores: dict[str, Path], tmp_path: Path) -> None:
    short = write_parquet_array(tmp_path / "short.parquet", data.x[:99], data.y[:99])
    with pytest.raises(InputError, match=r"sha256 .* differs"):
        open_training_data(stores["pq"], transfer=short)
    with pytest.raises(InputError, match=r"transfer .*short.parquet: 99 rows, but .*pq@v1 has 100"):
        open_training_data(stores["pq"], transfer=short, verify_transfer=False)


def test_unknown_teacher_and_need(stores: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"teacher 't7' is not in .*pq@v1; it has \['t0'\]"):
        open_training_data(stores["pq"], teachers=["t7"])
    with pytest.raises(ConfigError, match=r"need \['probs'\]: expected a subset of"):
        open_training_data(stores["pq"], need=("logits", "probs"))


def test_stream_options_are_checked(stores: dict[str, Path]) -> None:
    td: TrainingData = open_training_data(stores["pq"], need=())
    with pytest.raises(ConfigError, match=r"batch_size 0 .* must be >= 1"):
        td.stream(0)
    with pytest.raises(ConfigError, match=r"rank 2 must be in \[0, 2\)"):
        td.stream(4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match=r"seed -1: must be >= 0"):
        td.stream(4, seed=-1)


@pytest.mark.parametrize(
    ("loss", "alpha", "need"),
    [("kd", 1.0, {"logits"}), ("kd", 0.5, {"logits", "label"}), ("topk", 1.0, {"topk"}),
     ("topk", 0.0, {"topk", "label"}), ("mse", 1.0, {"logits"}), ("hard", 0.0, {"label"}), ("ls", 0.0, {"label"})],
)
def test_describe_need(loss: str, alpha: float, need: set[str]) -> None:
    assert describe_need(loss, alpha) == need


def test_describe_need_unknown_loss() -> None:
    with pytest.raises(ConfigError, match=r"loss 'l1': expected one of kd, topk, mse, hard, ls"):
        describe_need("l1", 1.0)
