"""The rows of one shard of a language-model `kdstore label` run: batches of sequences through the teacher, its
logits turned into per-token targets a chunk of positions at a time (`label_token_shard`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdstore import versioning
from kdstore.lm_teachers import LMTeacher
from kdstore.text import TokenizedCorpus
from kdstore.token_stats import TokenStatistics
from kdstore.token_targets import MASKS, assemble_sampled, chunk_targets, positions_per_chunk, ragged_columns

if TYPE_CHECKING:
    from kdstore.lm_features import TokenFeatures
    from kdstore.lm_labeling import LMLabelConfig


def next_tokens(corpus: TokenizedCorpus, a: int, b: int) -> np.ndarray:
    """int64 (b - a, L): the token after each position of rows [a, b), -1 where it is not in the row (the last
    position, and padding)."""
    ids, att = corpus.input_ids[a:b], corpus.attention_mask[a:b]
    out = np.full(ids.shape, -1, np.int64)
    out[:, :-1] = np.where(att[:, 1:] == 1, ids[:, 1:], -1)
    return out


def row_columns(corpus: TokenizedCorpus, target: np.ndarray, start: int, stop: int) -> dict[str, np.ndarray]:
    """sample_id, input_ids and the masks of rows [start, stop)."""
    masks = {"attention_mask": corpus.attention_mask, "loss_mask": corpus.loss_mask, "target_mask": target}
    cols = {"sample_id": np.arange(start, stop, dtype=np.int64),
            "input_ids": np.ascontiguousarray(corpus.input_ids[start:stop], dtype=np.int32)}
    cols.update({m: masks[m][start:stop].astype(np.int8) for m in MASKS})
    return cols


@torch.inference_mode()
def label_token_shard(teacher: LMTeacher, corpus: TokenizedCorpus, target: np.ndarray, start: int, stop: int,
                      cfg: LMLabelConfig, progress: Callable[[int], None] | None,
                      feats: TokenFeatures | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the teacher over rows [start, stop) of the corpus; return the shard's columns and partial statistics.

    Batches of `cfg.batch_size` rows restart at every shard (a resumed or sharded run batches the same rows
    together). The teacher's body runs once per batch and its output head per chunk of positions
    (`positions_per_chunk`) into one buffer of batch x chunk x V logits, reused by every chunk (nothing kept refers
    to it: the targets and statistics are fresh tensors), plus one scratch buffer and the sampler's softmax of the
    same size; only the stored columns grow with the shard. With `feats` (inside its `shard` context), the hooked
    modules' outputs of each batch are stored as per-token feature columns.
    """
    v, seq_len, k, draws = teacher.vocab_size, corpus.seq_len, cfg.top_k, cfg.sample
    n = stop - start
    step = positions_per_chunk(cfg.batch_size, v)
    stats = TokenStatistics(v, seq_len, k, draws)
    cols: dict[str, Any] = row_columns(corpus, target, start, stop)
    if k:
        idx = np.empty((n, seq_len, k), versioning.index_dtype(v))
        val = np.empty((n, seq_len, k), np.float32)
        lse, tail = np.empty((n, seq_len), np.float32), np.empty((n, seq_len), np.float32)
    scratch = torch.empty(min(cfg.batch_size, n) * min(step, seq_len), v) if k else None
    logits = torch.empty(min(cfg.batch_size, n) * min(step, seq_len) * v)  # every chunk's, in turn
    sampled: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    where = f"{teacher.source} on {corpus.path}"
    for a in range(start, stop, cfg.batch_size):
        b = min(stop, a + cfg.batch_size)
        ids = torch.from_numpy(np.array(corpus.input_ids[a:b], dtype=np.int64))  # a fresh, aligned copy
        rows = torch.arange(a, b)
        nxt, tm = torch.from_numpy(next_tokens(corpus, a, b)), torch.from_numpy(target[a:b] == 1)
        chunks = []
        for s, z in teacher.iter_logits(ids, positions_per_chunk=step, out=logits):
            c = z.shape[1]
            t = chunk_targets(z, k=k, precision=cfg.logits_dtype, draws=draws, seed=cfg.sample_seed, rows=rows,
                              start=s, scratch=scratch, where=where)
            flat_index = (rows[:, None] * seq_len + torch.arange(s, s + c)[None]).reshape(-1)
            stats.add(z, t, flat_index, tm[:, s:s + c].reshape(-1), nxt[:, s:s + c].reshape(-1))
            if k:
                assert t.values is not None and t.indices is not None and t.tail is not None
                r0, r1 = a - start, b - start
                idx[r0:r1, s:s + c] = t.indices.reshape(b - a, c, k).numpy()
                val[r0:r1, s:s + c] = t.values.reshape(b - a, c, k).numpy()
                lse[r0:r1, s:s + c] = t.lse.reshape(b - a, c).numpy()
                tail[r0:r1, s:s + c] = t.tail.reshape(b - a, c).numpy()
            if t.sampled is not None:
                chunks.append(t.sampled)
            del z, t
        if draws:
            sampled.append(assemble_sampled(chunks, b - a))
        if feats is not None:  # captured by the body's forward pass over this batch
            feats.add_batch(a - start, b - start, corpus.attention_mask[a:b])
        stats.add_rows(b - a, int(corpus.attention_mask[a:b].sum()))
        if progress:
            progress(b - a)
    if k:
        cols.update({"t0_topk_indices": idx, "t0_topk_values": val, "t0_logsumexp": lse, "t0_tail_logmass": tail})
    if draws:
        parts = [np.concatenate([p[i] for p in sampled]) for i in range(4)]
        cols.update(ragged_columns("t0", *parts, with_logprobs=cfg.sample_logprobs))
    return cols, stats.partial()
