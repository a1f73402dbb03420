"""`kdstore label` for language-model teachers: per-token targets of a text transfer set, committed as a version.

A row of the version is a sequence of `seq_len` tokens of the tokenised corpus (`kdstore.text`); it stores the token
ids, the masks and, per position, the teacher's top-k with its exact tail and/or sampled ids with counts and
log-probabilities (`kdstore.token_targets`). Resume, sharding (``--shard i/N``, torchrun), the pinned thread count,
the staged writer and the manifest-last commit are the classification labeler's (`kdstore.labeling`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kdstore import memory, reproducible, versioning
from kdstore.errors import ConfigError, arg
from kdstore.features import FeatureSpec
from kdstore.labeling import LabelResult
from kdstore.lm_features import DEFAULT_FIT_ROWS, TokenFeatures, prepare
from kdstore.lm_rows import label_token_shard
from kdstore.lm_teachers import LMTeacher, load_lm_teacher
from kdstore.options import FORMATS, LOGITS_DTYPES
from kdstore.store import VersionWriter, check_name
from kdstore.store.publish import push
from kdstore.store.remote import is_remote, outbox_dir
from kdstore.text import PACKINGS, TokenizedCorpus, tokenize_corpus
from kdstore.token_stats import TokenStatistics
from kdstore.token_targets import MAX_DRAWS, MAX_TOP_K, positions_per_chunk, targets_block, token_columns

_CPU = torch.device("cpu")
DEFAULT_SEQ_LEN = 256  # or the teacher's context, when shorter


@dataclass(frozen=True)
class LMLabelConfig:
    """Everything a language-model `kdstore label` run needs; validated on construction (every problem at once)."""

    teacher: str
    transfer: str
    out: str
    name: str
    seq_len: int | None = None  # None: 256, or the teacher's context when shorter
    top_k: int | None = 64
    sample: int | None = None  # draws per position
    sample_seed: int = 0
    sample_logprobs: bool = True
    logits_dtype: str = "float16"  # precision of top-k values and sampled log-probs
    packing: str | None = None
    text_field: str | None = None
    encoding: str = "utf-8"
    tokenizer: str | None = None
    format: str = "parquet"
    batch_size: int = 8
    shard_rows: int = 512
    row_group_rows: int = 64
    device: str = "auto"
    gguf_cache: bool = False
    shard_index: int = 0
    num_shards: int = 1
    features: tuple[str, ...] = ()  # modules of the teacher stored per token (docs/lm.md)
    feature_rank: int | None = None
    feature_variance: float | None = None
    feature_fit_rows: int = DEFAULT_FIT_ROWS  # sequences the projection is fitted on
    feature_dtype: str = "float16"

    def __post_init__(self) -> None:
        errors = []
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            errors.append(f"{arg('shard')} {self.shard_index}/{self.num_shards}: expected i/N with 0 <= i < N")
        check_name(self.name)
        if self.format not in FORMATS:
            errors.append(f"{arg('format')} {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.seq_len is not None and self.seq_len < 2:
            errors.append(f"{arg('seq_len')} {self.seq_len}: must be >= 2")
        if self.top_k is not None and self.top_k < 1:
            errors.append(f"{arg('top_k')} {self.top_k}: must be in 1..{MAX_TOP_K}, or the vocabulary size (or 0 "
                          "to store no top-k)")
        elif self.top_k is not None and self.top_k > MAX_TOP_K and self.seq_len is not None \
                and self.shard_rows * self.seq_len * self.top_k * FULL_BYTES > FULL_SHARD_BYTES:
            errors.append(_full_shard_error(self.top_k, self.seq_len, self.shard_rows))
        if self.sample is not None and not 1 <= self.sample <= MAX_DRAWS:
            errors.append(f"{arg('sample')} {self.sample}: draws per position must be in 1..{MAX_DRAWS}")
        if not self.top_k and not self.sample:
            errors.append(f"nothing to store: no top-k ({arg('top_k')} 0) and no sampled targets; give "
                          f"{arg('top_k')} K and/or {arg('sample')} N")
        if not 0 <= self.sample_seed < 2**63:
            errors.append(f"{arg('sample_seed')} {self.sample_seed}: must be in [0, 2**63)")
        if self.logits_dtype not in LOGITS_DTYPES:
            errors.append(f"{arg('logits_dtype')} {self.logits_dtype!r}: expected one of {', '.join(LOGITS_DTYPES)}")
        if self.packing is not None and self.packing not in PACKINGS:
            errors.append(f"{arg('packing')} {self.packing!r}: expected one of {', '.join(PACKINGS)}")
        for opt, v in (("batch_size", self.batch_size), ("shard_rows", self.shard_rows),
                       ("row_group_rows", self.row_group_rows)):
            if v < 1:
                errors.append(f"{arg(opt)} {v}: must be >= 1")
        if self.device not in ("auto", "cpu"):
            errors.append(f"{arg('device')} {self.device!r}: language-model teachers are labeled on the CPU for now; "
                          "use cpu (or auto)")
        if not self.features and (self.feature_rank is not None or self.feature_variance is not None):
            errors.append(f"{arg('feature_rank')}/{arg('feature_variance')} project the features named by "
                          f"{arg('features')}; give {arg('features')} NAME[,NAME...] too")
        if errors:
            raise ConfigError("; ".join(errors))
        self.feature_spec()  # raises on bad --feature-* options

    def feature_spec(self) -> FeatureSpec | None:
        """The --features settings (None without --features); per token, never pooled."""
        if not self.features:
            return None
        return FeatureSpec(tuple(self.features), "none", self.feature_rank, self.feature_variance,
                           self.feature_fit_rows, self.feature_dtype)


FULL_BYTES = 8  # per stored entry of a top-k: a float32 value (float16-exact) and an int32 id
FULL_SHARD_BYTES = 2 << 30  # a shard's top-k columns are held in memory until written


def _full_shard_error(k: int, seq_len: int, shard_rows: int) -> str:
    rows = max(1, FULL_SHARD_BYTES // (seq_len * k * FULL_BYTES))
    return (f"{arg('top_k')} {k} x {arg('seq_len')} {seq_len} x {arg('shard_rows')} {shard_rows}: a shard would hold "
            f"{shard_rows * seq_len * k * FULL_BYTES / 2**30:.1f} GiB of top-k in memory; use {arg('shard_rows')} "
            f"{rows} or fewer (and {arg('row_group_rows')} at most that)")


def label_lm(config: LMLabelConfig, progress: Callable[[int], None] | None = None,
             started: Callable[[int], None] | None = None) -> LabelResult:
    """Label the tokenised transfer set with the teacher and commit a new version of `config.name`.

    Resumes an interrupted run with the same settings from its last completed shard; a remote `out` is labeled into
    a local outbox, then pushed (as `kdstore.labeling.label`).

    Args:
        progress: called with the number of rows (sequences) just finished, including rows of resumed shards.
        started: called once with the number of rows, after the corpus is tokenised.
    """
    if is_remote(config.out):
        result = label_lm(replace(config, out=str(outbox_dir(config.out))), progress, started)
        if result.path is not None:
            result.pushed = push(result.path, config.out, name=config.name).url
        return result
    t_start = time.perf_counter()
    memory.keep_large_blocks_mapped()
    teacher = load_lm_teacher(config.teacher, tokenizer=config.tokenizer, cache=config.gguf_cache)
    if config.seq_len is None:
        config = replace(config, seq_len=min(DEFAULT_SEQ_LEN, teacher.max_context or DEFAULT_SEQ_LEN))
    assert config.seq_len is not None
    if config.top_k and config.top_k > teacher.vocab_size:
        raise ConfigError(f"{arg('top_k')} {config.top_k}: the teacher's vocabulary has {teacher.vocab_size} ids; "
                          f"use 1..{teacher.vocab_size}")
    if config.top_k and MAX_TOP_K < config.top_k != teacher.vocab_size:
        raise ConfigError(f"{arg('top_k')} {config.top_k}: must be in 1..{MAX_TOP_K}, or {teacher.vocab_size} (the "
                          "vocabulary: every token's logit, a full-vocabulary reference on a small subset)")
    if config.top_k and config.top_k > MAX_TOP_K and \
            config.shard_rows * config.seq_len * config.top_k * FULL_BYTES > FULL_SHARD_BYTES:
        raise ConfigError(_full_shard_error(config.top_k, config.seq_len, config.shard_rows))
    corpus = tokenize_corpus(config.transfer, teacher.tokenizer, seq_len=config.seq_len, field=config.text_field,
                             packing=config.packing, encoding=config.encoding, max_context=teacher.max_context,
                             vocab_size=teacher.vocab_size)
    if started:
        started(corpus.rows)
    return _label(config, teacher, corpus, t_start, progress)


def _label(config: LMLabelConfig, teacher: LMTeacher, corpus: TokenizedCorpus, t_start: float,
           progress: Callable[[int], None] | None) -> LabelResult:
    v, seq_len = teacher.vocab_size, corpus.seq_len
    spec = config.feature_spec()
    feats = None if spec is None else prepare(spec, teacher, corpus, config.batch_size)
    if feats is not None:
        feats.check_shard(min(config.shard_rows, corpus.rows))
    columns = token_columns("t0", seq_len, v, k=config.top_k, draws=config.sample,
                            logprobs=config.sample_logprobs, dtype=config.logits_dtype)
    columns += feats.column_specs() if feats else []
    shard_meta = versioning.shard_metadata(config.name, columns, [teacher.sha256])
    described = {**teacher.describe("t0"), "num_classes": v}  # once: the tokenizer's fingerprint takes ~0.3 s
    run_key = versioning.run_key(_key_material(config, described, corpus, shard_meta))
    target = corpus.target_mask()
    sharded = config.num_shards > 1
    with VersionWriter(Path(config.out), config.name, run_key=run_key, fmt=config.format, columns=columns,
                       shard_rows=config.shard_rows, row_group_rows=config.row_group_rows,
                       shard_metadata=shard_meta, pinned={"threads": torch.get_num_threads()},
                       participant=f"shard-{config.shard_index}-of-{config.num_shards}" if sharded else "") as writer, \
            reproducible.pinned_compute(int(writer.pinned["threads"]), _CPU):
        if feats is not None:
            feats.staged(writer, config.format)  # the first participant's projections, for every shard
        done = writer.completed()
        n_shards = math.ceil(corpus.rows / config.shard_rows)
        # as classification: the shard plan depends only on shard_rows; job i of N takes shards i, i+N, ...
        mine = [i for i in range(n_shards) if i % config.num_shards == config.shard_index]
        if progress:
            progress(sum(done[i]["rows"] for i in mine if i in done))
        for index in mine:
            if index in done:
                continue
            start = index * config.shard_rows
            stop = min(start + config.shard_rows, corpus.rows)
            cols, stats = _shard(teacher, corpus, target, start, stop, config, progress, feats)
            writer.write_async(index, start, cols, stats)
        writer.flush()
        infos = writer.completed()
        if len(infos) < n_shards:  # another job still owes shards; the one that completes the last commits
            return LabelResult(None, {"shards_total": n_shards, "shards_done": len(infos)}, len(done),
                               time.perf_counter() - t_start)
        parts = [infos[i]["stats"] for i in sorted(infos)]
        stats = TokenStatistics(v, seq_len, config.top_k, config.sample).combine(parts, "t0")
        manifest = _manifest(config, described, corpus, columns, stats, t_start)
        manifest["labeling"].update(threads=int(writer.pinned["threads"]),
                                    environments=reproducible.group_environments([p.get("environment") for p in parts]))
        if feats is not None:
            feats.record(manifest, config.format, [p["features"] for p in parts])
        path = writer.commit(manifest)
        if path is None:
            return LabelResult(None, {"shards_total": n_shards, "shards_done": n_shards}, len(done),
                               time.perf_counter() - t_start)
    return LabelResult(path, json.loads((path / "manifest.json").read_text()), len(done),
                       time.perf_counter() - t_start)


def _shard(teacher: LMTeacher, corpus: TokenizedCorpus, target: Any, start: int, stop: int, config: LMLabelConfig,
           progress: Callable[[int], None] | None, feats: TokenFeatures | None) -> tuple[dict[str, Any],
                                                                                       dict[str, Any]]:
    """One shard's columns and partial statistics, with its per-token features when asked for."""
    if feats is None:
        cols, stats = label_token_shard(teacher, corpus, target, start, stop, config, progress)
    else:
        with feats.shard(teacher, stop - start):
            cols, stats = label_token_shard(teacher, corpus, target, start, stop, config, progress, feats)
        more, stats["features"] = feats.shard_columns()
        cols.update(more)
    stats["environment"] = reproducible.environment(_CPU)
    return cols, stats


