"""`kdstore diff`: compare the targets of two versions labeled on the same transfer set, row by row."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore import targets
from kdstore.errors import ShapeMismatchError
from kdstore.soft_targets import columns_for, log_probs, teacher_id
from kdstore.store import Version, VersionRef
from kdstore.store.catalog import class_names
from kdstore.store.remote import resolve_any, shown_ref
from kdstore.versioning import rows_per_chunk

# --- diff -------------------------------------------------------------------------------------------------------


@dataclass
class ClassDiff:
    cls: int
    name: str
    rows: int  # rows whose reference class (true label, else A's argmax) is this class
    agreement: float | None  # fraction of those rows where A's and B's argmax agree
    mean_prob_a: float  # mean probability of this class over all rows, at T
    mean_prob_b: float
    shift: float  # mean_prob_b - mean_prob_a


@dataclass
class DiffResult:
    a: str
    b: str
    teacher_a: str
    teacher_b: str
    temperature: float
    rows: int
    num_classes: int
    transfer_sha256: str
    transfer_file: str
    agreement: float
    disagreeing_rows: int
    kl_mean: float | None  # None when some rows have infinite KL (B gives 0 where A gives mass: the drop tail)
    kl_max: float | None
    kl_infinite_rows: int
    grouped_by: str  # "label" or "argmax of A"
    accuracy_a: float | None = None
    accuracy_b: float | None = None
    per_class: list[ClassDiff] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_same_transfer(va: Version, vb: Version) -> None:
    ta, tb = va.manifest["transfer_set"], vb.manifest["transfer_set"]
    if ta["sha256"] != tb["sha256"]:
        raise ShapeMismatchError(
            f"{va.ref} was labeled on {Path(ta['path']).name} (sha256 {ta['sha256'][:12]}...) but {vb.ref} on "
            f"{Path(tb['path']).name} (sha256 {tb['sha256'][:12]}...); diff compares rows one to one, so both "
            "versions must come from the same transfer set (see `kdstore ls` for each version's transfer set)")
    if va.num_rows != vb.num_rows or va.num_classes != vb.num_classes:
        raise ShapeMismatchError(f"{va.ref} has {va.num_rows} rows x {va.num_classes} classes, {vb.ref} "
                                 f"{vb.num_rows} x {vb.num_classes}; expected the same shape")


@dataclass
class _Sums:
    """Running sums of a row-by-row comparison."""

    c: int
    agree: float = 0.0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    kl_inf: int = 0
    correct_a: int = 0
    correct_b: int = 0
    rows_per: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    agree_per: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prob_a: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    prob_b: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def __post_init__(self) -> None:
        self.rows_per, self.agree_per = np.zeros(self.c, np.int64), np.zeros(self.c, np.int64)
        self.prob_a, self.prob_b = torch.zeros(self.c, dtype=torch.float64), torch.zeros(self.c, dtype=torch.float64)

    def add(self, lpa: torch.Tensor, lpb: torch.Tensor, y: np.ndarray | None) -> None:
        """Add a block of rows: A's and B's (N, C) log soft targets, and the true labels if any."""
        arg_a, arg_b = lpa.argmax(1).numpy(), lpb.argmax(1).numpy()
        same = arg_a == arg_b
        self.agree += float(same.sum())
        kl = targets.kl_divergence(lpa, lpb).clamp(min=0.0).double()
        finite = torch.isfinite(kl)
        self.kl_inf += int((~finite).sum())
        self.kl_sum += float(kl[finite].sum())
        if bool(finite.any()):
            self.kl_max = max(self.kl_max, float(kl[finite].max()))
        self.prob_a += lpa.exp().double().sum(0)
        self.prob_b += lpb.exp().double().sum(0)
        if y is not None:
            self.correct_a += int((arg_a == y).sum())
            self.correct_b += int((arg_b == y).sum())
        ref = y if y is not None else arg_a
        self.rows_per += np.bincount(ref, minlength=self.c)[: self.c]
        self.agree_per += np.bincount(ref[same], minlength=self.c)[: self.c]

    def per_class(self, names: list[str], n: int) -> list[ClassDiff]:
        pa, pb = (self.prob_a / n).tolist(), (self.prob_b / n).tolist()
        return [ClassDiff(k, names[k], int(self.rows_per[k]),
                          float(self.agree_per[k] / self.rows_per[k]) if self.rows_per[k] else None,
                          pa[k], pb[k], pb[k] - pa[k]) for k in range(self.c)]


def diff(a: str | Path | VersionRef, b: str | Path | VersionRef, *, temperature: float = 1.0,
         teacher_a: str | None = None, teacher_b: str | None = None) -> DiffResult:
    """Compare teacher `teacher_a` of version `a` with `teacher_b` of version `b`, row by row.

    Args:
        a, b: version references (local or remote).
        temperature: KL(A || B) and the per-class probabilities are computed on soft targets at this T;
            argmax agreement does not depend on T.

    Raises:
        ShapeMismatchError: the versions were labeled on different transfer sets (sha256) or disagree in shape.
        ConfigError: unknown teacher id, or temperature <= 0.
    """
    targets.check_temperature(temperature)
    va, vb = Version(resolve_any(a, option="")), Version(resolve_any(b, option=""))
    if "tokens" in (va.manifest["targets"].get("kind"), vb.manifest["targets"].get("kind")):
        from kdstore.token_compare import diff_tokens

        return diff_tokens(va, vb, shown_ref(a, va.ref), shown_ref(b, vb.ref), temperature)  # type: ignore[return-value]
    _check_same_transfer(va, vb)
    ta, tb = teacher_id(va, teacher_a, "teacher_a"), teacher_id(vb, teacher_b, "teacher_b")
    label_col = va.column_for("label") if va.has_labels else None
    cols_a, cols_b = columns_for(va, ta) + ([label_col] if label_col else []), columns_for(vb, tb)
    sums = _Sums(va.num_classes)
    first = 0
    for block_a in va.iter_blocks(cols_a + ["sample_id"], rows_per_chunk(va.num_classes)):  # bounded by a chunk
        n = len(block_a["sample_id"])
        block_b = vb.read_rows(first, first + n, cols_b)
        first += n
        y = block_a[label_col].astype(np.int64) if label_col else None
        sums.add(log_probs(va, block_a, ta, temperature), log_probs(vb, block_b, tb, temperature), y)
    n, ts = va.num_rows, va.manifest["transfer_set"]
    return DiffResult(
        a=shown_ref(a, va.ref), b=shown_ref(b, vb.ref), teacher_a=ta, teacher_b=tb, temperature=float(temperature),
        rows=n, num_classes=va.num_classes, transfer_sha256=ts["sha256"], transfer_file=Path(ts["path"]).name,
        agreement=sums.agree / n, disagreeing_rows=int(n - sums.agree),
        kl_mean=None if sums.kl_inf else sums.kl_sum / n, kl_max=None if sums.kl_inf else sums.kl_max,
        kl_infinite_rows=sums.kl_inf, grouped_by="label" if label_col else "argmax of A",
        accuracy_a=sums.correct_a / n if label_col else None, accuracy_b=sums.correct_b / n if label_col else None,
        per_class=sums.per_class(class_names(va.manifest), n),
    )


def format_diff(r: DiffResult, max_classes: int = 50) -> str:
    """The human-readable report `kdstore diff` prints."""
    if not isinstance(r, DiffResult):  # two per-token versions
        from kdstore.token_compare import format_token_diff

        return format_token_diff(r)
    lines = [
        f"A: {r.a} ({r.teacher_a})",
        f"B: {r.b} ({r.teacher_b})",
        f"transfer set {r.transfer_file} (sha256 {r.transfer_sha256[:12]}...), {r.rows} rows, {r.num_classes} classes",
        "",
        f"argmax agreement   {100 * r.agreement:.2f}%  ({r.disagreeing_rows} rows differ)",
    ]
    if r.kl_mean is None:
        lines.append(f"KL(A||B) at T={r.temperature:g}   inf on {r.kl_infinite_rows} rows (B gives zero probability "
                     "where A gives some: a 'drop' tail?)")
    else:
        lines.append(f"KL(A||B) at T={r.temperature:g}   mean {r.kl_mean:.4g} nats, max {r.kl_max:.4g}")
    if r.accuracy_a is not None and r.accuracy_b is not None:
        lines.append(f"accuracy           A {100 * r.accuracy_a:.2f}%   B {100 * r.accuracy_b:.2f}%   "
                     f"(B - A: {100 * (r.accuracy_b - r.accuracy_a):+.2f} points)")
    lines += ["", f"per class (rows grouped by {r.grouped_by}; mean probabilities at T={r.temperature:g}):",
              f"{'class':<12} {'rows':>7} {'agree%':>7} {'mean p_A':>9} {'mean p_B':>9} {'shift':>9}"]
    shown = sorted(r.per_class, key=lambda d: -abs(d.shift))[:max_classes] if len(r.per_class) > max_classes \
        else r.per_class
    for d in shown:
        agree = f"{100 * d.agreement:7.2f}" if d.agreement is not None else f"{'-':>7}"
        lines.append(f"{d.name[:12]:<12} {d.rows:7d} {agree} {d.mean_prob_a:9.4f} {d.mean_prob_b:9.4f} {d.shift:+9.4f}")
    if len(r.per_class) > max_classes:
        lines.append(f"({len(r.per_class) - max_classes} more classes with smaller shifts; --json lists all)")
    return "\n".join(lines)
