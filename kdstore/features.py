"""Intermediate outputs of a teacher ("features", FitNets hints) as a version stores them (#15).

`kdstore label --features NAME[,NAME...]` captures the outputs of the teacher's modules named as in
``named_modules()`` with forward hooks, while the teacher labels the row. Each is reduced at label time so it fits:

    pooling    ``avg`` / ``max`` over the trailing (spatial) axes of an output of rank >= 2 per row: (C, H, W) -> (C)
    projection onto its top-r principal directions (PCA), fitted once on the first ``fit_rows`` samples of the
               transfer set before labeling; r fixed (``rank``) or the smallest r that keeps a share of the fit
               sample's variance (``variance``). The mean and the r directions are stored once per feature in an
               attachment of the version (``features/COLUMN.parquet``); a row stores its r coordinates
               ``c = P (f - mean)``, so ``f ~ mean + P^T c``.

The share of each feature's variance the stored coordinates keep over *all* rows is measured while labeling
(``statistics.features``), like the top-k fidelity. Stored coordinates are Euclidean: the mean squared error of a
student's regressed feature against them equals, up to the dropped directions, the error in the teacher's space.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdstore.errors import ConfigError, TeacherError, arg

POOLS = ("none", "avg", "max")
FEATURE_DTYPES = ("float16", "float32")
MAX_PCA_DIM = 8192  # a covariance of D x D float64 and its eigendecomposition: 512 MB and minutes beyond this


@dataclass(frozen=True)
class FeatureSpec:
    """What `kdstore label` captures and how it reduces it; validated on construction."""

    modules: tuple[str, ...]
    pool: str = "none"
    rank: int | None = None
    variance: float | None = None
    fit_rows: int = 8192
    dtype: str = "float16"

    def __post_init__(self) -> None:
        e = []
        if not self.modules or any(not m for m in self.modules):
            e.append(f"{arg('features')} {','.join(self.modules)!r}: expected module names as in the teacher's "
                     "named_modules(), e.g. net.2,net.4")
        if len(set(self.modules)) != len(self.modules):
            e.append(f"{arg('features')} {','.join(self.modules)}: a module is repeated; give each once")
        cols = [column_name(m) for m in self.modules]
        if len(set(cols)) != len(cols):
            e.append(f"{arg('features')} {','.join(self.modules)}: two names map to one column ({cols}); "
                     "features differing only in '.' vs '_' cannot be stored together")
        if self.pool not in POOLS:
            e.append(f"{arg('feature_pool')} {self.pool!r}: expected one of {', '.join(POOLS)}")
        if self.rank is not None and self.variance is not None:
            e.append(f"{arg('feature_rank')} and {arg('feature_variance')} both choose the projection; give one")
        if self.rank is not None and self.rank < 1:
            e.append(f"{arg('feature_rank')} {self.rank}: must be >= 1")
        if self.variance is not None and not 0 < self.variance < 1:
            e.append(f"{arg('feature_variance')} {self.variance}: must be in (0, 1), e.g. 0.95 keeps 95% of the "
                     "variance")
        if self.fit_rows < 2:
            e.append(f"{arg('feature_fit_rows')} {self.fit_rows}: must be >= 2")
        if self.dtype not in FEATURE_DTYPES:
            e.append(f"{arg('feature_dtype')} {self.dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")
        if e:
            raise ConfigError("; ".join(e))

    @property
    def projected(self) -> bool:
        return self.rank is not None or self.variance is not None

    def describe(self) -> dict[str, Any]:
        return {"modules": list(self.modules), "pool": self.pool, "rank": self.rank, "variance": self.variance,
                "fit_rows": self.fit_rows, "dtype": self.dtype}


def column_name(module: str) -> str:
    """The stored column of a feature of teacher t0: ``t0_feature_`` + the module name with other characters than
    letters, digits and '_' as '_' (``net.2`` -> ``t0_feature_net_2``)."""
    return "t0_feature_" + re.sub(r"[^A-Za-z0-9_]", "_", module)


def attachment_path(column: str, extension: str) -> str:
    """Where a projected feature's mean and directions are stored in the version."""
    return f"features/{column}{extension}"


