"""`kdstore label --features` for language-model teachers: hidden states (any named module's output) per token.

A module of the teacher named as in ``named_modules()`` (``model.layers.14``: a decoder layer, whose output
tuple's first element is its hidden states (B, L, D); ``model.norm``: the last hidden state) is captured with a
forward hook (`features.capture`) while the teacher labels a batch, and stored per token as a column of shape
(rows, L, D), or (rows, L, r) when projected onto its top-r principal directions (PCA over the real tokens of the
first ``fit_rows`` sequences, accumulated a batch at a time, so memory is bounded by a batch). The projection's mean
and directions are one attachment per feature, staged once (a resumed or sharded run reuses the staged one), as
for classification (`kdstore.label_features`, docs/lm.md "Hidden states per token").

Attention maps (TinyBERT's attention loss): ``attn:model.layers.N`` stores decoder layer N's attention
probabilities per sequence, (H, L, L) (query position, key position; each real query's row sums to 1 over its causal
prefix, the entries above the diagonal are 0), ``attn_mean:model.layers.N`` their mean over the H heads, (L, L).
They are captured from the layer's ``self_attn`` module (its output tuple's second element) with the teacher
switched to eager attention for the run (`capture_all`); they are never projected.

Statistics (``statistics.features``: variance kept, stored variance) count the real tokens (attention mask) only
(for attention maps: the real query rows, per head).
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
from kdstore.errors import ConfigError, TeacherError, arg
from kdstore.features import FeatureSpec, FeatureStatistics, Projection
from kdstore.label_features import LabelFeatures, _stored
from kdstore.lm_teachers import LMTeacher
from kdstore.text import TokenizedCorpus

DEFAULT_FIT_ROWS = 64  # sequences: 64 x 256 tokens is plenty for a covariance of a few hundred dimensions
SHARD_FEATURE_BYTES = 2 << 30  # a shard's feature columns are held in memory until written (as a top-k's)
ATTENTION_PREFIXES = {"attn": "all", "attn_mean": "mean"}  # feature name prefix -> the heads stored


def attention_heads(name: str) -> tuple[str | None, str]:
    """``("all" | "mean", LAYER)`` for an attention feature name ``attn:LAYER`` / ``attn_mean:LAYER``, else
    ``(None, name)`` (a hidden-state feature)."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in ATTENTION_PREFIXES:
        return ATTENTION_PREFIXES[prefix], rest
    return None, name


def hidden_modules(names: tuple[str, ...] | list[str]) -> list[str]:
    """The hidden-state features among feature names (the others are attention maps)."""
    return [n for n in names if attention_heads(n)[0] is None]


