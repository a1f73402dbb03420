"""`kdstore label --features`: what the labeler does with a teacher's intermediate outputs (`kdstore.features`).

Before the writer opens, `prepare` probes each named module's output shape on two rows and fits the projections
(PCA over the first ``fit_rows`` samples), so the version's columns (their stored widths) are known; once the
writer is open, `LabelFeatures.staged` swaps in the projections a resumed or parallel participant staged first, so
every shard of a version projects with the same directions. While labeling, `LabelFeatures.columns` turns a batch's
captured outputs into the stored columns and adds the kept-variance sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdstore import features
from kdstore.errors import TeacherError, arg
from kdstore.features import FeatureSpec, FeatureStatistics, Projection
from kdstore.label_rows import forward
from kdstore.store import VersionWriter
from kdstore.store.formats import EXTENSIONS
from kdstore.teachers import Teacher
from kdstore.transfer import TransferSet


@dataclass
class LabelFeatures:
    """The features of a labeling run: the spec, each module's output shape and projection (None: stored whole)."""

    spec: FeatureSpec
    source: str
    output_shapes: dict[str, list[int]]
    projections: dict[str, Projection | None]
    fit_rows: int = 0  # samples the projections were fitted on
    stats: FeatureStatistics = field(default_factory=FeatureStatistics)

    def column_specs(self) -> list[dict[str, Any]]:
        """The version's feature columns (after the teachers' targets)."""
        out = []
        for m in self.spec.modules:
            shape = features.stored_shape(self.output_shapes[m], self.spec.pool, self.projections[m])
            out.append({"name": features.column_name(m), "role": "feature", "teacher": "t0",
                        "dtype": self.spec.dtype, "shape": shape})
        return out

    def staged(self, writer: VersionWriter, fmt: str) -> None:
        """Stage each projection as an attachment (or take the one a participant staged first)."""
        for m, p in self.projections.items():
            if p is not None:
                rel = features.attachment_path(features.column_name(m), EXTENSIONS[fmt])
                self.projections[m] = Projection.from_columns(writer.attach(rel, p.columns(),
                                                                            Projection.specs(len(p.mean))))

    def columns(self, got: dict[str, Tensor], rows: int) -> dict[str, np.ndarray]:
        """A batch's captured outputs as stored columns; the kept-variance sums are added to `stats`."""
        out = {}
        dtype = np.float16 if self.spec.dtype == "float16" else np.float32
        for m in self.spec.modules:
            f = features.reduce_output(got[m], self.spec.pool, m, rows)
            p = self.projections[m]
            coords, energy = p.project(f) if p is not None else (f, None)
            self.stats.add(features.column_name(m), coords, energy)
            out[features.column_name(m)] = _stored(coords, dtype, m, self.source)
        return out

    def record(self, manifest: dict[str, Any], fmt: str, parts: list[dict[str, Any]]) -> None:
        """Add the ``features`` block and ``statistics.features`` (from the shards' partial sums) to `manifest`."""
        manifest["features"] = self.describe(fmt)
        manifest["statistics"]["features"] = FeatureStatistics.combine(
            parts, {features.column_name(m): p is not None for m, p in self.projections.items()})

    def describe(self, fmt: str) -> dict[str, Any]:
        """The manifest's ``features`` block."""
        layers = []
        for spec in self.column_specs():
            m = self.spec.modules[[features.column_name(x) for x in self.spec.modules].index(spec["name"])]
            p = self.projections[m]
            entry: dict[str, Any] = {"module": m, "column": spec["name"], "output_shape": self.output_shapes[m],
                                     "pool": self.spec.pool if len(self.output_shapes[m]) >= 2 else "none",
                                     "stored_shape": spec["shape"], "dtype": self.spec.dtype, "projection": None}
            if p is not None:
                entry["projection"] = {
                    "kind": "pca", "rank": p.rank, "fit_rows": self.fit_rows,
                    "attachment": features.attachment_path(spec["name"], EXTENSIONS[fmt]),
                    "explained_variance_ratio_fit": round(float(p.explained.sum()) / max(p.total_variance, 1e-300),
                                                          6)}
            layers.append(entry)
        return {"teacher": "t0", "source": self.source, "settings": self.spec.describe(), "layers": layers}


def _stored(coords: Tensor, dtype: type, module: str, source: str) -> np.ndarray:
    a = coords.cpu().numpy().astype(dtype)
    if dtype is np.float16 and not np.isfinite(a).all():
        raise TeacherError(f"{arg('features')} {module}: values of {source} overflow float16 (|x| > 65504) or are "
                           f"not finite; use {arg('feature_dtype')} float32 or a projection")
    return a


def prepare(spec: FeatureSpec, teacher: Teacher, ts: TransferSet, batch_size: int, device: torch.device,
            precision: str) -> LabelFeatures:
    """Output shapes of the modules (probed on two rows) and their projections, fitted on the first
    ``spec.fit_rows`` samples (unaugmented), before anything is written."""
    x, _ = ts.read_rows(0, min(2, ts.rows))
    with features.capture(teacher.module, spec.modules, teacher.source) as got:
        forward(teacher, x, device, precision)
        shapes = {m: [int(s) for s in got[m].shape[1:]] for m in spec.modules}
    for m in spec.modules:
        features.reduce_output(got[m], spec.pool, m, len(x))  # refuses an output without a batch axis now
    projections: dict[str, Projection | None] = dict.fromkeys(spec.modules)
    if spec.projected:
        sample = _fit_sample(spec, teacher, ts, batch_size, device, precision)
        projections = {m: features.fit_projection(sample[m], spec.rank, spec.variance, m) for m in spec.modules}
    fitted = min(spec.fit_rows, ts.rows) if spec.projected else 0
    return LabelFeatures(spec, teacher.source, shapes, projections, fitted)


@torch.inference_mode()
def _fit_sample(spec: FeatureSpec, teacher: Teacher, ts: TransferSet, batch_size: int, device: torch.device,
                precision: str) -> dict[str, Tensor]:
    """Each module's reduced outputs over the first `fit_rows` samples, (n, D) float32 on the CPU."""
    parts: dict[str, list[Tensor]] = {m: [] for m in spec.modules}
    with features.capture(teacher.module, spec.modules, teacher.source) as got:
        for _, x, _ in ts.iter_batches(batch_size, 0, min(spec.fit_rows, ts.rows)):
            forward(teacher, x, device, precision)
            for m in spec.modules:
                parts[m].append(features.reduce_output(got[m], spec.pool, m, len(x)).cpu())
    return {m: torch.cat(v) for m, v in parts.items()}
