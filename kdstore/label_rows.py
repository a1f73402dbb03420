"""The rows of one shard of a `kdstore label` run: transfer batches through the teachers, turned into the columns
a version stores, a chunk of rows at a time (`label_shard`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdstore import reproducible, versioning
from kdstore.device import autocast
from kdstore.errors import InputError, ShapeMismatchError, TeacherError, arg
from kdstore.features import FeatureStatistics, capture
from kdstore.teachers import Teacher
from kdstore.transfer import TransferSet
from kdstore.views import ViewPlan

if TYPE_CHECKING:
    from kdstore.label_features import LabelFeatures
    from kdstore.labeling import LabelConfig


def forward(teacher: Teacher, x: np.ndarray, device: torch.device, precision: str) -> torch.Tensor:
    xt = reproducible.device_input(x, device)
    try:
        with torch.inference_mode(), autocast(device, precision):
            out = teacher.module(xt)
    except Exception as e:  # a shape the teacher rejects is the commonest cause
        raise TeacherError(
            f"{arg('teacher')} {teacher.source}: forward pass failed on inputs of shape {tuple(xt.shape)} "
            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
            f"check {arg('input_columns')} and the teacher's input size"
        ) from None
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != xt.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherError(f"{arg('teacher')} {teacher.source}: output {shape} for a batch of {xt.shape[0]}; "
                           "expected logits of shape (batch, classes)")
    return out.float()


def probe_classes(teachers: list[Teacher], ts: TransferSet, device: torch.device, precision: str) -> int:
    x, _ = ts.read_rows(0, min(2, ts.rows))
    counts = [(forward(t, x, device, precision).shape[1], t.source) for t in teachers]
    if len({c for c, _ in counts}) > 1:
        raise ShapeMismatchError(f"{arg('teacher')}: the teachers disagree on the number of classes: "
                                 + ", ".join(f"{s} has {c}" for c, s in counts) + "; an ensemble needs one class set")
    c = counts[0][0]
    if c < 2:
        raise TeacherError(f"{arg('teacher')} {teachers[0].source}: outputs {c} class; at least 2 are needed")
    return int(c)


@dataclass
class _Piece:
    """Rows of a shard waiting to be turned into stored targets: each teacher's logits and the rows' metadata."""

    zs: list[torch.Tensor]  # per teacher (n, C)
    rows: torch.Tensor  # (n,) version row ids
    meta: dict[str, np.ndarray]  # sample_id, label, view columns: (n, ...)
    labels: torch.Tensor | None  # (n,) on the device

    def __len__(self) -> int:
        return len(self.rows)


@torch.inference_mode()
def label_shard(
    teachers: list[Teacher], ids: list[str], ts: TransferSet, start: int, stop: int, c: int, k: int | None,
    cfg: LabelConfig, device: torch.device, precision: str, progress: Callable[[int], None] | None,
    plan: ViewPlan | None = None, feats: LabelFeatures | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the teachers over samples [start, stop) (each as its `plan` views, if any); return the shard's columns
    and partial statistics.

    Logits are turned into stored targets a chunk of rows at a time, a chunk holding about
    `versioning.CHUNK_ELEMENTS` logits: many batches at small C (a few large operations: on a CPU shared with other
    jobs every small multi-threaded operation can stall for a scheduler time slice), part of one batch at an
    LLM-sized C (memory bounded by the batch and the chunk, never by the shard or C; only the stored columns
    accumulate: full logits when kept, else k values per row). With `feats`, the first teacher's named modules are
    captured during its forward pass and stored as feature columns (`kdstore.label_features`).
    """
    if feats is not None:
        feats.stats = FeatureStatistics()  # this shard's sums
        with capture(teachers[0].module, feats.spec.modules, teachers[0].source) as got:
            cols, partial = _label_shard(teachers, ids, ts, start, stop, c, k, cfg, device, precision, progress, plan,
                                         (feats, got))
        return cols, {**partial, "features": feats.stats.partial()}
    return _label_shard(teachers, ids, ts, start, stop, c, k, cfg, device, precision, progress, plan, None)


