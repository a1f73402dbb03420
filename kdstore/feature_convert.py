"""Stored teacher features through `kdstore convert` (`kdstore.convert`, `kdstore.token_convert`): kept as they
are, dropped (``--drop-features``), or their projections cut to fewer directions (``--feature-rank R``).

A projection's directions are ordered by the variance they explain, so the first R coordinates of a row are its
coordinates on the top-R directions: cutting to R is exact (no refit, no teacher), and the attachment keeps its mean
and first R directions. ``variance_kept`` of the cut projection is the parent's times the share of the stored
coordinates' squared norm that the first R keep, over all rows (per-token features: over all real tokens).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    per_token: bool = False  # (rows, L, width) columns of a language-model version; statistics over real tokens

    def columns(self, src: Version) -> list[dict[str, Any]]:
        """The kept feature columns' specs (after the targets, as `label` writes them)."""
        return [{**c, "shape": [*c["shape"][:-1], self.widths[c["name"]]]} for c in src.manifest["columns"]
                if c["name"] in self.widths]

    def rows(self, block: dict[str, np.ndarray], norms: dict[str, list[float]],
             sums: FeatureStatistics) -> dict[str, np.ndarray]:
        """The kept feature columns of a block of source rows; adds the (old, new) squared norms to `norms` and
        the new values to `sums` (per token: the real tokens', by the block's attention mask)."""
        out = {}
        real = block["attention_mask"] == 1 if self.per_token else slice(None)
        for col, width in self.widths.items():
            old = block[col]
            out[col] = np.ascontiguousarray(old[..., :width])
            by_query = (lambda a: np.swapaxes(a, 1, 2)) if old.ndim == 4 else (lambda a: a)  # (B, H, L, L) maps
            kept, new = by_query(old)[real].reshape(-1, old.shape[-1]), by_query(out[col])[real].reshape(-1, width)
            s = norms.setdefault(col, [0.0, 0.0])
            s[0] += float(np.square(kept, dtype=np.float64).sum())
            s[1] += float(np.square(new, dtype=np.float64).sum())
            sums.add(col, torch.from_numpy(new.astype(np.float32)), None)
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
            if width != layer["stored_shape"][-1]:
                old, new = (sum(p[col][i] for p in parts) for i in (0, 1))
                s["variance_kept"] = round(s["variance_kept"] * new / old, 6) if old > 0 else s["variance_kept"]
                s["stored_variance"] = None  # recomputed below
                layer["projection"]["rank"] = width
            layer["stored_shape"] = [*layer["stored_shape"][:-1], width]
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
        width = layer["stored_shape"][-1]
        if rank is not None and layer["projection"] is not None:
            if not 1 <= rank <= width:
                raise ConfigError(f"{arg('feature_rank')} {rank}: {layer['module']} is stored on {width} principal "
                                  f"directions; a projection can only be cut, use 1..{width}")
            width = rank
        widths[layer["column"]] = width
    if rank is not None and not any(layer["projection"] for layer in block["layers"]):
        raise ConfigError(f"{arg('feature_rank')} {rank}: {src.ref}'s features are stored whole (no projection to "
                          f"cut); relabel with {arg('feature_rank')} to project them")
    cut = any(w != layer["stored_shape"][-1] for layer, w in zip(block["layers"], widths.values(), strict=True))
    return FeaturePlan(widths, cut, bool(block.get("per_token")))


def record(m: dict[str, Any], src: Version, fmt: str, plan: FeaturePlan, parts: list[dict[str, Any]]) -> None:
    """The converted version's ``features`` block and ``statistics.features`` from the shards' partial sums
    (``{"norms", "sums"}`` each, as `FeaturePlan.rows` fills them)."""
    m["features"], stats = plan.manifest(src, fmt, [p["norms"] for p in parts])
    fresh = FeatureStatistics.combine([p["sums"] for p in parts], dict.fromkeys(plan.widths, False))
    for col, s in stats.items():
        s["stored_variance"] = fresh[col]["stored_variance"]
    m["statistics"]["features"] = stats
