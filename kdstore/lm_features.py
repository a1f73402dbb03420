"""`kdstore label --features` for language-model teachers: hidden states (any named module's output) per token.

A module of the teacher named as in ``named_modules()`` (``model.layers.14``: a decoder layer, whose output
tuple's first element is its hidden states (B, L, D); ``model.norm``: the last hidden state) is captured with a
forward hook (`features.capture`) while the teacher labels a batch, and stored per token as a column of shape
(rows, L, D), or (rows, L, r) when projected onto its top-r principal directions (PCA over the real tokens of the
first ``fit_rows`` sequences, accumulated a batch at a time, so memory is bounded by a batch). The projection's mean
and directions are one attachment per feature, staged once (a resumed or sharded run reuses the staged one), as
for classification (`kdstore.label_features`, docs/lm.md "Hidden states per token").

Statistics (``statistics.features``: variance kept, stored variance) count the real tokens (attention mask) only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdstore import features
from kdstore.errors import TeacherError, arg
from kdstore.features import FeatureSpec, FeatureStatistics, Projection
from kdstore.label_features import LabelFeatures, _stored
from kdstore.lm_teachers import LMTeacher
from kdstore.text import TokenizedCorpus

DEFAULT_FIT_ROWS = 64  # sequences: 64 x 256 tokens is plenty for a covariance of a few hundred dimensions


@dataclass
class TokenFeatures(LabelFeatures):
    """The per-token features of a language-model labeling run. `output_shapes` holds [L, D] per module.

    While a shard is labeled (`shard`), each batch's captured outputs go into the shard's columns (`add_batch`).
    """

    fit_tokens: int = 0
    _got: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _buf: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def width(self, module: str) -> int:
        p = self.projections[module]
        return p.rank if p is not None else int(self.output_shapes[module][1])

    def column_specs(self) -> list[dict[str, Any]]:
        """The version's feature columns: (L, D) or (L, r) per row, after the targets."""
        return [{"name": features.column_name(m), "role": "feature", "teacher": "t0", "dtype": self.spec.dtype,
                 "shape": [int(self.output_shapes[m][0]), self.width(m)]} for m in self.spec.modules]

    @contextmanager
    def shard(self, teacher: LMTeacher, rows: int) -> Iterator[None]:
        """Hooks on the teacher's modules and empty columns for a shard of `rows` sequences."""
        self.stats = FeatureStatistics()
        dtype = np.float16 if self.spec.dtype == "float16" else np.float32
        self._buf = {m: np.empty((rows, int(self.output_shapes[m][0]), self.width(m)), dtype)
                     for m in self.spec.modules}
        with features.capture(teacher.module, self.spec.modules, teacher.source) as got:
            self._got = got
            try:
                yield
            finally:
                self._got = {}

    def add_batch(self, r0: int, r1: int, attention_mask: np.ndarray) -> None:
        """The outputs captured by the teacher's last forward pass: rows [r0, r1) of the shard."""
        real = torch.from_numpy(np.asarray(attention_mask) == 1)
        for m in self.spec.modules:
            h = token_output(self._got.get(m), m, r1 - r0, int(self.output_shapes[m][0]))
            p = self.projections[m]
            if p is not None:
                flat, energy = p.project(h.reshape(-1, h.shape[-1]))
                coords = flat.reshape(*h.shape[:2], -1)
                self.stats.add(features.column_name(m), coords[real], energy.reshape(h.shape[:2])[real])
            else:
                coords = h
                self.stats.add(features.column_name(m), coords[real], None)
            self._buf[m][r0:r1] = _stored(coords, self._buf[m].dtype.type, m, self.source)

    def shard_columns(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The finished shard's feature columns and its partial statistics."""
        cols = {features.column_name(m): self._buf[m] for m in self.spec.modules}
        self._buf = {}
        return cols, self.stats.partial()

    def describe(self, fmt: str) -> dict[str, Any]:
        """The manifest's ``features`` block (``per_token``: stored per position, [L, width] per row)."""
        out = super().describe(fmt)
        out["per_token"] = True
        for layer in out["layers"]:
            if layer["projection"] is not None:
                layer["projection"]["fit_tokens"] = self.fit_tokens
        return out


def token_output(out: Any, name: str, rows: int, seq_len: int) -> Tensor:
    """A captured output as (rows, L, D) float32; an output that is not per token is a TeacherError."""
    if not isinstance(out, Tensor) or out.ndim < 3 or tuple(out.shape[:2]) != (rows, seq_len):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TeacherError(f"{arg('features')} {name}: its output {shape} is not per token (batch {rows}, positions "
                           f"{seq_len}, width); name a module whose output is the hidden states, e.g. "
                           "model.layers.N or model.norm")
    return out.float().reshape(rows, seq_len, -1)


def _forward(teacher: LMTeacher, ids: np.ndarray) -> None:
    """The teacher's body over a batch (the head on one position only: the hooks need the body's outputs)."""
    t = torch.from_numpy(np.array(ids, dtype=np.int64))
    next(iter(teacher.iter_logits(t, positions_per_chunk=1)))


@torch.inference_mode()
def prepare(spec: FeatureSpec, teacher: LMTeacher, corpus: TokenizedCorpus, batch_size: int) -> TokenFeatures:
    """Each module's output width (probed on two sequences) and its projection, fitted on the real tokens of the
    first ``spec.fit_rows`` sequences, before anything is written."""
    seq_len, probe = corpus.seq_len, min(2, corpus.rows)  # two rows: an output without a batch axis is refused now
    with features.capture(teacher.module, spec.modules, teacher.source) as got:
        _forward(teacher, corpus.input_ids[0:probe])
        shapes = {m: [seq_len, int(token_output(got.get(m), m, probe, seq_len).shape[-1])] for m in spec.modules}
    projections: dict[str, Projection | None] = dict.fromkeys(spec.modules)
    fitted, tokens = 0, 0
    if spec.projected:
        for m in spec.modules:
            features.check_pca_dim(shapes[m][1], m)
        fitted = min(spec.fit_rows, corpus.rows)
        projections, tokens = _fit(spec, teacher, corpus, fitted, batch_size)
    return TokenFeatures(spec, teacher.source, shapes, projections, fitted, fit_tokens=tokens)


def _fit(spec: FeatureSpec, teacher: LMTeacher, corpus: TokenizedCorpus, rows: int,
         batch_size: int) -> tuple[dict[str, Projection | None], int]:
    """PCA of each module's outputs over the real tokens of sequences [0, rows): the mean and covariance are
    accumulated a batch at a time in float64 (about the first batch's mean, for accuracy)."""
    seq_len = corpus.seq_len
    moments: dict[str, list[Any]] = {}  # module -> [shift, n, sum, outer sum]
    with features.capture(teacher.module, spec.modules, teacher.source) as got:
        for a in range(0, rows, batch_size):
            b = min(rows, a + batch_size)
            _forward(teacher, corpus.input_ids[a:b])
            real = torch.from_numpy(np.asarray(corpus.attention_mask[a:b]) == 1)
            for m in spec.modules:
                x = token_output(got.get(m), m, b - a, seq_len)[real].double()
                if m not in moments:
                    shift = x.mean(0) if len(x) else torch.zeros(x.shape[1], dtype=torch.float64)
                    moments[m] = [shift, 0, torch.zeros_like(shift), torch.zeros(len(shift), len(shift),
                                                                                    dtype=torch.float64)]
                s = moments[m]
                c = x - s[0]
                s[1] += len(x)
                s[2] += c.sum(0)
                s[3] += c.T @ c
    out: dict[str, Projection | None] = {}
    for m, (shift, n, total, outer) in moments.items():
        mean_c = total / max(n, 1)
        cov = (outer - n * torch.outer(mean_c, mean_c)) / max(n - 1, 1)
        out[m] = features.projection_from_covariance(shift + mean_c, cov, n, spec.rank, spec.variance, m)
    return out, int(next(iter(moments.values()))[1]) if moments else 0
