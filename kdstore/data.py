"""Stored targets joined with their transfer-set inputs, as torch data: in memory or streamed from disk.

Public API for users with their own training loop (plain PyTorch, Lightning)::

    from kdstore.data import open_training_data
    data = open_training_data("targets/mnist-t1200", need={"logits", "label"})
    loader = torch.utils.data.DataLoader(data.stream(batch_size=256, seed=0), batch_size=None, num_workers=2)
    for epoch in range(10):
        loader.dataset.set_epoch(epoch)
        for batch in loader:   # dict: x, label, logits (B, M, C), topk_values/topk_indices (B, M, k), lse (B, M)
            ...

`StreamingTargets` shuffles by permuting row groups each epoch (seeded, epoch-dependent) and mixing them in a
buffer, splits row groups across DataLoader workers (and torch.distributed ranks) without duplicating or dropping
a sample, and opens files lazily inside each worker. `TrainingData.to_memory` is the fast path for sets that fit.

A `Holdout` sets rows aside for validation by a hash of their `sample_id`, so the in-memory path
(`split_memory`) and the streamed one (``stream(..., holdout=h)`` for training rows, ``part="val"`` for the
held-out ones) hold out the same rows, whatever the batch size, order or sweep point.

A version labeled with views (``--views N``) has N rows per transfer-set sample, sample-major; its inputs stay one
per sample. Given a `kdstore.replay.Replay`, both paths draw one stored view per sample each epoch, gather that
view's row and apply its parameters to the sample's input (or, for a version without views, fresh parameters);
without one they serve each sample once, unaugmented, with its first view's row (validation reads them so).
An epoch is one pass over the samples either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdstore.counters import uniforms
from kdstore.errors import ConfigError, InputError, arg
from kdstore.plan import describe_need
from kdstore.replay import Replay, params_tensors
from kdstore.store import Version, open_version, sha256_file
from kdstore.store.remote import resolve_any
from kdstore.transfer import TransferSet, open_transfer

NEEDS = ("logits", "topk", "label")
__all__ = ["NEEDS", "Holdout", "StreamingTargets", "TrainingData", "check_holdout", "describe_need", "memory_batches",
           "open_training_data", "split_memory"]

@dataclass(frozen=True)
class Holdout:
    """Samples held out for validation: sample i is held out when ``u(seed, sample_id_i) < fraction``, a
    counter-based uniform (`kdstore.counters.uniforms`). Membership depends on the sample alone, so every path and
    sweep point agrees, and all views of a sample fall on the same side.

    Attributes:
        fraction: the share of samples to hold out, in (0, 1).
        seed: changes which samples are held out.
        rows: how many samples of the version are held out (counted by `check_holdout`).
    """

    fraction: float
    seed: int = 0
    rows: int = 0

    def mask(self, sample_ids: np.ndarray) -> np.ndarray:
        """(N,) bool: True for the held-out rows among `sample_ids`."""
        ids = np.asarray(sample_ids, np.int64)
        return uniforms(self.seed, ids, [0], 1)[:, 0, 0].numpy() < self.fraction


def check_holdout(version: Version, fraction: float | None, seed: int = 0) -> Holdout | None:
    """The validation split `fraction` makes of `version`, checked: labeled data, at least one row on each side.

    Raises:
        ConfigError: the version has no labels, or the split leaves no validation or no training rows.
    """
    if fraction is None:
        return None
    where = f"{arg('val_fraction')} {fraction:g}"
    if not version.has_labels:
        raise ConfigError(f"{where}: {version.ref} is unlabeled, so held-out rows cannot be scored; pass "
                          f"{arg('val')} PATH (a labeled file like the transfer set) instead")
    ids = version.read_all(["sample_id"])["sample_id"][:: views_of(version)]  # one per sample
    rows = int(Holdout(fraction, seed).mask(ids).sum())
    if rows == 0:
        raise ConfigError(f"{where}: holds out 0 of {len(ids)} rows; use a larger fraction or {arg('val')} PATH")
    if rows == len(ids):
        raise ConfigError(f"{where}: holds out all {len(ids)} rows and leaves none to train on; use a smaller "
                          "fraction")
    return Holdout(fraction, seed, rows)


def views_of(version: Version) -> int:
    """Rows per transfer-set sample: the version's stored views, 1 without views."""
    return int((version.manifest.get("views") or {}).get("count", 1))


