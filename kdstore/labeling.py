"""`kdstore label`: run teachers once over a transfer set and commit their targets as a new version."""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore import __version__, targets
from kdstore.device import autocast, resolve_device, resolve_precision
from kdstore.errors import ConfigError, InputError, ShapeMismatchError, TeacherError
from kdstore.manifest import FORMAT_VERSION
from kdstore.store import VersionWriter, check_name, encode_bfloat16
from kdstore.store.formats import FORMATS, sha256_file
from kdstore.teachers import Teacher, load_teacher
from kdstore.transfer import TransferSet, open_transfer

LOGITS_DTYPES = ("float16", "bfloat16", "float32")
FIDELITY_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)


@dataclass(frozen=True)
class LabelConfig:
    """Everything `kdstore label` needs; validated on construction."""

    teachers: tuple[str, ...]
    transfer: str
    out: str
    name: str
    format: str = "parquet"
    top_k: int | None = 10
    keep_logits: bool = True
    logits_dtype: str = "float16"
    batch_size: int = 1024
    device: str = "auto"
    precision: str = "auto"
    input_columns: tuple[str, ...] = ()
    label_column: str | None = None
    shard_rows: int = 32768
    row_group_rows: int = 2048
    tail: str = "uniform"
    shard_index: int = 0
    num_shards: int = 1

    def __post_init__(self) -> None:
        errors = []
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            errors.append(f"--shard {self.shard_index}/{self.num_shards}: expected i/N with 0 <= i < N")
        if not self.teachers:
            errors.append("--teacher is required (one or more)")
        check_name(self.name)
        if self.format not in FORMATS:
            errors.append(f"--format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.top_k is not None and self.top_k < 1:
            errors.append(f"--top-k {self.top_k}: must be >= 1 (or 0 to store no top-k)")
        if not self.keep_logits and self.top_k is None:
            errors.append("--no-logits with --top-k 0 would store no targets; keep logits or give --top-k K")
        if self.logits_dtype not in LOGITS_DTYPES:
            errors.append(f"--logits-dtype {self.logits_dtype!r}: expected one of {', '.join(LOGITS_DTYPES)}")
        if self.batch_size < 1:
            errors.append(f"--batch-size {self.batch_size}: must be >= 1")
        if self.shard_rows < 1 or self.row_group_rows < 1:
            errors.append(f"--shard-rows {self.shard_rows} / --row-group-rows {self.row_group_rows}: must be >= 1")
        if self.tail not in targets.TAIL_MODELS:
            errors.append(f"--tail {self.tail!r}: expected one of {', '.join(targets.TAIL_MODELS)}")
        if errors:
            raise ConfigError("; ".join(errors))


@dataclass
class LabelResult:
    """`path` is the committed version, or None for a shard job whose version another job will commit."""

    path: Path | None
    manifest: dict[str, Any]
    resumed_shards: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def label(config: LabelConfig, progress: Callable[[int], None] | None = None) -> LabelResult:
    """Run the teachers once over the transfer set and commit a new version of `config.name`.

    Resumes an interrupted run with the same settings from its last completed shard.

    Args:
        config: the run's settings.
        progress: called with the number of rows just finished (including rows of resumed shards).

    Returns:
        the committed version's path and manifest.
    """
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    ts = open_transfer(config.transfer, input_columns=config.input_columns or None, label_column=config.label_column)
    try:
        return _label(config, ts, device, precision, t_start, progress)
    finally:
        ts.close()


def _label(config: LabelConfig, ts: TransferSet, device: torch.device, precision: str, t_start: float,
           progress: Callable[[int], None] | None) -> LabelResult:
    teachers = [load_teacher(s) for s in config.teachers]
    for t in teachers:
        t.module.to(device)
    num_classes = _probe_classes(teachers, ts, device, precision)
    if config.top_k is not None and config.top_k > num_classes:
        raise ConfigError(f"--top-k {config.top_k}: the teachers have {num_classes} classes; use 1..{num_classes}")
    k = config.top_k
    ids = [f"t{i}" for i in range(len(teachers))]
    columns = _column_specs(ids, num_classes, k, config, ts.has_labels)
    shard_meta = {
        "format_version": FORMAT_VERSION,
        "name": config.name,
        "columns": columns,
        "teachers": [t.sha256 for t in teachers],
    }
    # The transfer set's sha256 is computed on a thread while the teachers run (hashing a large file first
    # would add its whole read time to the run); the resume key uses its identity (path, size, mtime) instead.
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdstore-hash")
    transfer_sha = hashing.submit(sha256_file, ts.path)
    hashing.shutdown(wait=False)
    st = ts.path.stat()
    key_material = {"meta": shard_meta, "transfer": [str(ts.path.resolve()), st.st_size, st.st_mtime_ns],
                    "batch_size": config.batch_size, "device": device.type,
                    "precision": precision, "tail": config.tail, "k": k, "inputs": ts.input_columns,
                    "labels": ts.label_column, "shard_rows": config.shard_rows, "rg": config.row_group_rows}
    run_key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()

    sharded = config.num_shards > 1
    with VersionWriter(Path(config.out), config.name, run_key=run_key, fmt=config.format, columns=columns,
                       shard_rows=config.shard_rows, row_group_rows=config.row_group_rows,
                       shard_metadata=shard_meta,
                       participant=f"shard-{config.shard_index}-of-{config.num_shards}" if sharded else "") as writer:
        done = writer.completed()
        n_shards = math.ceil(ts.rows / config.shard_rows)
        # The shard plan depends only on shard_rows, never on the number of jobs: job i of N takes files
        # i, i+N, i+2N, ...; any N (including 1) can finish what any other N started.
        mine = [i for i in range(n_shards) if i % config.num_shards == config.shard_index]
        if progress:
            progress(sum(done[i]["rows"] for i in mine if i in done))
        # Writing (encode + compress + fsync + sha256) runs on a thread so it overlaps the next shard's compute.
        pending: queue.Queue[Any] = queue.Queue(maxsize=2)
        failure: list[BaseException] = []

        def drain() -> None:
            while (item := pending.get()) is not None:
                if not failure:
                    try:
                        writer.write(*item)
                    except BaseException as e:  # surfaced on the main thread below
                        failure.append(e)

        worker = threading.Thread(target=drain, name="kdstore-shard-writer", daemon=True)
        worker.start()
        try:
            for index in mine:
                if index in done:
                    continue
                start = index * config.shard_rows
                stop = min(start + config.shard_rows, ts.rows)
                cols, stats = _label_shard(teachers, ids, ts, start, stop, num_classes, k, config, device,
                                           precision, progress)
                if failure:
                    break
                pending.put((index, start, cols, stats))
        finally:
            pending.put(None)
            worker.join()
        if failure:
            raise failure[0]
        infos = writer.completed()
        if len(infos) < n_shards:
            # Another job still owes shards; the job that completes the last one commits the version.
            return LabelResult(None, {"shards_total": n_shards, "shards_done": len(infos)}, len(done),
                               time.perf_counter() - t_start)
        ts.set_sha256(transfer_sha.result())
        stats = _combine_stats([infos[i]["stats"] for i in sorted(infos)], ids, k)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kdstore_version": __version__,
            "parent": None,
            "num_rows": ts.rows,
            "num_classes": num_classes,
            "class_names": next((d["class_names"] for d in [t.describe("t0", num_classes) for t in teachers]
                                 if d["class_names"]), None),
            "storage": {"format": config.format, "shard_rows": config.shard_rows,
                        "row_group_rows": config.row_group_rows,
                        "compression": "zstd" if config.format == "parquet" else "none"},
            "teachers": [t.describe(i, num_classes) for t, i in zip(teachers, ids, strict=True)],
            "transfer_set": ts.describe(),
            "targets": {
                "logits": {"dtype": config.logits_dtype} if config.keep_logits else None,
                "top_k": ({"k": k, "values_dtype": config.logits_dtype, "indices_dtype": _index_dtype(num_classes),
                           "tail": config.tail} if k else None),
                "logsumexp": {"dtype": "float32"},
                "labels": ts.has_labels,
            },
            "columns": columns,
            "labeling": {"batch_size": config.batch_size, "device": str(device), "precision": precision,
                         "torch_version": torch.__version__, "seconds": round(time.perf_counter() - t_start, 3),
                         "world_size": config.num_shards},
            "statistics": stats,
        }
        path = writer.commit(manifest)
        if path is None:  # another job committed it first
            return LabelResult(None, {"shards_total": n_shards, "shards_done": n_shards}, len(done),
                               time.perf_counter() - t_start)
    return LabelResult(path, json.loads((path / "manifest.json").read_text()), len(done),
                       time.perf_counter() - t_start)