def _label_shard(
    teachers: list[Teacher], ids: list[str], ts: TransferSet, start: int, stop: int, c: int, k: int | None,
    cfg: LabelConfig, device: torch.device, precision: str, progress: Callable[[int], None] | None,
    plan: ViewPlan | None, feats: tuple[LabelFeatures, dict[str, torch.Tensor]] | None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    stats = versioning.TargetStatistics(ids, c, k, cfg.tail)
    step = versioning.rows_per_chunk(c)
    views = plan.count if plan else 1
    # narrow outputs gather up to step + a batch of rows into one chunk; wide ones cut a batch into chunks of step
    scratch = torch.empty(min(step + cfg.batch_size, (stop - start) * views), c, device=device)
    parts: list[dict[str, np.ndarray]] = []
    pending: list[_Piece] = []
    batch = plan.samples_per(cfg.batch_size) if plan else cfg.batch_size
    for first, x, y in _prefetch(ts.iter_batches(batch, start, stop)):
        piece = _piece(teachers, x, y, first, c, ts, device, precision, plan, feats)
        if len(piece) >= step:  # wide outputs: chunks of this batch alone, nothing carried to the next
            while len(piece):
                head, rest = _take([piece], step)
                parts.append(_store_chunk(head, teachers, ids, stats, scratch, c, k, cfg, ts, plan))
                piece = rest[0] if rest else _Piece([], piece.rows[:0], {}, None)
        else:  # narrow outputs: gather batches into one chunk
            pending.append(piece)
            if sum(map(len, pending)) >= step:
                chunk, pending = _take(pending, sum(map(len, pending)))
                parts.append(_store_chunk(chunk, teachers, ids, stats, scratch, c, k, cfg, ts, plan))
        del piece
        if progress:
            progress(len(x))
    if pending:
        parts.append(_store_chunk(_take(pending, sum(map(len, pending)))[0], teachers, ids, stats, scratch, c, k,
                                  cfg, ts, plan))
    cols = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return cols, stats.partial()


def _piece(teachers: list[Teacher], x: np.ndarray, y: np.ndarray | None, first: int, c: int, ts: TransferSet,
           device: torch.device, precision: str, plan: ViewPlan | None,
           feats: tuple[LabelFeatures, dict[str, torch.Tensor]] | None = None) -> _Piece:
    """One batch of samples through the teachers (as its views, if any); with `feats`, the first teacher's
    captured outputs become feature columns."""
    labels = _checked_labels(y, first, c, ts, device)
    meta: dict[str, np.ndarray] = {"sample_id": np.arange(first, first + len(x), dtype=np.int64)}
    views = plan.count if plan else 1
    if plan is not None:
        x, samples, view_idx, params = plan.expand(x, first)
        meta = {"sample_id": samples, "view": view_idx.astype(np.int16), **params}
        labels = labels.repeat_interleave(views) if labels is not None else None
    if y is not None:
        meta["label"] = np.repeat(y.astype(np.int64), views)
    rows = torch.arange(first * views, first * views + len(x), device=device)  # version rows
    zs = [_checked_logits(t, forward(t, x, device, precision), c, first, ts) for t in teachers[:1]]
    if feats is not None:  # captured by the first teacher's forward pass
        meta.update(feats[0].columns(feats[1], len(x)))
    zs += [_checked_logits(t, forward(t, x, device, precision), c, first, ts) for t in teachers[1:]]
    return _Piece(zs, rows, meta, labels)


def _take(pieces: list[_Piece], n: int) -> tuple[_Piece, list[_Piece]]:
    """The first `n` rows of `pieces` as one piece, and what is left."""
    head: list[_Piece] = []
    while pieces and sum(map(len, head)) < n:
        need = n - sum(map(len, head))
        p = pieces.pop(0)
        if len(p) > need:
            rest = _Piece([z[need:] for z in p.zs], p.rows[need:], {k: v[need:] for k, v in p.meta.items()},
                          p.labels[need:] if p.labels is not None else None)
            p = _Piece([z[:need] for z in p.zs], p.rows[:need], {k: v[:need] for k, v in p.meta.items()},
                       p.labels[:need] if p.labels is not None else None)
            pieces.insert(0, rest)
        head.append(p)
    if len(head) == 1:
        return head[0], pieces
    zs = [torch.cat([p.zs[i] for p in head]) for i in range(len(head[0].zs))]
    meta = {k: np.concatenate([p.meta[k] for p in head]) for k in head[0].meta}
    labels = torch.cat([p.labels for p in head if p.labels is not None]) if head[0].labels is not None else None
    return _Piece(zs, torch.cat([p.rows for p in head]), meta, labels), pieces


def _store_chunk(p: _Piece, teachers: list[Teacher], ids: list[str], stats: versioning.TargetStatistics,
                 scratch: torch.Tensor, c: int, k: int | None, cfg: LabelConfig, ts: TransferSet,
                 plan: ViewPlan | None) -> dict[str, np.ndarray]:
    """A chunk's stored columns (and its statistics added to `stats`)."""
    fid = stats.fidelity_rows(p.rows)
    refs = {tid: None if cfg.keep_logits else z[fid] for tid, z in zip(ids, p.zs, strict=True)}
    stored = {tid: versioning.stored_targets(z, k=k, keep_logits=cfg.keep_logits, precision=cfg.logits_dtype,
                                             scratch=scratch[: len(z)]) for tid, z in zip(ids, p.zs, strict=True)}
    _check_finite(stored, teachers, ids, p.meta["sample_id"], ts)
    identity = torch.from_numpy(p.meta["view"] == 0).to(p.rows.device) if plan and plan.identity_first else None
    stats.add(p.rows, p.labels, stored, refs, identity)
    chunk = dict(p.meta)
    for tid, st in stored.items():
        chunk.update(st.columns(tid, versioning.index_dtype(c)))
    return chunk


def _checked_labels(y: np.ndarray | None, first: int, c: int, ts: TransferSet,
                    device: torch.device) -> torch.Tensor | None:
    if y is None:
        return None
    bad = np.flatnonzero((y < 0) | (y >= c))
    if len(bad):
        raise InputError(f"{arg('transfer')} {ts.path}: row {first + bad[0]} has label {y[bad[0]]}, outside the "
                         f"teachers' class range 0..{c - 1}; fix the labels or pass {arg('label_column')} none")
    return torch.from_numpy(y.astype(np.int64)).to(device)


def _checked_logits(t: Teacher, z: torch.Tensor, c: int, first: int, ts: TransferSet) -> torch.Tensor:
    if z.shape[1] != c:
        raise ShapeMismatchError(f"{arg('teacher')} {t.source}: {z.shape[1]} classes, expected {c}")
    return z


def _check_finite(stored: dict[str, versioning.StoredTargets], teachers: list[Teacher], ids: list[str],
                  samples: np.ndarray, ts: TransferSet) -> None:
    """A NaN or +inf logit makes its row's log-sum-exp NaN or +inf, as does a row of only -inf: one check per row
    instead of one per logit (a -inf logit among finite ones is a class of probability 0, and fine)."""
    for t, tid in zip(teachers, ids, strict=True):
        finite = torch.isfinite(stored[tid].lse)
        if not bool(finite.all()):
            row = int(samples[int(torch.nonzero(~finite)[0, 0])])
            raise TeacherError(f"{arg('teacher')} {t.source}: NaN or Inf logits for row {row} of {ts.path}; "
                               "nothing was committed; check the teacher and that input row")


def _prefetch(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Read transfer-set batches on a thread, `depth` ahead, so reading overlaps the teachers' compute."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def reader() -> None:
        try:
            for item in batches:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
            return
        q.put(done)

    th = threading.Thread(target=reader, name="kdstore-transfer-reader", daemon=True)
    th.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while th.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.01)