def split_memory(memory: dict[str, torch.Tensor], holdout: Holdout) -> tuple[dict[str, torch.Tensor],
                                                                               dict[str, torch.Tensor]]:
    """An in-memory set (`TrainingData.to_memory`) as (training samples with all their rows, held-out samples with
    one row each: their first view's, beside the unaugmented input)."""
    views = len(memory["sample_id"]) // max(len(memory["x"]), 1)
    device = memory["sample_id"].device
    held = torch.from_numpy(holdout.mask(memory["sample_id"].cpu().numpy())).to(device)  # per row
    held_samples = held[::views]
    train = {k: v[~held_samples] if k == "x" else v[~held] for k, v in memory.items()}
    val = {k: v[held_samples] if k == "x" else v[::views][held_samples] for k, v in memory.items()}
    return train, val


@dataclass
class TrainingData:
    """A committed version plus its verified transfer set, and which targets to read."""

    version: Version
    transfer_path: Path
    teachers: list[str]
    need: frozenset[str]
    features: tuple[str, ...] = ()  # stored feature columns to read (train --hint), batch keys "feature:COLUMN"

    @property
    def num_rows(self) -> int:
        return self.version.num_rows

    @property
    def num_classes(self) -> int:
        return self.version.num_classes

    @property
    def views(self) -> int:
        """Rows per transfer-set sample (stored views; 1 without)."""
        return views_of(self.version)

    @property
    def num_samples(self) -> int:
        """Transfer-set samples (an epoch's length)."""
        return self.num_rows // self.views

    def open_transfer(self) -> TransferSet:
        inputs = self.version.manifest["transfer_set"]["inputs"]["columns"]
        cols = None if inputs == ["<array>"] else inputs
        return open_transfer(self.transfer_path, input_columns=cols, label_column="none", option="transfer")

    def columns(self) -> dict[str, list[str]]:
        """Store columns to read, by batch key (one per teacher for per-teacher targets)."""
        v = self.version
        out: dict[str, list[str]] = {"sample_id": ["sample_id"]}
        if "label" in self.need:
            out["label"] = ["label"]
        stored = Replay.from_manifest(v.manifest)
        for name in ["view", *stored.param_names] if stored else []:
            out[name] = [name]
        role_keys = {"logits": [("logits", "logits")],
                     "topk": [("topk_values", "topk_values"), ("topk_indices", "topk_indices"), ("lse", "logsumexp")]
                     + ([("tail", "tail_logmass")] if v.has_tail else [])}
        for need in ("logits", "topk"):
            if need in self.need:
                for key, role in role_keys[need]:
                    out[key] = [v.column_for(role, t) or "" for t in self.teachers]
        for column in self.features:
            out[f"feature:{column}"] = [column]
        return out

    def input_bytes_estimate(self) -> int:
        shape = self.version.manifest["transfer_set"]["inputs"]["shape"]
        per_row = 16 + 8 * len(self.columns())
        c, k, m = self.num_classes, self.version.top_k or 0, len(self.teachers)
        if "logits" in self.need:
            per_row += m * c * 4
        if "topk" in self.need:
            per_row += m * (k * 12 + 4)
        per_row += sum(4 * int(np.prod(self.version.columns[c]["shape"])) for c in self.features)
        return per_row * self.num_rows + int(np.prod(shape)) * 4 * self.num_samples

    def to_memory(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every row as tensors on `device` (the fast path: no loader, batches are index selections); ``x`` holds
        one input per sample, the other keys one entry per row (`views` rows per sample)."""
        ts = self.open_transfer()
        try:
            x, _ = ts.read_rows(0, ts.rows)
        finally:
            ts.close()
        cols = self.columns()
        flat = sorted({c for names in cols.values() for c in names})
        raw = self.version.read_all(flat)
        batch = _assemble(raw, cols)
        batch["x"] = torch.from_numpy(x)
        return {k: v.to(device) for k, v in batch.items()}

    def stream(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, buffer_row_groups: int = 8,
               rank: int = 0, world_size: int = 1, holdout: Holdout | None = None, part: str = "train",
               replay: Replay | None = None) -> StreamingTargets:
        """An IterableDataset of batches read from disk (use with DataLoader(batch_size=None)); with `holdout`, only
        its training rows (`part` "train") or only the held-out ones ("val"); with `replay`, augmented views."""
        return StreamingTargets(self, batch_size, shuffle=shuffle, seed=seed, buffer_row_groups=buffer_row_groups,
                                rank=rank, world_size=world_size, holdout=holdout, part=part, replay=replay)


def open_training_data(
    targets: str | Path | Version,
    *,
    need: Sequence[str] = ("logits", "label"),
    teachers: Sequence[str] | None = None,
    transfer: str | Path | None = None,
    verify_transfer: bool = True,
    features: Sequence[str] = (),
) -> TrainingData:
    """Open a version for training and find (and fingerprint-check) its transfer set.

    Args:
        targets: ``STORE/NAME``, ``STORE/NAME@vN`` or an open `Version`.
        need: subset of {"logits", "topk", "label"}.
        teachers: teacher ids to read (default: all).
        transfer: the transfer set's path if it moved since labeling (default: the manifest's).
        verify_transfer: compare the file's sha256 with the manifest's.
        features: stored feature columns to read as well (batch keys ``feature:COLUMN``).

    Raises:
        ConfigError: a needed target is not stored (e.g. logits in a top-k-only store, labels in an unlabeled one).
        InputError: transfer set missing, or its fingerprint or row count differ from the manifest's.
    """
    # s3://, gs://, ... references are fetched into the local cache first
    version = targets if isinstance(targets, Version) else open_version(resolve_any(targets))
    bad = set(need) - set(NEEDS)
    if bad:
        raise ConfigError(f"need {sorted(bad)}: expected a subset of {NEEDS}")
    ids = list(teachers) if teachers else version.teacher_ids
    unknown = [t for t in ids if t not in version.teacher_ids]
    if unknown:
        raise ConfigError(f"teacher {unknown[0]!r} is not in {version.ref}; it has {version.teacher_ids}")
    _check_stored(version, need)
    path = _transfer_path(version, transfer, verify_transfer)
    missing = [c for c in features if c not in version.columns]
    if missing:
        raise ConfigError(f"{version.ref} has no feature column {missing[0]!r}; relabel with "
                          "`kdstore label --features`")
    data = TrainingData(version, path, ids, frozenset(need), tuple(features))
    ts = data.open_transfer()
    rows = ts.rows
    ts.close()
    if rows != data.num_samples:
        views = f" ({data.num_samples} samples x {data.views} views)" if data.views > 1 else ""
        raise InputError(f"{arg('transfer')} {path}: {rows} rows, but {version.ref} has {version.num_rows}{views}; "
                         f"pass the transfer set it was labeled from")
    return data


def _check_stored(version: Version, need: Sequence[str]) -> None:
    """Refuse a need the version cannot meet: full logits, top-k targets or labels it does not store."""
    if "logits" in need and not version.has_logits:
        raise ConfigError(f"{version.ref} stores only top-k targets, no full logits; this needs full logits: "
                          f"use {arg('loss')} kd/topk (rebuilt from the top-k), or relabel keeping the logits")
    if "topk" in need and not version.top_k:
        raise ConfigError(f"{version.ref} stores no top-k targets; use {arg('loss')} kd, or relabel with a top-k")
    if "label" in need and not version.has_labels:
        raise ConfigError(f"{version.ref} is unlabeled (transfer set kind "
                          f"{version.manifest['transfer_set']['kind']!r}): hard-label terms need labels; "
                          f"use {arg('loss')} kd with {arg('alpha')} 1, {arg('loss')} mse or {arg('loss')} topk with "
                          f"{arg('alpha')} 1")


def _transfer_path(version: Version, transfer: str | Path | None, verify: bool) -> Path:
    """The transfer set's path (`transfer`, or the manifest's), checked to exist and, with `verify`, to have the
    sha256 the manifest records."""
    ts_meta = version.manifest["transfer_set"]
    path = Path(transfer) if transfer else Path(ts_meta["path"])
    if not path.is_file():
        raise InputError(f"transfer set {path} (recorded in {version.ref}) not found; pass {arg('transfer')} PATH "
                         "to the file it was labeled from")
    if verify:
        digest = sha256_file(path)
        if digest != ts_meta["sha256"]:
            raise InputError(f"{arg('transfer')} {path}: sha256 {digest[:12]}... differs from "
                             f"{ts_meta['sha256'][:12]}... "
                             f"recorded in {version.ref}; the targets were made from another file — pass the right "
                             f"{arg('transfer')}, or relabel this one")
    return path


def _assemble(raw: dict[str, np.ndarray], cols: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Column arrays -> batch tensors; per-teacher columns stacked on dim 1."""
    out: dict[str, torch.Tensor] = {}
    for key, names in cols.items():
        if key in ("sample_id", "label", "view") or key.startswith("aug"):  # ids and views' parameters
            out[key] = torch.from_numpy(np.ascontiguousarray(raw[names[0]]).astype(np.int64))
            continue
        if key.startswith("feature:"):  # one teacher's feature (N, D): kept in its stored dtype, like half logits
            out[key] = torch.from_numpy(np.require(raw[names[0]], requirements=["C", "W"]))
            continue
        arrays = [raw[n] for n in names]
        stacked = np.stack(arrays, axis=1)
        if key == "topk_indices":
            out[key] = torch.from_numpy(stacked.astype(np.int64))
        elif stacked.dtype == np.float16:
            out[key] = torch.from_numpy(stacked)  # kept half in memory; losses soften in float32
        else:
            out[key] = torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32))
    return out


