"""The choices kdstore's options take, in one torch-free module: the library validates against them and the
command line offers them, so the two cannot drift apart (and `kdstore ls` starts without importing torch)."""

from __future__ import annotations

FORMATS = ("parquet", "hdf5")  # storage formats of a version's data files
LOGITS_DTYPES = ("float16", "bfloat16", "float32")  # storage dtypes of logits and top-k values
TAIL_MODELS = ("uniform", "drop")  # how soft targets are rebuilt from a top-k (docs/format.md)
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # autocast
LOSSES = ("kd", "topk", "mse", "hard", "ls")
LM_LOSSES = ("topk", "sampled", "hard", "rkl", "jsd")  # per-token (language-model) targets
ENSEMBLES = ("mean-prob", "mean-logit")  # or one member's id, t0, t1, ...
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
DATA_MODES = ("auto", "memory", "stream")
# how `kdstore train --agreement` measures a student's top-1 agreement with the teacher: counted on the batches of
# the last epoch as they are trained (free), or one more forward pass over the transfer set with the final weights
AGREEMENT = ("last-epoch", "final")