@contextmanager
def capture_all(teacher: LMTeacher, names: tuple[str, ...] | list[str]) -> Iterator[dict[str, Any]]:
    """Hooks for features `names`: hidden states as `features.capture`; for ``attn:LAYER`` the probabilities the
    attention module of LAYER (``LAYER.self_attn``, else LAYER itself) returns as its output's second element, with
    the teacher switched to eager attention (transformers' sdpa returns none) until the context ends."""
    attn = [n for n in names if attention_heads(n)[0] is not None]
    module = teacher.module
    switch = bool(attn) and hasattr(module, "set_attn_implementation")
    before = getattr(getattr(module, "config", None), "_attn_implementation", None)
    handles = []
    with features.capture(module, hidden_modules(names), teacher.source) as got:
        try:
            if switch:
                module.set_attn_implementation("eager")
            for name in attn:
                sub = _attention_module(module, name, teacher.source)

                def hook(_m: Any, _inp: Any, out: Any, name: str = name) -> None:
                    got[name] = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None

                handles.append(sub.register_forward_hook(hook))
            yield got
        finally:
            for h in handles:
                h.remove()
            if switch and before is not None:
                module.set_attn_implementation(before)


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
        return p.rank if p is not None else int(self.output_shapes[module][-1])

    def stored_shape(self, module: str) -> list[int]:
        """[L, D] or [L, r] for hidden states; [H, L, L] or [L, L] (heads averaged) for attention maps."""
        heads = attention_heads(module)[0]
        if heads is not None:
            shape = [int(x) for x in self.output_shapes[module]]
            return shape[1:] if heads == "mean" else shape
        return [int(self.output_shapes[module][0]), self.width(module)]

    def column_specs(self) -> list[dict[str, Any]]:
        """The version's feature columns: (L, D), (L, r), (H, L, L) or (L, L) per row, after the targets."""
        return [{"name": features.column_name(m), "role": "feature", "teacher": "t0", "dtype": self.spec.dtype,
                 "shape": self.stored_shape(m)} for m in self.spec.modules]

    @contextmanager
    def shard(self, teacher: LMTeacher, rows: int) -> Iterator[None]:
        """Hooks on the teacher's modules and empty columns for a shard of `rows` sequences."""
        self.stats = FeatureStatistics()
        dtype = np.float16 if self.spec.dtype == "float16" else np.float32
        self._buf = {m: np.empty((rows, *self.stored_shape(m)), dtype) for m in self.spec.modules}
        with capture_all(teacher, self.spec.modules) as got:
            self._got = got
            try:
                yield
            finally:
                self._got = {}

    def add_batch(self, r0: int, r1: int, attention_mask: np.ndarray) -> None:
        """The outputs captured by the teacher's last forward pass: rows [r0, r1) of the shard."""
        real = torch.from_numpy(np.asarray(attention_mask) == 1)
        for m in self.spec.modules:
            if attention_heads(m)[0] is not None:
                self._add_attention(m, r0, r1, real)
                continue
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

    def check_shard(self, shard_rows: int) -> None:
        """ConfigError when a shard's feature columns (held in memory until written) would pass
        `SHARD_FEATURE_BYTES`; the error names the --shard-rows that fits."""
        size = 2 if self.spec.dtype == "float16" else 4
        per_row = sum(int(np.prod(self.stored_shape(m))) * size for m in self.spec.modules)
        if shard_rows * per_row > SHARD_FEATURE_BYTES:
            fits = max(1, SHARD_FEATURE_BYTES // per_row)
            raise ConfigError(f"{arg('features')} {','.join(self.spec.modules)}: a shard of {shard_rows} rows would "
                              f"hold {shard_rows * per_row / 2**30:.1f} GiB of features in memory; use "
                              f"{arg('shard_rows')} {fits} or fewer (and {arg('row_group_rows')} at most that), or "
                              "attn_mean: maps")

    def _add_attention(self, m: str, r0: int, r1: int, real: Tensor) -> None:
        a = attention_output(self._got.get(m), m, r1 - r0, int(self.output_shapes[m][-1]))  # (B, H, L, L)
        if attention_heads(m)[0] == "mean":
            a = a.mean(1)
            rows = a[real]  # (real queries, L)
        else:
            rows = a.transpose(1, 2)[real].reshape(-1, a.shape[-1])  # (real queries x H, L)
        self.stats.add(features.column_name(m), rows, None)
        self._buf[m][r0:r1] = _stored(a, self._buf[m].dtype.type, m, self.source)

    def shard_columns(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The finished shard's feature columns and its partial statistics."""
        cols = {features.column_name(m): self._buf[m] for m in self.spec.modules}
        self._buf = {}
        return cols, self.stats.partial()

    def describe(self, fmt: str) -> dict[str, Any]:
        """The manifest's ``features`` block (``per_token``: stored per position, [L, width] per row)."""
        out = super().describe(fmt)
        out["per_token"] = True
        size = 2 if self.spec.dtype == "float16" else 4
        for layer in out["layers"]:
            if layer["projection"] is not None:
                layer["projection"]["fit_tokens"] = self.fit_tokens
            heads = attention_heads(layer["module"])[0]
            if heads is not None:
                layer.update(kind="attention", pool="none", heads=int(self.output_shapes[layer["module"]][0]),
                             heads_stored=heads, layout="query x key, causal: entries above the diagonal are 0",
                             bytes_per_row=int(np.prod(layer["stored_shape"])) * size)
        return out


def token_output(out: Any, name: str, rows: int, seq_len: int) -> Tensor:
    """A captured output as (rows, L, D) float32; an output that is not per token is a TeacherError."""
    if not isinstance(out, Tensor) or out.ndim < 3 or tuple(out.shape[:2]) != (rows, seq_len):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TeacherError(f"{arg('features')} {name}: its output {shape} is not per token (batch {rows}, positions "
                           f"{seq_len}, width); name a module whose output is the hidden states, e.g. "
                           "model.layers.N or model.norm")
    return out.float().reshape(rows, seq_len, -1)


def _attention_module(module: Any, name: str, source: str) -> Any:
    """The module whose output holds the probabilities of feature ``attn:LAYER``: ``LAYER.self_attn``, else LAYER."""
    layer = attention_heads(name)[1]
    names = dict(module.named_modules())
    if f"{layer}.self_attn" in names:
        return names[f"{layer}.self_attn"]
    if layer and layer in names:
        return names[layer]
    shown = [n for n in names if n and n.count(".") <= 2 and not n.endswith("_proj")][:10]
    raise TeacherError(f"{arg('features')} {name}: {source} has no module {layer!r}; attention maps name a decoder "
                       f"layer, e.g. attn:model.layers.0 (it has {', '.join(shown)}, ...)")


def attention_output(out: Any, name: str, rows: int, seq_len: int) -> Tensor:
    """Captured attention probabilities as (rows, H, L, L) float32; anything else is a TeacherError."""
    if not isinstance(out, Tensor) or out.ndim != 4 or (out.shape[0], *out.shape[2:]) != (rows, seq_len, seq_len):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TeacherError(f"{arg('features')} {name}: its attention module returned {shape}, not probabilities "
                           f"(batch {rows}, heads, {seq_len}, {seq_len}); attention maps need a transformers "
                           "teacher whose layer's self_attn returns its weights with eager attention")
    return out.float()


def _forward(teacher: LMTeacher, ids: np.ndarray) -> None:
    """The teacher's body over a batch (the head on one position only: the hooks need the body's outputs)."""
    t = torch.from_numpy(np.array(ids, dtype=np.int64))
    next(iter(teacher.iter_logits(t, positions_per_chunk=1)))


@torch.inference_mode()
def prepare(spec: FeatureSpec, teacher: LMTeacher, corpus: TokenizedCorpus, batch_size: int) -> TokenFeatures:
    """Each module's output width (probed on two sequences) and its projection, fitted on the real tokens of the
    first ``spec.fit_rows`` sequences, before anything is written."""
    seq_len, probe = corpus.seq_len, min(2, corpus.rows)  # two rows: an output without a batch axis is refused now
    hidden = hidden_modules(spec.modules)
    if spec.projected and not hidden:
        raise ConfigError(f"{arg('feature_rank')}/{arg('feature_variance')} project hidden states; attention maps "
                          f"({', '.join(spec.modules)}) are stored whole")
    with capture_all(teacher, spec.modules) as got:
        _forward(teacher, corpus.input_ids[0:probe])
        shapes = {m: [seq_len, int(token_output(got.get(m), m, probe, seq_len).shape[-1])] for m in hidden}
        shapes.update({m: [int(attention_output(got.get(m), m, probe, seq_len).shape[1]), seq_len, seq_len]
                       for m in spec.modules if m not in hidden})
    projections: dict[str, Projection | None] = dict.fromkeys(spec.modules)
    fitted, tokens = 0, 0
    if spec.projected:
        for m in hidden:
            features.check_pca_dim(shapes[m][1], m)
        fitted = min(spec.fit_rows, corpus.rows)
        fit, tokens = _fit(hidden, spec, teacher, corpus, fitted, batch_size)
        projections.update(fit)
    return TokenFeatures(spec, teacher.source, shapes, projections, fitted, fit_tokens=tokens)


def _fit(hidden: list[str], spec: FeatureSpec, teacher: LMTeacher, corpus: TokenizedCorpus, rows: int,
         batch_size: int) -> tuple[dict[str, Projection | None], int]:
    """PCA of each module's outputs over the real tokens of sequences [0, rows): the mean and covariance are
    accumulated a batch at a time in float64 (about the first batch's mean, for accuracy)."""
    seq_len = corpus.seq_len
    moments: dict[str, list[Any]] = {}  # module -> [shift, n, sum, outer sum]
    with features.capture(teacher.module, hidden, teacher.source) as got:
        for a in range(0, rows, batch_size):
            b = min(rows, a + batch_size)
            _forward(teacher, corpus.input_ids[a:b])
            real = torch.from_numpy(np.asarray(corpus.attention_mask[a:b]) == 1)
            for m in hidden:
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