class StreamingTargets(IterableDataset[dict[str, torch.Tensor]]):
    """Batches streamed from a version's row groups, joined with the transfer-set inputs of the same rows.

    Each epoch the (file, row group) blocks are permuted with a generator seeded by (seed, epoch), the blocks whose
    inputs share a Parquet transfer-set row group kept together (`epoch_blocks`); blocks are
    dealt round-robin to the global workers (rank x DataLoader worker) so every row is read exactly once per
    epoch; each worker concatenates `buffer_row_groups` blocks at a time, shuffles those rows and cuts batches.
    The last batch of a worker may be short (no row is dropped). With a `holdout` each block keeps only its
    training rows (`part` "train") or only its held-out rows ("val").
    """

    def __init__(self, data: TrainingData, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 buffer_row_groups: int = 8, rank: int = 0, world_size: int = 1, holdout: Holdout | None = None,
                 part: str = "train", replay: Replay | None = None) -> None:
        super().__init__()
        if batch_size < 1 or buffer_row_groups < 1:
            raise ConfigError(f"batch_size {batch_size} and buffer_row_groups {buffer_row_groups} must be >= 1")
        if part not in ("train", "val"):
            raise ConfigError(f"part {part!r}: expected 'train' or 'val'")
        if seed < 0:
            raise ConfigError(f"seed {seed}: must be >= 0")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} must be in [0, {world_size})")
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.buffer_row_groups, self.rank, self.world_size = buffer_row_groups, rank, world_size
        self.holdout, self.part, self.replay = holdout, part, replay
        if replay is not None and replay.stored and replay.views != data.views:
            raise ConfigError(f"a replay of {replay.views} views on {data.version.ref}, which stores {data.views}")
        self.epoch = 0
        v = data.version
        self.blocks: list[tuple[int, int, int, int]] = []  # (file, row group, first global row, rows)
        for i, f in enumerate(v.files):
            for g, (a, b) in enumerate(v.row_groups(i)):
                self.blocks.append((i, g, f["first_row"] + a, b - a))

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration uses (call before each epoch)."""
        self.epoch = epoch

    def epoch_blocks(self, epoch: int, chunk_starts: np.ndarray | None = None) -> list[tuple[int, int, int, int]]:
        """The blocks in the order of `epoch`: a permutation of units, each unit the row groups (at most a quarter
        of a buffer) whose inputs share a `chunk_starts` chunk of the transfer set, kept together and in row order
        so a Parquet transfer row group is decoded once, not once per target row group inside it."""
        units = self._units(chunk_starts)
        order = np.arange(len(units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(units))
        return [self.blocks[b] for u in order for b in units[u]]

    def _units(self, chunk_starts: np.ndarray | None) -> list[list[int]]:
        cap, views = max(1, self.buffer_row_groups // 4), self.data.views
        if chunk_starts is None or cap == 1:
            return [[i] for i in range(len(self.blocks))]
        units: list[list[int]] = []
        last_chunk = -1
        for i, (_, _, first, n) in enumerate(self.blocks):
            a, b = np.searchsorted(chunk_starts, [first // views, (first + n) // views - 1], side="right") - 1
            if units and a == last_chunk and len(units[-1]) < cap:
                units[-1].append(i)
            else:
                units.append([i])
            last_chunk = b
        return units

    def _my_blocks(self, chunk_starts: np.ndarray | None) -> tuple[list[tuple[int, int, int, int]],
                                                                   np.random.Generator]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        slot, slots = self.rank * workers + wid, self.world_size * workers
        mine = self.epoch_blocks(self.epoch, chunk_starts)[slot::slots]
        return mine, np.random.default_rng([self.seed, self.epoch, slot, 1])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ts = self.data.open_transfer()  # opened here, inside the worker: handles must not cross fork
        mine, rng = self._my_blocks(ts.chunk_starts)
        cols = self.data.columns()
        flat = sorted({c for names in cols.values() for c in names})
        carry: dict[str, torch.Tensor] | None = None
        try:
            for s in range(0, len(mine), self.buffer_row_groups):
                parts = []
                for fi, g, first, n in mine[s : s + self.buffer_row_groups]:
                    raw = self.data.version.read_file(fi, flat, [g])
                    views = self.data.views  # row groups hold whole samples
                    x, _ = ts.read_rows(first // views, (first + n) // views)
                    parts.append(self._keep(self._views(_assemble(raw, cols), torch.from_numpy(x))))
                if carry is not None:
                    parts.insert(0, carry)
                buf = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                n = len(buf["sample_id"])
                perm = torch.from_numpy(rng.permutation(n)) if self.shuffle else torch.arange(n)
                full = (n // self.batch_size) * self.batch_size
                for a in range(0, full, self.batch_size):
                    idx = perm[a : a + self.batch_size]
                    yield {k: v[idx] for k, v in buf.items()}
                rest = perm[full:]
                carry = {k: v[rest] for k, v in buf.items()} if len(rest) else None
            if carry is not None:
                yield carry
        finally:
            ts.close()

    def _views(self, block: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """A block as one row per sample with its input: the epoch's view of each sample (stored or fresh) when
        training with a replay, else the first stored row and the unaugmented input."""
        views, replay = self.data.views, self.replay if self.part == "train" else None
        if views > 1 or (replay is not None and replay.stored):
            first = torch.arange(0, len(block["sample_id"]), views)
            pick = (torch.from_numpy(replay.choose(self.seed, self.epoch, block["sample_id"][first].numpy()))
                    if replay is not None and replay.stored else 0)
            block = {k: v[first + pick] for k, v in block.items()}
        if replay is not None:
            params = ({k: block[k] for k in replay.param_names} if replay.stored else
                      params_tensors(replay.fresh_params(self.seed, self.epoch, block["sample_id"].numpy())))
            x = replay.apply(x, params)
        block["x"] = x
        return block

    def _keep(self, block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows of a block this stream serves (all of them without a holdout)."""
        if self.holdout is None:
            return block
        held = torch.from_numpy(self.holdout.mask(block["sample_id"].numpy()))
        keep = held if self.part == "val" else ~held
        return {k: v[keep] for k, v in block.items()}


