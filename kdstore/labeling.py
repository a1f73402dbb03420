"""`kdstore label`: run teachers once over a transfer set and commit their targets as a new version."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kdstore import label_features, memory, reproducible, targets, versioning
from kdstore.augment import parse_augment
from kdstore.device import resolve_device, resolve_precision
from kdstore.errors import ConfigError, arg
from kdstore.features import FeatureSpec
from kdstore.label_features import LabelFeatures
from kdstore.label_rows import label_shard, probe_classes
from kdstore.options import LOGITS_DTYPES
from kdstore.store import FORMATS, VersionWriter, check_name, sha256_file
from kdstore.store.publish import push
from kdstore.store.remote import is_remote, outbox_dir
from kdstore.teachers import Teacher, load_teacher
from kdstore.transfer import TransferSet, open_transfer
from kdstore.views import ViewPlan


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
    views: int = 1
    augment: str | None = None
    augment_seed: int = 0
    identity_view: bool = True
    features: tuple[str, ...] = ()
    feature_pool: str = "none"
    feature_rank: int | None = None
    feature_variance: float | None = None
    feature_fit_rows: int = 8192
    feature_dtype: str = "float16"

    def __post_init__(self) -> None:
        errors = []
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            errors.append(f"{arg('shard')} {self.shard_index}/{self.num_shards}: expected i/N with 0 <= i < N")
        if not self.teachers:
            errors.append(f"{arg('teachers')} is required (one or more)")
        check_name(self.name)
        if self.format not in FORMATS:
            errors.append(f"{arg('format')} {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.top_k is not None and self.top_k < 1:
            errors.append(f"{arg('top_k')} {self.top_k}: must be >= 1 (or 0 to store no top-k)")
        if not self.keep_logits and self.top_k is None:
            errors.append(f"nothing to store: no full logits ({arg('keep_logits')} False) and no top-k "
                          f"({arg('top_k')} 0); keep the logits or give {arg('top_k')} K")
        if self.logits_dtype not in LOGITS_DTYPES:
            errors.append(f"{arg('logits_dtype')} {self.logits_dtype!r}: expected one of {', '.join(LOGITS_DTYPES)}")
        if self.batch_size < 1:
            errors.append(f"{arg('batch_size')} {self.batch_size}: must be >= 1")
        if self.shard_rows < 1 or self.row_group_rows < 1:
            errors.append(f"{arg('shard_rows')} {self.shard_rows} / {arg('row_group_rows')} {self.row_group_rows}: "
                          "must be >= 1")
        if self.tail not in targets.TAIL_MODELS:
            errors.append(f"{arg('tail')} {self.tail!r}: expected one of {', '.join(targets.TAIL_MODELS)}")
        if self.views < 1:
            errors.append(f"{arg('views')} {self.views}: must be >= 1")
        elif self.views > 1 and self.augment is None:
            errors.append(f"{arg('views')} {self.views} needs {arg('augment')} SPEC: the views of a sample differ by "
                          "their augmentation (e.g. shift:2,flip)")
        if self.augment_seed < 0:
            errors.append(f"{arg('augment_seed')} {self.augment_seed}: must be >= 0")
        if not self.features and (self.feature_rank is not None or self.feature_variance is not None
                                  or self.feature_pool != "none"):
            errors.append(f"{arg('feature_pool')}/{arg('feature_rank')}/{arg('feature_variance')} reduce the "
                          f"features named by {arg('features')}; give {arg('features')} NAME[,NAME...] too")
        if errors:
            raise ConfigError("; ".join(errors))
        self.feature_spec()  # raises on bad --feature-* options

    def feature_spec(self) -> FeatureSpec | None:
        """The --features settings (None without --features)."""
        if not self.features:
            return None
        return FeatureSpec(self.features, self.feature_pool, self.feature_rank, self.feature_variance,
                           self.feature_fit_rows, self.feature_dtype)


@dataclass
class LabelResult:
    """`path` is the committed version, or None for a shard job whose version another job will commit;
    `pushed` is the remote version (URL/NAME@vN) when `out` was a URL."""

    path: Path | None
    manifest: dict[str, Any]
    resumed_shards: int = 0
    seconds: float = 0.0
    pushed: str | None = None


def label(config: LabelConfig, progress: Callable[[int], None] | None = None) -> LabelResult:
    """Run the teachers once over the transfer set and commit a new version of `config.name`.

    Resumes an interrupted run with the same settings from its last completed shard. A remote `out` (s3://...) is
    labeled into a local outbox (so an interrupted run resumes there) and then pushed: data files first, the
    manifest last.

    Args:
        config: the run's settings.
        progress: called with the number of rows just finished (including rows of resumed shards).

    Returns:
        the committed version's path and manifest (and the pushed URL for a remote `out`).
    """
    if is_remote(config.out):
        result = label(replace(config, out=str(outbox_dir(config.out))), progress)
        if result.path is not None:
            result.pushed = push(result.path, config.out, name=config.name).url
        return result
    t_start = time.perf_counter()
    memory.keep_large_blocks_mapped()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    ts = open_transfer(config.transfer, input_columns=config.input_columns or None, label_column=config.label_column)
    try:
        return _label(config, ts, device, precision, t_start, progress)
    finally:
        ts.close()


def _label(config: LabelConfig, ts: TransferSet, device: torch.device, precision: str, t_start: float,
           progress: Callable[[int], None] | None) -> LabelResult:
    teachers, num_classes = _load_teachers(config, ts, device, precision)
    k = config.top_k
    ids = [f"t{i}" for i in range(len(teachers))]
    plan = _view_plan(config, ts)
    feats = _features(config, teachers[0], ts, device, precision)
    columns = _columns(config, ts, ids, num_classes, plan) + (feats.column_specs() if feats else [])
    shard_meta = versioning.shard_metadata(config.name, columns, [t.sha256 for t in teachers])
    transfer_sha = _hash_in_background(ts.path)
    run_key = _run_key(config, ts, shard_meta, device, precision, plan, feats)
    # shards and row groups hold whole samples: counted in samples here, in rows (samples x views) on disk
    views = plan.count if plan else 1
    shard_samples, rg_rows = max(1, config.shard_rows // views), max(1, config.row_group_rows // views) * views
    sharded = config.num_shards > 1
    with VersionWriter(Path(config.out), config.name, run_key=run_key, fmt=config.format, columns=columns,
                       shard_rows=shard_samples * views, row_group_rows=rg_rows,
                       shard_metadata=shard_meta, pinned={"threads": torch.get_num_threads()},
                       participant=f"shard-{config.shard_index}-of-{config.num_shards}" if sharded else "") as writer, \
            reproducible.pinned_compute(int(writer.pinned["threads"]), device):
        if feats is not None:
            feats.staged(writer, config.format)  # the first participant's projections, for every shard
        done = writer.completed()
        n_shards = math.ceil(ts.rows / shard_samples)
        # The shard plan depends only on shard_rows, never on the number of jobs: job i of N takes files
        # i, i+N, i+2N, ...; any N (including 1) can finish what any other N started.
        mine = [i for i in range(n_shards) if i % config.num_shards == config.shard_index]
        if progress:
            progress(sum(done[i]["rows"] for i in mine if i in done) // views)
        # Writing (encode + compress + fsync + sha256) runs on the writer's thread, overlapping the next shard.
        for index in mine:
            if index in done:
                continue
            start = index * shard_samples
            stop = min(start + shard_samples, ts.rows)
            cols, stats = label_shard(teachers, ids, ts, start, stop, num_classes, k, config, device,
                                       precision, progress, plan, feats)
            stats["environment"] = reproducible.environment(device)  # where this shard's floats were computed
            writer.write_async(index, start * views, cols, stats)
        writer.flush()
        infos = writer.completed()
        if len(infos) < n_shards:
            # Another job still owes shards; the job that completes the last one commits the version.
            return LabelResult(None, {"shards_total": n_shards, "shards_done": len(infos)}, len(done),
                               time.perf_counter() - t_start)
        ts.set_sha256(transfer_sha.result())
        parts = [infos[i]["stats"] for i in sorted(infos)]
        reference = "stored logits" if config.keep_logits else "teacher logits at label time (float32)"
        stats = versioning.TargetStatistics(ids, num_classes, k, config.tail).combine(parts, reference)
        manifest = _manifest(config, ts, teachers, ids, num_classes, columns, stats, device, precision, t_start)
        _record_layout(manifest, ts, plan, parts, shard_samples * views, rg_rows, int(writer.pinned["threads"]))
        if feats is not None:
            feats.record(manifest, config.format, [p["features"] for p in parts])
        path = writer.commit(manifest)
        if path is None:  # another job committed it first
            return LabelResult(None, {"shards_total": n_shards, "shards_done": n_shards}, len(done),
                               time.perf_counter() - t_start)
    return LabelResult(path, json.loads((path / "manifest.json").read_text()), len(done),
                       time.perf_counter() - t_start)


def _hash_in_background(path: Path) -> Future[str]:
    """The transfer set's sha256, computed on a thread while the teachers run (hashing a large file first would add
    its whole read time to the run); the resume key uses its identity (path, size, mtime) instead."""
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdstore-hash")
    digest = hashing.submit(sha256_file, path)
    hashing.shutdown(wait=False)
    return digest


def _features(config: LabelConfig, teacher: Teacher, ts: TransferSet, device: torch.device,
              precision: str) -> LabelFeatures | None:
    """With --features: the modules' output shapes and fitted projections (`kdstore.label_features.prepare`)."""
    spec = config.feature_spec()
    return None if spec is None else label_features.prepare(spec, teacher, ts, config.batch_size, device, precision)


