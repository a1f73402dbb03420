"""Per-token targets as torch data: a map-style `TokenTargetDataset` (one row = one sequence), a `collate` that makes
batches of [B, L] masks and labels and [B, L, K] top-k or sampled targets, and `stream_batches`, which reads a
version one row group at a time in a shuffled order (flat memory).

Usable without kdstore's trainer, e.g. inside a Hugging Face ``Trainer`` (docs/lm.md, "Training"):

    ds = TokenTargetDataset(open_version("targets/smol-lee"), targets="topk")
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate)
    # batch: input_ids, attention_mask, loss_mask, target_mask, labels (B, L);
    #        topk_values, topk_indices (B, L, k), logsumexp, tail_logmass (B, L)   [targets="topk"]
    #        sample_ids, sample_counts, sample_logprobs (B, L, K)                 [targets="sampled"]
    #        feature:COLUMN (B, L, D) float16/32, the stored per-token features    [features=(COLUMN, ...)]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdstore.errors import ConfigError, StoreFormatError, arg
from kdstore.lm_losses import IGNORE, next_token_labels
from kdstore.store import Version
from kdstore.store.ragged import Ragged
from kdstore.targets import truncate_topk

TARGETS = ("topk", "sampled", "none")
_MASKS = ("attention_mask", "loss_mask", "target_mask")
_TOPK = ("topk_indices", "topk_values", "logsumexp", "tail_logmass")
_SAMPLED = ("sample_ids", "sample_counts", "sample_logprobs")


def token_columns(version: Version, targets: str, teacher: str = "t0") -> dict[str, str]:
    """{role: column name} of what `targets` needs from a per-token version (input ids and masks always).

    Raises:
        ConfigError: not a per-token version, or it stores no such targets (what it has is named).
    """
    t = version.manifest["targets"]
    if t.get("kind") != "tokens":
        raise ConfigError(f"{version.ref} holds {t.get('kind', 'classification')} targets, not per-token targets "
                          "(label it with a language-model teacher)")
    if targets not in TARGETS:
        raise ConfigError(f"{arg('targets')} {targets!r}: expected one of {', '.join(TARGETS)}")
    roles = {"input_ids": "input_ids", **{m: m for m in _MASKS}}
    wanted = _TOPK if targets == "topk" else _SAMPLED if targets == "sampled" else ()
    have = ", ".join(x for x in (f"top-{t['top_k']['k']}" if t.get("top_k") else "",
                                 f"{t['sampled']['draws']} draws" if t.get("sampled") else "") if x) or "nothing"
    for role in wanted:
        name = version.column_for(role, teacher)
        if name is None:
            how = ("--loss sampled" if t.get("sampled") else "") or ("--loss topk" if t.get("top_k") else "")
            raise ConfigError(f"{version.ref} stores no {role} ({have} stored) for {targets} targets"
                              + (f"; use {how}" if how else "")
                              + ("; sampled targets need their log-probs (labeled without --no-sample-logprobs)"
                                 if role == "sample_logprobs" else ""))
        roles[role] = name
    return roles


class TokenTargetDataset(Dataset[dict[str, Any]]):
    """The rows of a per-token version in memory: item i is row `rows[i]` as numpy arrays (one sequence).

    Args:
        version: an open per-token version.
        targets: "topk", "sampled" or "none" (ids and masks only: hard next-token training).
        k: use the first k of a stored top-k (the dropped entries join the exact tail, `targets.truncate_topk`).
        rows: which rows (default all), e.g. a training or held-out split.
        features: stored per-token feature columns to read too (item ``feature:COLUMN``, (L, D)).
    """

    def __init__(self, version: Version, targets: str = "topk", *, k: int | None = None,
                 rows: Sequence[int] | np.ndarray | None = None, teacher: str = "t0",
                 features: Sequence[str] = ()) -> None:
        self.version, self.targets = version, targets
        self.roles = {**token_columns(version, targets, teacher), **feature_roles(version, features)}
        stored_k = version.top_k
        if k is not None and (targets != "topk" or stored_k is None or not 1 <= k <= stored_k):
            raise ConfigError(f"{arg('top_k')} {k}: must be in [1, {stored_k}] (the stored top-k) and needs "
                              "top-k targets")
        self.k = k
        raw = version.read_all(list(self.roles.values()))
        self.data = {role: raw[name] for role, name in self.roles.items()}
        self._offsets = {r: v.offsets() for r, v in self.data.items() if isinstance(v, Ragged)}
        self.rows = np.arange(version.num_rows) if rows is None else np.asarray(rows, np.int64)
        self.seq_len = int(version.manifest["targets"]["seq_len"])
        self.vocab_size = int(version.manifest["targets"]["vocab_size"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = int(self.rows[i])
        item: dict[str, Any] = {}
        for role, col in self.data.items():
            if isinstance(col, Ragged):  # per position a list: keep the row's flat values and lengths
                off, L = self._offsets[role], self.seq_len
                item[role] = col.values[off[r * L] : off[(r + 1) * L]]
                item["sample_lengths"] = col.lengths[r]
            else:
                item[role] = col[r]
        if self.k is not None and self.k < item["topk_values"].shape[-1]:
            v, ix, tail = truncate_topk(*(torch.tensor(np.asarray(item[r], np.int64 if r == "topk_indices"
                                                                  else np.float32))
                                          for r in ("topk_values", "topk_indices", "logsumexp", "tail_logmass")),
                                        self.k)
            item["topk_values"], item["topk_indices"] = v.numpy(), ix.numpy()
            item["tail_logmass"] = tail.numpy() if tail is not None else item["tail_logmass"]
        return item


def feature_roles(version: Version, columns: Sequence[str]) -> dict[str, str]:
    """{``feature:COLUMN``: COLUMN} for stored feature columns (StoreFormatError: a column the version lacks)."""
    missing = [c for c in columns if c not in version.columns]
    if missing:
        raise StoreFormatError(f"{version.ref}: no feature column {', '.join(missing)}")
    return {f"feature:{c}": c for c in columns}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack rows into a batch: int64 ids and labels (`lm_losses.next_token_labels`: IGNORE where not counted),
    int8 masks, float32 / int64 top-k (B, L, k); sampled draws padded to the batch's largest count K (id -1,
    count 0, log-prob -inf in empty slots)."""
    if not items:
        raise ConfigError("collate: an empty batch")
    out: dict[str, Tensor] = {}
    first = items[0]
    out["input_ids"] = torch.from_numpy(np.stack([it["input_ids"] for it in items]).astype(np.int64))
    for m in _MASKS:
        out[m] = torch.from_numpy(np.stack([it[m] for it in items]).astype(np.int8))
    out["labels"] = next_token_labels(out["input_ids"], out["loss_mask"], out["attention_mask"])
    if "topk_values" in first:
        out["topk_values"] = torch.from_numpy(np.stack([it["topk_values"] for it in items]).astype(np.float32))
        out["topk_indices"] = torch.from_numpy(np.stack([it["topk_indices"] for it in items]).astype(np.int64))
        out["logsumexp"] = torch.from_numpy(np.stack([it["logsumexp"] for it in items]).astype(np.float32))
        out["tail_logmass"] = torch.from_numpy(np.stack([it["tail_logmass"] for it in items]).astype(np.float32))
    if "sample_ids" in first:
        lengths = np.stack([it["sample_lengths"] for it in items]).astype(np.int64)  # (B, L)
        b, n = lengths.shape
        k = int(lengths.max()) if lengths.size else 0
        flat = lengths.reshape(-1)
        pos = np.repeat(np.arange(b * n), flat)
        slot = np.arange(flat.sum()) - np.repeat(np.cumsum(flat) - flat, flat)
        ids = np.full((b * n, k), -1, np.int64)
        counts = np.zeros((b * n, k), np.int64)
        lps = np.full((b * n, k), -np.inf, np.float32)
        ids[pos, slot] = np.concatenate([it["sample_ids"] for it in items])
        counts[pos, slot] = np.concatenate([it["sample_counts"] for it in items])
        lps[pos, slot] = np.concatenate([it["sample_logprobs"] for it in items])
        out["sample_ids"] = torch.from_numpy(ids.reshape(b, n, k))
        out["sample_counts"] = torch.from_numpy(counts.reshape(b, n, k))
        out["sample_logprobs"] = torch.from_numpy(lps.reshape(b, n, k))
    for role in (r for r in first if r.startswith("feature:")):  # stored dtype (float16): cast where compared
        out[role] = torch.from_numpy(np.stack([it[role] for it in items]))
    return out