def _index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def _column_specs(ids: list[str], c: int, k: int | None, cfg: LabelConfig, labels: bool) -> list[dict[str, Any]]:
    cols: list[dict[str, Any]] = [{"name": "sample_id", "role": "sample_id", "teacher": None, "dtype": "int64",
                                   "shape": []}]
    if labels:
        cols.append({"name": "label", "role": "label", "teacher": None, "dtype": "int64", "shape": []})
    for tid in ids:
        if cfg.keep_logits:
            cols.append({"name": f"{tid}_logits", "role": "logits", "teacher": tid, "dtype": cfg.logits_dtype,
                         "shape": [c]})
        if k:
            cols.append({"name": f"{tid}_topk_indices", "role": "topk_indices", "teacher": tid,
                         "dtype": _index_dtype(c), "shape": [k]})
            cols.append({"name": f"{tid}_topk_values", "role": "topk_values", "teacher": tid,
                         "dtype": cfg.logits_dtype, "shape": [k]})
        cols.append({"name": f"{tid}_logsumexp", "role": "logsumexp", "teacher": tid, "dtype": "float32", "shape": []})
    return cols


def _forward(teacher: Teacher, x: np.ndarray, device: torch.device, precision: str) -> torch.Tensor:
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True)
    try:
        with torch.inference_mode(), autocast(device, precision):
            out = teacher.module(xt)
    except Exception as e:  # a shape the teacher rejects is the commonest cause
        raise TeacherError(
            f"--teacher {teacher.source}: forward pass failed on inputs of shape {tuple(xt.shape)} "
            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
            "check --input-column and the teacher's input size"
        ) from None
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != xt.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherError(f"--teacher {teacher.source}: output {shape} for a batch of {xt.shape[0]}; "
                           "expected logits of shape (batch, classes)")
    return out.float()


