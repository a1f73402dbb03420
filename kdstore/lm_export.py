"""Export a per-token top-k version to the column layout that axolotl's knowledge-distillation plugin reads
(``axolotl.integrations.kd``): one Parquet row per sequence with

    input_ids         list<int32>[L]       the row's token ids
    attention_mask    list<int8>[L]        1 on real tokens
    labels            list<int64>[L]       input_ids where the token is counted (loss_mask), else -100 (unshifted,
                                           the Hugging Face convention: the plugin shifts them for its CE term)
    target_token_ids  list<list<int64>>[L][k]  the teacher's top-k ids at position p (the distribution of token p + 1)
    target_logprobs   list<list<float32>>[L][k] their log-probabilities at T over the whole vocabulary (the exact
                                           tail makes them exact at any T; at T = 1 they are ``v - logsumexp``)
    target_mask       list<list<int8>>[L][k]   the stored target_mask repeated over the k entries

Position p of the targets is compared with the student's logits at position p, as the plugin's loss does
(``kernels/liger.py``: hidden state p against target p; only the labels are shifted). Written one row group at a
time (flat memory), to a temporary name renamed at the end.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.lm_data import token_columns
from kdstore.store import Version
from kdstore.targets import check_temperature

AXOLOTL_COLUMNS = ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask")
IGNORE = -100


def topk_logprobs(values: np.ndarray, lse: np.ndarray, tail: np.ndarray, vocab_size: int,
                  temperature: float = 1.0) -> np.ndarray:
    """Log-probabilities at T of the stored top-k ids under the exact-tail rebuild (`lm_losses.topk_teacher_logprobs`
    in numpy): ``a = v / T``, ``a_tail = (L + t - log(V - k)) / T``, ``log p = a - logsumexp(a, a_tail + log(V - k))``.

    Args:
        values: (..., k) stored logits. lse, tail: (...) log-sum-exp and exact tail log-mass at T = 1.

    Returns:
        float32 (..., k).
    """
    check_temperature(temperature)
    a = values.astype(np.float64) / temperature
    k = values.shape[-1]
    parts = [a]
    if vocab_size > k:
        log_n = math.log(vocab_size - k)
        parts.append(((lse.astype(np.float64) + tail.astype(np.float64) - log_n) / temperature + log_n)[..., None])
    both = np.concatenate(parts, -1)
    m = both.max(-1, keepdims=True)
    norm = m + np.log(np.exp(both - m).sum(-1, keepdims=True))
    return (a - norm).astype(np.float32)


def _block_table(block: dict[str, np.ndarray], vocab_size: int, temperature: float) -> pa.Table:
    ids, att = block["input_ids"].astype(np.int32), block["attention_mask"].astype(np.int8)
    counted = (block["loss_mask"] != 0) & (att != 0)
    labels = np.where(counted, ids, IGNORE).astype(np.int64)
    lp = topk_logprobs(block["topk_values"], block["logsumexp"], block["tail_logmass"], vocab_size, temperature)
    k = lp.shape[-1]
    mask = np.repeat((block["target_mask"] != 0).astype(np.int8)[..., None], k, -1)

    def nested(a: np.ndarray) -> pa.Array:  # (R, L, ...) -> fixed-length lists, as plain Python lists would read
        arr = pa.array(a.reshape(-1))
        for size in reversed(a.shape[1:]):
            arr = pa.FixedSizeListArray.from_arrays(arr, size)
        return arr.cast(_list_type(arr.type))

    cols = [ids, att, labels, block["topk_indices"].astype(np.int64), lp, mask]
    return pa.table(dict(zip(AXOLOTL_COLUMNS, map(nested, cols), strict=True)))


def _list_type(t: pa.DataType) -> pa.DataType:
    """fixed_size_list<...> -> list<...>, recursively (the plugin's collator pads variable-length lists)."""
    return pa.list_(_list_type(t.value_type)) if pa.types.is_fixed_size_list(t) else t


def export_axolotl(version: Version, path: str | Path, *, temperature: float = 1.0) -> int:
    """Write `version`'s rows in axolotl's KD layout (module docstring) to the Parquet file `path`.

    Args:
        version: an open per-token version with a stored top-k (and its exact tail).
        path: the Parquet file to write (replaced if it exists).
        temperature: the T of ``target_logprobs``; keep 1 and set the plugin's ``kd_temperature`` to train at
            another T from the same file.

    Returns:
        The number of rows written.

    Raises:
        ConfigError: not a per-token version, or no top-k stored (`kdstore.lm_data.token_columns`).
    """
    check_temperature(temperature)
    roles = token_columns(version, "topk")  # per-token top-k versions always carry the exact tail
    vocab = int(version.manifest["targets"]["vocab_size"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    writer: pq.ParquetWriter | None = None
    try:
        for block in version.iter_blocks(list(roles.values())):
            table = _block_table({role: block[name] for role, name in roles.items()}, vocab, temperature)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
            n += table.num_rows
        if writer is not None:
            writer.close()
            writer = None
            os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return n


__all__ = ["AXOLOTL_COLUMNS", "export_axolotl", "topk_logprobs"]
