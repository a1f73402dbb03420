"""Stored teacher features through `kdstore convert` (`kdstore.convert`): kept as they are, dropped
(``--drop-features``), or their projections cut to fewer directions (``--feature-rank R``).

A projection's directions are ordered by the variance they explain, so the first R coordinates of a row are its
coordinates on the top-R directions: cutting to R is exact (no refit, no teacher), and the attachment keeps its mean
and first R directions. ``variance_kept`` of the cut projection is the parent's times the share of the stored
coordinates' squared norm that the first R keep, over all rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdstore import features
from kdstore.errors import ConfigError, arg
from kdstore.features import FeatureStatistics
from kdstore.store import Version, VersionWriter
from kdstore.store.formats import EXTENSIONS


@dataclass(frozen=True)
class FeaturePlan:
    """The features a converted version keeps: by column, the stored width (its projection's rank when cut)."""

    widths: dict[str, int]
    cut: bool  # some projection is cut to fewer directions

    def columns(self, src: Version) -> list[dict[str, Any]]:
        """The kept feature columns' specs (after the teachers' targets, as `label` writes them)."""
        return [{**c, "shape": [self.widths[c["name"]]]} for c in src.manifest["columns"]
                if c["name"] in self.widths]

    def rows(self, block: dict[str, np.ndarray], stats: dict[str, list[float]]) -> dict[str, np.ndarray]:
        """The kept feature columns of a block of source rows; adds (old, new) squared norms to `stats`."""
        out = {}
        for col, width in self.widths.items():
            old = block[col]
            out[col] = np.ascontiguousarray(old[:, :width])
            s = stats.setdefault(col, [0.0, 0.0])
            s[0] += float(np.square(old, dtype=np.float64).sum())
            s[1] += float(np.square(out[col], dtype=np.float64).sum())
        return out

    def stage(self, src: Version, writer: VersionWriter, fmt: str) -> None:
        """Each kept projection's attachment (cut to its new rank) in the new version's format."""
        for layer in src.manifest["features"]["layers"]:
            proj = layer["projection"]
            if proj is None or layer["column"] not in self.widths:
                continue
            cols = src.read_attachment(proj["attachment"])
            keep = np.argsort(cols["index"])[: self.widths[layer["column"]] + 1]  # the mean (-1) and R directions
            cut = {k: np.ascontiguousarray(v[keep]) for k, v in cols.items()}
            writer.attach(features.attachment_path(layer["column"], EXTENSIONS[fmt]), cut,
                          features.Projection.specs(cut["vector"].shape[1]))

    def manifest(self, src: Version, fmt: str, parts: list[dict[str, list[float]]]) -> tuple[dict[str, Any],
                                                                                            dict[str, Any]]:
        """The new ``features`` block and ``statistics.features``."""
        block = copy.deepcopy(src.manifest["features"])
        block["layers"] = [layer for layer in block["layers"] if layer["column"] in self.widths]
        old_stats = src.manifest["statistics"].get("features", {})
        stats = {}
        for layer in block["layers"]:
            col, width = layer["column"], self.widths[layer["column"]]
            s = copy.deepcopy(old_stats.get(col, {}))
            if width != layer["stored_shape"][0]:
                old, new = (sum(p[col][i] for p in parts) for i in (0, 1))
                s["variance_kept"] = round(s["variance_kept"] * new / old, 6) if old > 0 else s["variance_kept"]
                s["stored_variance"] = None  # recomputed below
                layer["projection"]["rank"] = width
            layer["stored_shape"] = [width]
            if layer["projection"] is not None:
                layer["projection"]["attachment"] = features.attachment_path(col, EXTENSIONS[fmt])
            stats[col] = s
        return block, stats


def plan_features(src: Version, drop: bool, rank: int | None) -> FeaturePlan | None:
    """What the converted version stores of the source's features (None: none)."""
    block = src.manifest.get("features")
    if rank is not None and (drop or not block):
        raise ConfigError(f"{arg('feature_rank')} {rank}: " + (f"{arg('drop_features')} drops the features" if drop
                          else f"{src.ref} stores no teacher features"))
    if not block or drop:
        return None
    widths = {}
    for layer in block["layers"]:
        width = layer["stored_shape"][0]
        if rank is not None and layer["projection"] is not None:
            if not 1 <= rank <= width:
                raise ConfigError(f"{arg('feature_rank')} {rank}: {layer['module']} is stored on {width} principal "
                                  f"directions; a projection can only be cut, use 1..{width}")
            width = rank
        widths[layer["column"]] = width
    if rank is not None and not any(layer["projection"] for layer in block["layers"]):
        raise ConfigError(f"{arg('feature_rank')} {rank}: {src.ref}'s features are stored whole (no projection to "
                          f"cut); relabel with {arg('feature_rank')} to project them")
    return FeaturePlan(widths, any(w != layer["stored_shape"][0] for layer, w in zip(block["layers"],
                                                                                       widths.values(), strict=True)))


def stored_variance(plan: FeaturePlan, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """``stored_variance`` of each kept feature from the shards' FeatureStatistics sums."""
    return FeatureStatistics.combine(parts, dict.fromkeys(plan.widths, False)) if parts else {}