# --- capture -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture(module: nn.Module, names: Sequence[str], source: str,
            option: str = "features") -> Iterator[dict[str, Tensor]]:
    """Forward hooks on the submodules `names` of `module`: the yielded dict holds each one's last output.

    Raises:
        TeacherError: a name the module does not have (the names it has are listed), or a module that cannot be
            hooked (TorchScript).
    """
    got: dict[str, Tensor] = {}
    handles = []
    try:
        for name in names:
            sub = _submodule(module, name, source, option)

            def hook(_m: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
                got[name] = out[0] if isinstance(out, (tuple, list)) else out

            try:
                handles.append(sub.register_forward_hook(hook))
            except (RuntimeError, AttributeError) as e:
                raise TeacherError(f"{arg(option)} {name}: cannot hook a module of {source} ({e}); features need a "
                                   "teacher given as MODEL@WEIGHTS (a TorchScript teacher's modules cannot be "
                                   "hooked after scripting)") from None
        yield got
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def probe_outputs(module: nn.Module, names: Sequence[str], run: Callable[[], Any], source: str,
                  option: str = "features") -> dict[str, Tensor]:
    """The outputs of `module`'s submodules `names` during one call of `run` (a forward pass), in eval mode (the
    module's mode is restored after): how a student's hinted modules are sized before their regressors exist."""
    was_training = module.training
    try:
        module.eval()
        with capture(module, names, source, option) as got:
            run()
            return dict(got)
    finally:
        module.train(was_training)


def _submodule(module: nn.Module, name: str, source: str, option: str) -> nn.Module:
    names = dict(module.named_modules())
    if name in names and name:
        return names[name]
    shown = [n for n in names if n][:12]
    raise TeacherError(f"{arg(option)} {name}: {source} has no module of that name; it has "
                       f"{', '.join(shown)}{', ...' if len(names) > 13 else ''} (names as in named_modules())")


def reduce_output(out: Tensor, pool: str, name: str, rows: int) -> Tensor:
    """A captured output as (rows, D) float32: pooled over its trailing axes when `pool` says so, then flattened."""
    if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != rows:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TeacherError(f"{arg('features')} {name}: its output {shape} is not a tensor with one entry per row "
                           f"of a batch of {rows}")
    out = out.float()
    if pool != "none" and out.ndim >= 3:  # (N, C, *spatial)
        flat = out.reshape(rows, out.shape[1], -1)
        out = flat.mean(2) if pool == "avg" else flat.amax(2)
    return out.reshape(rows, -1)


# --- principal directions -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """A feature's mean (D,) and its r principal directions (r, D), orthonormal rows, largest variance first, with
    the variance each direction explains on the fit sample and the sample's total variance."""

    mean: Tensor
    components: Tensor
    explained: Tensor
    total_variance: float

    @property
    def rank(self) -> int:
        return int(self.components.shape[0])

    def project(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """(N, D) -> the (N, r) coordinates and the (N,) float64 squared norms of f about the mean (what the
        coordinates keep of them is their own squared norm: the directions are orthonormal)."""
        centred = f - self.mean.to(f.device)
        return centred @ self.components.to(f.device).T, torch.linalg.vector_norm(centred, dim=1).double() ** 2

    def columns(self) -> dict[str, np.ndarray]:
        """The attachment's rows: index -1 is the mean, 0..r-1 the directions (docs/format.md, "Features")."""
        vec = torch.cat([self.mean[None], self.components]).numpy().astype(np.float32)
        var = np.concatenate([[self.total_variance], self.explained.numpy()]).astype(np.float64)
        return {"index": np.arange(-1, self.rank, dtype=np.int32), "explained_variance": var, "vector": vec}

    @staticmethod
    def specs(dim: int) -> list[dict[str, Any]]:
        return [{"name": "index", "role": "projection_index", "dtype": "int32", "shape": []},
                {"name": "explained_variance", "role": "projection_variance", "dtype": "float64", "shape": []},
                {"name": "vector", "role": "projection_vector", "dtype": "float32", "shape": [dim]}]

    @classmethod
    def from_columns(cls, cols: dict[str, np.ndarray]) -> Projection:
        order = np.argsort(cols["index"])
        vec = torch.from_numpy(np.ascontiguousarray(cols["vector"][order], dtype=np.float32))
        var = torch.from_numpy(np.asarray(cols["explained_variance"][order], dtype=np.float64))
        return cls(vec[0], vec[1:], var[1:], float(var[0]))


def fit_projection(f: Tensor, rank: int | None, variance: float | None, name: str) -> Projection:
    """PCA of a fit sample (N, D): the mean and the top-r eigenvectors of the covariance (float64), r = `rank` or
    the smallest r whose directions explain at least `variance` of the total. Each direction's sign makes its
    largest-magnitude entry positive, so the result does not depend on the eigensolver's sign choice."""
    n, d = f.shape
    check_pca_dim(d, name)
    mean = f.mean(0, dtype=torch.float64)
    centred = f - mean.float()
    cov = (centred.T @ centred).double() / max(n - 1, 1)  # a float32 product: 4x faster than float64, ~1e-6 relative
    return projection_from_covariance(mean, cov, n, rank, variance, name)


def check_pca_dim(d: int, name: str) -> None:
    """Refuse a projection of more than `MAX_PCA_DIM` values per row (its covariance would not fit)."""
    if d > MAX_PCA_DIM:
        raise ConfigError(f"{arg('features')} {name}: {d} values per row; a projection is fitted up to "
                          f"{MAX_PCA_DIM}; pool it first ({arg('feature_pool')} avg) or capture a smaller module")


def projection_from_covariance(mean: Tensor, cov: Tensor, n: int, rank: int | None, variance: float | None,
                               name: str) -> Projection:
    """`fit_projection` from a fit sample's mean (D,) and covariance (D, D) (float64) over `n` samples, e.g.
    accumulated a batch at a time when the sample does not fit in memory (per-token features)."""
    d = int(mean.shape[0])
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    total = float(evals.sum())
    if rank is not None:
        if rank > min(d, n):
            raise ConfigError(f"{arg('feature_rank')} {rank}: {name} has {d} values per row and the fit sample "
                              f"{n} rows; use at most {min(d, n)}")
        r = rank
    else:
        share = torch.cumsum(evals, 0) / max(total, 1e-300)
        r = int(torch.searchsorted(share, torch.tensor([float(variance or 1.0)], dtype=share.dtype))[0]) + 1
        r = min(r, d)
    comps = evecs[:, :r].T.contiguous()
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(signs == 0, 1.0, signs)
    return Projection(mean.float(), comps.float(), evals[:r].clone(), total)


# --- statistics -------------------------------------------------------------------------------------------------------


class FeatureStatistics:
    """Per feature, partial sums over the rows of a shard, combined at commit (`combine`): rows; for a projection,
    the squared deviation of the outputs from its mean and the part its coordinates keep; for every feature, the
    stored values' per-dimension sums and their sum of squares (their variance: the trainer's scale for a hint)."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, Any]] = {}

    def add(self, column: str, coords: Tensor, centred_energy: Tensor | None) -> None:
        """A batch's stored values `coords` (N, r); for a projection, `centred_energy` is the (N,) squared norms
        of the outputs about its mean (float64). Sums accumulate in float64 on the tensors' device."""
        c = coords.float()
        s = self.sums.setdefault(column, {"rows": 0, "total": 0.0, "kept": 0.0,
                                          "sum": torch.zeros(c.shape[1], dtype=torch.float64, device=c.device),
                                          "sumsq": 0.0})
        s["rows"] += len(c)
        sumsq = float(c.square().sum(dtype=torch.float64))
        if centred_energy is not None:
            s["total"] += float(centred_energy.sum())
            s["kept"] += sumsq
        s["sum"] += c.sum(0, dtype=torch.float64)
        s["sumsq"] += sumsq

    def partial(self) -> dict[str, dict[str, Any]]:
        """JSON-able partial sums (the per-dimension sums as lists)."""
        return {k: {**v, "sum": v["sum"].tolist()} for k, v in self.sums.items()}

    @staticmethod
    def combine(parts: Sequence[dict[str, dict[str, Any]]], projected: dict[str, bool]) -> dict[str, dict[str, Any]]:
        """The manifest's ``statistics.features``: per column, rows, ``variance_kept`` (projections: the share of
        the outputs' variance about the projection's mean the coordinates keep over all rows; else null) and
        ``stored_variance`` (the stored values' variance, averaged over their dimensions)."""
        out: dict[str, dict[str, Any]] = {}
        for column in parts[0] if parts else []:
            ps = [p[column] for p in parts]
            rows = sum(p["rows"] for p in ps)
            total, kept = sum(p["total"] for p in ps), sum(p["kept"] for p in ps)
            sums = np.sum([p["sum"] for p in ps], axis=0)
            dims = len(sums)
            variance = (sum(p["sumsq"] for p in ps) / rows - float((sums / rows) @ (sums / rows))) / dims
            out[column] = {"rows": int(rows),
                           "variance_kept": (round(kept / total, 6) if total > 0 else 1.0) if projected[column]
                           else None,
                           "stored_variance": float(f"{max(variance, 0.0):.6g}")}
        return out


def facts(manifest: dict[str, Any]) -> list[str]:
    """One line per stored feature of a version (for `inspect` and the card); empty without features."""
    block = manifest.get("features")
    if not block:
        return []
    stats = manifest["statistics"].get("features", {})
    lines = []
    for layer in block["layers"]:
        s, p = stats.get(layer["column"], {}), layer["projection"]
        pool = f", {layer['pool']}-pooled" if layer["pool"] != "none" else ""
        fitted = (f"{p['fit_tokens']} tokens of {p['fit_rows']} sequences" if p and "fit_tokens" in p
                  else f"{p['fit_rows']} rows" if p else "")
        how = (f"PCA rank {p['rank']} (fitted on {fitted}), keeps {s.get('variance_kept', 0):.1%} of the "
               f"variance over all {'tokens' if block.get('per_token') else 'rows'}" if p else "stored whole")
        lines.append(f"{layer['module']} ({layer['column']}): {layer['output_shape']}{pool} -> "
                     f"{layer['stored_shape']} {layer['dtype']}, {how}")
    return lines


def stored_shape(output_shape: Sequence[int], pool: str, projection: Projection | None) -> list[int]:
    """The stored shape of a feature per row."""
    if projection is not None:
        return [projection.rank]
    if pool != "none" and len(output_shape) >= 2:
        return [int(output_shape[0])]
    return [int(math.prod(output_shape))]
