"""`kdstore convert` of a per-token (language-model) version: another format, a smaller top-k, another precision,
or sampled targets drawn from the stored top-k; no teacher (docs/format.md, "Per-token targets").

* A smaller ``top_k`` truncates the stored top-k per position, the dropped entries added to the tail (as
  classification). A larger one needs the teacher's logits, which a per-token version never stores: refused.
* ``sample`` N draws N tokens per position from the *rebuilt* distribution of the stored top-k (the top-k exact, the
  tail spread uniformly over the other V - k ids), not from the teacher's: a draw that lands in the tail picks a
  uniformly random tail id, and the stored log-probabilities are the rebuild's. The draws use the labeler's sampler
  and keys (seed, row, position). The new manifest says so (``targets.sampled.from``).
* Teacher features (per token) are kept, dropped or their projections cut, as for classification
  (`kdstore.feature_convert`).
* Statistics of the new targets (entropy, top-k mass, histograms, distinct draws) are recomputed; the teacher's own
  (perplexity, next-token accuracy) are carried over from the parent; the fidelity needs the teacher's logits and is
  null.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdstore import feature_convert, targets, versioning
from kdstore.errors import ConfigError, arg
from kdstore.feature_convert import FeaturePlan, plan_features
from kdstore.features import FeatureStatistics
from kdstore.sampling import SampledTokens, sample_tokens
from kdstore.soft_targets import tensor
from kdstore.store import Version, VersionWriter
from kdstore.store.ragged import Ragged, concat
from kdstore.token_stats import TokenStatistics
from kdstore.token_targets import (
    ChunkTargets,
    assemble_sampled,
    positions_per_chunk,
    ragged_columns,
    targets_block,
    token_columns,
)

if TYPE_CHECKING:
    from kdstore.convert import ConvertConfig

REBUILD = "top-k rebuild (uniform tail) of the parent"
_TEACHER_STATS = ("accuracy", "errors", "next_token_positions", "perplexity", "nll_mean_nats")


@dataclass(frozen=True)
class TokenPlan:
    fmt: str
    k: int | None
    draws: int | None  # new draws from the rebuilt top-k
    keep_sampled: bool  # the source's sampled columns, copied
    logprobs: bool
    dtype: str
    seed: int
    shard_rows: int
    row_group_rows: int


def plan(src: Version, cfg: ConvertConfig) -> TokenPlan:
    """What the new version stores; ConfigError for what a per-token version cannot become."""
    tg = src.manifest["targets"]
    src_k, sampled = src.top_k, tg["sampled"]
    k = src_k if cfg.top_k is None else (cfg.top_k or None)
    errors = []
    if cfg.keep_logits:
        errors.append(f"{arg('keep_logits')}: a per-token version stores no full logits (V values per token)")
    if k and (not src_k or k > src_k):
        errors.append(f"{arg('top_k')} {k}: {src.ref} stores " + (f"top-{src_k}" if src_k else "no top-k")
                      + " and no logits; use a smaller k or relabel with `kdstore label`")
    if cfg.sample and not src_k:
        errors.append(f"{arg('sample')} {cfg.sample}: sampling needs a distribution; {src.ref} stores only draws")
    elif cfg.sample and sampled:
        errors.append(f"{arg('sample')} {cfg.sample}: {src.ref} already stores draws from the teacher itself (convert "
                      "keeps them); drawing again from its top-k would replace them with worse ones")
    keep = bool(sampled) and not cfg.sample
    if not k and not keep and not cfg.sample:
        errors.append(f"nothing to store: no top-k ({arg('top_k')} 0) and no sampled targets; keep the top-k or "
                      f"give {arg('sample')} N")
    if errors:
        raise ConfigError("; ".join(errors))
    dtype = cfg.logits_dtype or (tg["top_k"] or {}).get("values_dtype") or sampled.get("logprobs_dtype") or "float16"
    storage = src.manifest["storage"]
    return TokenPlan(cfg.to or storage["format"], k, cfg.sample, keep,
                     bool(sampled["logprobs_dtype"]) if keep else True, str(dtype),
                     cfg.sample_seed if cfg.sample else (sampled or {}).get("seed", 0),
                     cfg.shard_rows or storage["shard_rows"], cfg.row_group_rows or storage["row_group_rows"])


def convert_tokens(src: Version, cfg: ConvertConfig, out: Path, name: str, source: str,
                   progress: Callable[[int], None] | None) -> tuple[Path, int]:
    """Write the converted version into store `out` as `name`; returns its path and the shards resumed."""
    p = plan(src, cfg)
    feats = plan_features(src, cfg.drop_features, cfg.feature_rank)
    tg = src.manifest["targets"]
    seq_len, v = int(tg["seq_len"]), int(tg["vocab_size"])
    draws = p.draws or (tg["sampled"] or {}).get("draws")
    columns = token_columns("t0", seq_len, v, k=p.k, draws=draws, logprobs=p.logprobs, dtype=p.dtype)
    columns += feats.columns(src) if feats else []
    shard_meta = versioning.shard_metadata(name, columns, [t["sha256"] for t in src.manifest["teachers"]])
    run_key = versioning.run_key({"source_files": [f["sha256"] for f in src.files], "tokens": True,
                                  "settings": {**p.__dict__, "name": name,
                                               "features": feats.widths if feats else None}})
    with VersionWriter(out, name, run_key=run_key, fmt=p.fmt, columns=columns, shard_rows=p.shard_rows,
                       row_group_rows=p.row_group_rows, shard_metadata=shard_meta) as writer:
        if feats is not None:
            feats.stage(src, writer, p.fmt)
        done = writer.completed()
        for index in range(math.ceil(src.num_rows / p.shard_rows)):
            start, stop = index * p.shard_rows, min((index + 1) * p.shard_rows, src.num_rows)
            if index not in done:
                stats, sums = TokenStatistics(v, seq_len, p.k, draws), ({}, FeatureStatistics())
                cols = _rows(src, start, stop, p, stats, feats, sums)
                writer.write(index, start, cols, {**stats.partial(), "features": {"norms": sums[0],
                                                                                  "sums": sums[1].partial()}})
            if progress:
                progress(stop - start)
        infos = writer.completed()
        parts = [infos[i]["stats"] for i in sorted(infos)]
        stats = TokenStatistics(v, seq_len, p.k, draws).combine(parts, "t0")
        manifest = _manifest(src, p, columns, stats, source, draws)
        if feats is not None:
            feature_convert.record(manifest, src, p.fmt, feats, [q["features"] for q in parts])
        path = writer.commit(manifest)
    assert path is not None
    return path, len(done)


@torch.inference_mode()
def _rows(src: Version, start: int, stop: int, p: TokenPlan, stats: TokenStatistics, feats: FeaturePlan | None,
          sums: tuple[dict[str, list[float]], FeatureStatistics]) -> dict[str, Any]:
    """The new columns of rows [start, stop), a source row group at a time (with `feats`, the kept features, their
    partial sums added to `sums`)."""
    tg = src.manifest["targets"]
    seq_len, v = int(tg["seq_len"]), int(tg["vocab_size"])
    names = list(src.columns)
    parts: list[dict[str, Any]] = []
    step = src.manifest["storage"]["row_group_rows"]
    for a in range(start, stop, step):
        block = src.read_rows(a, min(a + step, stop), names)
        n = len(block["sample_id"])
        out = {c: block[c] for c in ("sample_id", "input_ids", "attention_mask", "loss_mask", "target_mask")}
        stored = None
        if src.top_k:
            values, indices = tensor(block["t0_topk_values"]), tensor(block["t0_topk_indices"], np.int64)
            lse, tail = tensor(block["t0_logsumexp"]), tensor(block["t0_tail_logmass"])
            if p.k:
                stored = versioning.truncated_targets(values.flatten(0, 1), indices.flatten(0, 1), lse.reshape(-1),
                                                      tail.reshape(-1), k=p.k, precision=p.dtype)
                out.update(_topk_columns(stored, block["t0_logsumexp"], n, seq_len, v))
            if p.draws:
                out.update(ragged_columns("t0", *_draw(values, indices, lse, tail, v, p, block["sample_id"]),
                                          with_logprobs=True))
        if p.keep_sampled:
            out.update({c: block[c] for c in ("t0_sample_ids", "t0_sample_counts")})
            if p.logprobs:
                lp = block["t0_sample_logprobs"]
                out["t0_sample_logprobs"] = Ragged(versioning.as_stored(tensor(lp.values), p.dtype).numpy(),
                                                   lp.lengths)
        if feats is not None:
            out.update(feats.rows(block, *sums))
        _add_stats(stats, out, stored, tg, p, n, seq_len)
        parts.append(out)
    return {c: concat([q[c] for q in parts]) for c in parts[0]}


def _topk_columns(st: versioning.StoredTargets, lse: np.ndarray, n: int, seq_len: int,
                  v: int) -> dict[str, np.ndarray]:
    assert st.values is not None and st.indices is not None and st.tail is not None
    k = st.values.shape[1]
    return {"t0_topk_indices": st.indices.reshape(n, seq_len, k).numpy().astype(versioning.index_dtype(v)),
            "t0_topk_values": st.values.reshape(n, seq_len, k).numpy(), "t0_logsumexp": lse,
            "t0_tail_logmass": st.tail.reshape(n, seq_len).numpy()}


def _draw(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, tail: torch.Tensor, v: int, p: TokenPlan,
          rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """Draws from the rebuilt distribution of each position, a chunk of positions at a time (chunk x V floats)."""
    n, seq_len = values.shape[:2]
    step = positions_per_chunk(1, v)
    out = []
    for r in range(n):
        chunks = []
        for s in range(0, seq_len, step):
            z = targets.rebuild_logits(values[r, s:s + step], indices[r, s:s + step], lse[r, s:s + step], v,
                                       "uniform", tail[r, s:s + step])
            st = sample_tokens(z[None], seed=p.seed, rows=[int(rows[r])], start=s, draws=p.draws or 1)
            st.logprobs.copy_(versioning.as_stored(st.logprobs, p.dtype))
            chunks.append(st)
        out.append(assemble_sampled(chunks, 1))
    return tuple(np.concatenate([o[i] for o in out]) for i in range(4))


def _add_stats(stats: TokenStatistics, out: dict[str, Any], stored: versioning.StoredTargets | None,
               tg: dict[str, Any], p: TokenPlan, n: int, seq_len: int) -> None:
    sampled = None
    if "t0_sample_counts" in out and "t0_sample_logprobs" in out:
        c, lp = out["t0_sample_counts"], out["t0_sample_logprobs"]
        sampled = SampledTokens(p.draws or tg["sampled"]["draws"], torch.from_numpy(c.lengths.astype(np.int32)),
                                torch.from_numpy(out["t0_sample_ids"].values.astype(np.int32)),
                                torch.from_numpy(c.values.astype(np.int32)), tensor(lp.values),
                                torch.zeros(c.lengths.shape))
    if stored is None and sampled is None:  # counts without log-probs: no entropy estimate (carried from the parent)
        stats.add_rows(n, int(out["attention_mask"].sum()))
        stats.sums["positions"] += int(out["target_mask"].sum())
        return
    lse = stored.lse if stored is not None else torch.zeros(n * seq_len)
    t = ChunkTargets(stored.values if stored else None, stored.indices if stored else None, lse,
                     stored.tail if stored else None, sampled)
    stats.add(None, t, torch.arange(n * seq_len), torch.from_numpy(out["target_mask"].reshape(-1) == 1),
              torch.full((n * seq_len,), -1))
    stats.add_rows(n, int(out["attention_mask"].sum()))


def _manifest(src: Version, p: TokenPlan, columns: list[dict[str, Any]], stats: dict[str, Any], source: str,
              draws: int | None) -> dict[str, Any]:
    m = copy.deepcopy(src.manifest)
    for key in ("name", "version", "created_at", "files", "derived_files", "features", "attachments"):
        m.pop(key, None)  # features and attachments: the writer and `feature_convert.record` write the new ones
    m.update(versioning.manifest_head())
    tg = m["targets"]
    old = tg["sampled"] or {}
    m["parent"] = {"name": src.manifest["name"], "version": src.manifest["version"], "relation": "convert",
                   "settings": {"format": p.fmt, "top_k": p.k, "logits_dtype": p.dtype, "sample": p.draws,
                                "sample_seed": p.seed if p.draws else None, "shard_rows": p.shard_rows,
                                "row_group_rows": p.row_group_rows, "source": source,
                                "source_format_version": src.format_version}}
    m["storage"] = versioning.storage_block(p.fmt, p.shard_rows, p.row_group_rows)
    m["targets"] = targets_block(int(tg["seq_len"]), int(tg["vocab_size"]), k=p.k, draws=draws, logprobs=p.logprobs,
                                 seed=p.seed, dtype=p.dtype, source=REBUILD if p.draws else old.get("from",
                                                                                                     "teacher logits"))
    m["columns"] = columns
    parent = src.manifest["statistics"]["teachers"]["t0"]
    entry = stats["teachers"]["t0"]
    entry.update({key: parent.get(key) for key in _TEACHER_STATS})  # the teacher's, not the targets'
    if not p.k and not p.logprobs:  # nothing to estimate the entropy from
        entry.update(mean_entropy_nats=parent["mean_entropy_nats"], entropy_histogram=parent["entropy_histogram"],
                     entropy_source=f"{parent['entropy_source']} (parent)")
    entry["teacher_statistics_from"] = "parent"
    m["statistics"] = stats
    return m