def _probe_classes(teachers: list[Teacher], ts: TransferSet, device: torch.device, precision: str) -> int:
    x, _ = ts.read_rows(0, min(2, ts.rows))
    counts = [(_forward(t, x, device, precision).shape[1], t.source) for t in teachers]
    if len({c for c, _ in counts}) > 1:
        raise ShapeMismatchError("--teacher: the teachers disagree on the number of classes: "
                                 + ", ".join(f"{s} has {c}" for c, s in counts) + "; an ensemble needs one class set")
    c = counts[0][0]
    if c < 2:
        raise TeacherError(f"--teacher {teachers[0].source}: outputs {c} class; at least 2 are needed")
    return int(c)


def _to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    a = t.float().numpy()
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.astype(np.float16)
    return encode_bfloat16(a)


def _label_shard(
    teachers: list[Teacher], ids: list[str], ts: TransferSet, start: int, stop: int, c: int, k: int | None,
    cfg: LabelConfig, device: torch.device, precision: str, progress: Callable[[int], None] | None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the teachers over rows [start, stop); return the shard's columns and partial statistics.

    Per batch only the teachers run; everything row-wise (log-sum-exp, top-k, statistics) is computed once per
    shard on the whole block. Few large ops instead of many small ones: on a CPU whose cores are shared, every
    small multi-threaded op can stall for a scheduler time slice.
    """
    logits: dict[str, list[torch.Tensor]] = {tid: [] for tid in ids}
    labels: list[np.ndarray] = []
    for first, x, y in _prefetch(ts.iter_batches(cfg.batch_size, start, stop)):
        if y is not None:
            bad = np.flatnonzero((y < 0) | (y >= c))
            if len(bad):
                raise InputError(f"--transfer {ts.path}: row {first + bad[0]} has label {y[bad[0]]}, outside the "
                                 f"teachers' class range 0..{c - 1}; fix the labels or pass --label-column none")
            labels.append(y.astype(np.int64))
        for t, tid in zip(teachers, ids, strict=True):
            z = _forward(t, x, device, precision)
            if z.shape[1] != c:
                raise ShapeMismatchError(f"--teacher {t.source}: {z.shape[1]} classes, expected {c}")
            logits[tid].append(z)
        if progress:
            progress(len(x))
    n = stop - start
    cols: dict[str, np.ndarray] = {"sample_id": np.arange(start, stop, dtype=np.int64)}
    y_all = np.concatenate(labels) if labels else None
    y_dev = torch.from_numpy(y_all).to(device) if y_all is not None else None
    if y_all is not None:
        cols["label"] = y_all
    store_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.logits_dtype]
    stats: dict[str, Any] = {"rows": n, "labeled": n if y_all is not None else 0, "teachers": {}}
    probs_sum = torch.zeros(n, c, device=device)
    for t, tid in zip(teachers, ids, strict=True):
        z = torch.cat(logits.pop(tid))
        finite = torch.isfinite(z).all(dim=1)
        if not bool(finite.all()):
            row = start + int(torch.nonzero(~finite)[0, 0])
            raise TeacherError(f"--teacher {t.source}: NaN or Inf logits for row {row} of {ts.path}; "
                               "nothing was committed; check the teacher and that input row")
        lse = targets.logsumexp(z)
        if cfg.keep_logits:
            cols[f"{tid}_logits"] = _to_storage(z.cpu(), cfg.logits_dtype)
        # statistics, from the full logits in memory (whether or not they are kept)
        logp = torch.log_softmax(z, dim=1)
        probs_sum += logp.exp()
        entry: dict[str, Any] = {"entropy_sum": float(targets.entropy(logp).double().sum()),
                                 "correct": int((z.argmax(1) == y_dev).sum()) if y_dev is not None else 0,
                                 "topk_mass_sum": 0.0, "fidelity_sum": {}}
        if k:
            v, idx = targets.top_k(z, k)
            cols[f"{tid}_topk_indices"] = idx.cpu().numpy().astype(_index_dtype(c))
            cols[f"{tid}_topk_values"] = _to_storage(v.cpu(), cfg.logits_dtype)
            vq = v.to(store_dtype).float()  # fidelity of the values as stored
            entry["topk_mass_sum"] = float(torch.exp(v - lse[:, None]).double().sum())
            fid = targets.topk_fidelity(z, vq, idx, lse, FIDELITY_TEMPERATURES, cfg.tail)  # type: ignore[arg-type]
            entry["fidelity_sum"] = {str(float(temp)): float(kl.double().sum()) for temp, kl in fid.items()}
        cols[f"{tid}_logsumexp"] = lse.cpu().numpy()
        stats["teachers"][tid] = entry
    stats["ensemble_correct"] = int((probs_sum.argmax(1) == y_dev).sum()) if y_dev is not None else 0
    return cols, stats


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


def _combine_stats(parts: list[dict[str, Any]], ids: list[str], k: int | None) -> dict[str, Any]:
    rows = sum(p["rows"] for p in parts)
    labeled = sum(p["labeled"] for p in parts)
    out: dict[str, Any] = {"rows": rows, "labeled_rows": labeled, "teachers": {}}
    for tid in ids:
        tp = [p["teachers"][tid] for p in parts]
        correct = sum(s["correct"] for s in tp)
        entry: dict[str, Any] = {
            "accuracy": (correct / labeled) if labeled else None,
            "errors": (labeled - correct) if labeled else None,
            "mean_entropy_nats": sum(s["entropy_sum"] for s in tp) / rows,
        }
        if k:
            entry["topk_mass_mean"] = sum(s["topk_mass_sum"] for s in tp) / rows
            # JSON has no Infinity: a KL that is not finite (always, for the "drop" tail) is recorded as null.
            entry["topk_fidelity_kl"] = {t: _finite_or_none(sum(s["fidelity_sum"].get(t, 0.0) for s in tp) / rows)
                                         for t in (str(float(x)) for x in FIDELITY_TEMPERATURES)}
        out["teachers"][tid] = entry
    if len(ids) > 1 and labeled:
        correct = sum(p["ensemble_correct"] for p in parts)
        out["ensemble"] = {"combine": "mean-prob", "accuracy": correct / labeled, "errors": labeled - correct}
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def config_dict(config: LabelConfig) -> dict[str, Any]:
    """The config as plain JSON-able data."""
    return asdict(config)