def stream_batches(version: Version, targets: str, batch_size: int, *, seed: int, epoch: int,
                   keep: np.ndarray | None = None, k: int | None = None, shuffle: bool = True,
                   teacher: str = "t0", features: Sequence[str] = ()) -> Iterator[dict[str, Tensor]]:
    """Batches of `batch_size` rows read one row group at a time: the row groups in an order drawn from
    (seed, epoch), the rows inside each shuffled too; only one row group (and a partial batch) is in memory.

    Args:
        keep: (num_rows,) bool, the rows to use (a training or held-out split); default all.
        features: stored per-token feature columns to read too (``feature:COLUMN`` in each batch).
    """
    if batch_size < 1:
        raise ConfigError(f"{arg('batch_size')} {batch_size}: must be >= 1")
    roles = {**token_columns(version, targets, teacher), **feature_roles(version, features)}
    groups = [(i, g, version.files[i]["first_row"] + a, b - a)
              for i in range(len(version.files)) for g, (a, b) in enumerate(version.row_groups(i))]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
    pending: list[dict[str, Any]] = []
    for gi in order:
        fi, g, first, n = groups[gi]
        raw = version.read_file(fi, list(roles.values()), [g])
        block = {role: raw[name] for role, name in roles.items()}
        if len(block["input_ids"]) != n:
            raise StoreFormatError(f"{version.ref}: row group {g} of file {fi} has {len(block['input_ids'])} rows, "
                                   f"expected {n}")
        ds = _BlockRows(block, version, targets, k)
        rows = np.arange(n)
        if keep is not None:
            rows = rows[keep[first : first + n]]
        if shuffle:
            rows = rng.permutation(rows)
        for r in rows:
            pending.append(ds[int(r)])
            if len(pending) == batch_size:
                yield collate(pending)
                pending = []
    if pending:
        yield collate(pending)