def _load_teachers(config: LabelConfig, ts: TransferSet, device: torch.device,
                   precision: str) -> tuple[list[Teacher], int]:
    """The teachers on `device` and their number of classes (probed on the transfer set), with --top-k checked
    against it."""
    teachers = [load_teacher(s) for s in config.teachers]
    for t in teachers:
        t.module.to(device)
    num_classes = probe_classes(teachers, ts, device, precision)
    if config.top_k is not None and config.top_k > num_classes:
        raise ConfigError(f"{arg('top_k')} {config.top_k}: the teachers have {num_classes} classes; use "
                          f"1..{num_classes}")
    return teachers, num_classes


def _columns(config: LabelConfig, ts: TransferSet, ids: list[str], num_classes: int,
             plan: ViewPlan | None) -> list[dict[str, Any]]:
    """The version's columns: `versioning.column_specs`' (sample_id, label, each teacher's targets), with the view
    columns after sample_id when labeling views."""
    columns = versioning.column_specs(ids, num_classes, k=config.top_k, keep_logits=config.keep_logits,
                                      dtype=config.logits_dtype, labels=ts.has_labels)
    if plan is not None:
        columns[1:1] = plan.columns()  # after sample_id
    return columns


def _record_layout(manifest: dict[str, Any], ts: TransferSet, plan: ViewPlan | None, parts: list[dict[str, Any]],
                   shard_rows: int, row_group_rows: int, threads: int) -> None:
    """Complete the manifest with what the run's layout decided: rows (samples x views), the views block, shard and
    row-group sizes in rows, the pinned thread count and where the shards' floats were computed."""
    manifest["num_rows"] = ts.rows * (plan.count if plan else 1)
    if plan is not None:
        manifest["views"] = plan.describe()
    manifest["storage"].update(shard_rows=shard_rows, row_group_rows=row_group_rows)
    manifest["labeling"].update(threads=threads,
                                environments=reproducible.group_environments([p.get("environment") for p in parts]))