def _key_material(config: LMLabelConfig, teacher: dict[str, Any], corpus: TokenizedCorpus,
                  shard_meta: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the version's bytes: a rerun with the same material resumes."""
    tokens = hashlib.sha256()
    for a in (corpus.input_ids, corpus.attention_mask, corpus.loss_mask):
        tokens.update(a.tobytes())
    fp = teacher["tokenizer"]
    settings = {k: getattr(config, k) for k in ("seq_len", "top_k", "sample", "sample_seed", "sample_logprobs",
                                                 "logits_dtype", "batch_size", "shard_rows", "row_group_rows")}
    return {"meta": shard_meta, "teacher": teacher["sha256"], "tokenizer": [fp["sha256"], fp["vocab_sha256"]],
            "corpus": corpus.sha256, "tokens": tokens.hexdigest(), "settings": settings, "device": "cpu",
            "chunk": positions_per_chunk(config.batch_size, teacher["vocab_size"]),
            **({"features": spec.describe()} if (spec := config.feature_spec()) else {})}


def _manifest(config: LMLabelConfig, teacher: dict[str, Any], corpus: TokenizedCorpus,
              columns: list[dict[str, Any]], stats: dict[str, Any], t_start: float) -> dict[str, Any]:
    """The new version's manifest (the writer adds name, version, created_at and files); `teacher` is the teacher's
    `describe()` with its num_classes."""
    v = teacher["vocab_size"]
    transfer = {**corpus.describe(), "inputs": {"columns": ["input_ids"], "shape": [corpus.seq_len],
                                                "dtype": "int32"},
                "label_column": None, "kind": corpus.source}
    return {
        **versioning.manifest_head(),
        "parent": None,
        "num_rows": corpus.rows,
        "num_classes": v,
        "class_names": None,
        "storage": versioning.storage_block(config.format, config.shard_rows, config.row_group_rows),
        "teachers": [teacher],
        "transfer_set": transfer,
        "targets": targets_block(corpus.seq_len, v, k=config.top_k, draws=config.sample,
                                 logprobs=config.sample_logprobs, seed=config.sample_seed, dtype=config.logits_dtype),
        "columns": columns,
        "labeling": {"batch_size": config.batch_size, "device": "cpu", "precision": "fp32",
                     "torch_version": torch.__version__, "seconds": round(time.perf_counter() - t_start, 3),
                     "world_size": config.num_shards,
                     "positions_per_chunk": positions_per_chunk(config.batch_size, v)},
        "statistics": stats,
    }