def memory_batches(memory: dict[str, torch.Tensor], batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                   world_size: int = 1, replay: Replay | None = None) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Shuffled batches of an in-memory set (see `TrainingData.to_memory`): yields (this rank's rows, global rows).

    `batch_size` is the global batch: every rank draws the same permutation (seeded by seed and epoch) and takes
    every world_size-th row of each global batch, so all ranks take the same number of steps (DDP needs that) and
    no row is dropped or repeated; a trainer rescales the loss by local / global rows to get the global mean.

    The permutation is over samples. With stored views each sample contributes the row of its view for the epoch
    (`Replay.choose`, the same on every rank) and its input under that view's parameters; with a fresh `replay`,
    its input under new parameters; with views but no `replay`, its first view's row and the unaugmented input.
    """
    x = memory["x"]
    n, device = len(x), memory["sample_id"].device
    views = len(memory["sample_id"]) // max(n, 1)
    rows = torch.arange(n, device=device) * views  # each sample's row for this epoch
    params: dict[str, torch.Tensor] = {}
    if replay is not None and replay.stored:
        rows += torch.from_numpy(replay.choose(seed, epoch, memory["sample_id"][::views].cpu().numpy())).to(device)
    elif replay is not None:
        params = params_tensors(replay.fresh_params(seed, epoch, memory["sample_id"].cpu().numpy()), device)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).to(device)
    for a in range(0, n, batch_size):
        glob = perm[a : a + batch_size]
        idx = glob[rank::world_size]
        r = rows[idx] if views > 1 else idx
        batch = {k: v[r] for k, v in memory.items() if k != "x"}
        batch["x"] = x[idx]
        if replay is not None:
            batch["x"] = replay.apply(batch["x"], {k: batch[k] for k in replay.param_names} if replay.stored
                                      else {k: v[idx] for k, v in params.items()})
        yield batch, len(glob)