def _run_key(config: LabelConfig, ts: TransferSet, shard_meta: dict[str, Any], device: torch.device, precision: str,
             plan: ViewPlan | None, feats: LabelFeatures | None) -> str:
    """The resume key: every setting that changes the stored bytes, and the transfer set's identity (path, size,
    mtime; its sha256 is computed on a thread while the teachers run)."""
    st = ts.path.stat()
    return versioning.run_key({"meta": shard_meta, "transfer": [str(ts.path.resolve()), st.st_size, st.st_mtime_ns],
                               "batch_size": config.batch_size, "device": device.type, "precision": precision,
                               "tail": config.tail, "k": config.top_k, "inputs": ts.input_columns,
                               "labels": ts.label_column, "shard_rows": config.shard_rows,
                               "rg": config.row_group_rows, "views": plan.describe() if plan else None,
                               "features": feats.spec.describe() if feats else None})


def _view_plan(config: LabelConfig, ts: TransferSet) -> ViewPlan | None:
    if config.augment is None:
        return None
    spec = parse_augment(config.augment)
    return ViewPlan(config.views, spec, config.augment_seed, config.identity_view,
                    tuple(ts.input_shape))


def _manifest(config: LabelConfig, ts: TransferSet, teachers: list[Teacher], ids: list[str], num_classes: int,
              columns: list[dict[str, Any]], stats: dict[str, Any], device: torch.device, precision: str,
              t_start: float) -> dict[str, Any]:
    """The new version's manifest (the writer adds name, version, created_at and files)."""
    k = config.top_k
    return {
        **versioning.manifest_head(),
        "parent": None,
        "num_rows": ts.rows,
        "num_classes": num_classes,
        "class_names": next((d["class_names"] for d in [t.describe("t0", num_classes) for t in teachers]
                             if d["class_names"]), None),
        "storage": versioning.storage_block(config.format, config.shard_rows, config.row_group_rows),
        "teachers": [t.describe(i, num_classes) for t, i in zip(teachers, ids, strict=True)],
        "transfer_set": ts.describe(),
        "targets": versioning.targets_block(keep_logits=config.keep_logits, dtype=config.logits_dtype, k=k,
                                            indices_dtype=versioning.index_dtype(num_classes), tail=config.tail,
                                            labels=ts.has_labels),
        "columns": columns,
        "labeling": {"batch_size": config.batch_size, "device": str(device), "precision": precision,
                     "torch_version": torch.__version__, "seconds": round(time.perf_counter() - t_start, 3),
                     "world_size": config.num_shards},
        "statistics": stats,
    }


def config_dict(config: LabelConfig) -> dict[str, Any]:
    """The config as plain JSON-able data."""
    return asdict(config)