class _BlockRows(TokenTargetDataset):
    """The rows of one row group already read (no second read of the version)."""

    def __init__(self, block: dict[str, Any], version: Version, targets: str, k: int | None) -> None:
        self.version, self.targets, self.k, self.data = version, targets, k, block
        self._offsets = {r: v.offsets() for r, v in block.items() if isinstance(v, Ragged)}
        self.rows = np.arange(len(block["input_ids"]))
        self.seq_len = int(version.manifest["targets"]["seq_len"])
        self.vocab_size = int(version.manifest["targets"]["vocab_size"])


def holdout_rows(version: Version, fraction: float, seed: int = 0) -> np.ndarray:
    """(num_rows,) bool: the rows held out for validation, by a counter-based hash of sample_id
    (`kdstore.data.Holdout`), so every loss, seed and data path holds out the same sequences.

    Raises:
        ConfigError: the fraction leaves no held-out or no training rows.
    """
    from kdstore.data import Holdout

    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"{arg('val_fraction')} {fraction:g}: must be in (0, 1)")
    ids = version.read_all(["sample_id"])["sample_id"]
    mask = Holdout(fraction, seed).mask(ids)
    if not mask.any() or mask.all():
        raise ConfigError(f"{arg('val_fraction')} {fraction:g}: holds out {int(mask.sum())} of {len(ids)} rows; "
                          "choose a fraction that leaves rows on both sides")
    return mask


__all__ = ["IGNORE", "TARGETS", "TokenTargetDataset", "collate", "holdout_rows", "stream_batches", "token_columns"]
