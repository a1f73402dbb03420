"""What a language-model sweep reports: a point's result (its held-out measurements in `RunResult` form),
summary.json (the runs, per sweep point the mean and SD over seeds of the held-out metrics, the point validation
chooses) and the sweep plot (RUN/sweep.png: held-out perplexity against T, one line per soft loss and alpha, the
hard-token runs as a dashed level)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdstore.rundir import RunResult, over_seeds, save_sweep_plot
from kdstore.train_config import SweepPoint

LM_METRICS = ("val_perplexity", "val_kl_teacher", "eval_perplexity", "eval_kl_teacher", "tokens_per_second")


KL_HOW = {"topk": "exact KL to the stored top-k rebuild at T = 1",
          "sampled": "unbiased estimate from the stored draws at T = 1"}


def lm_result(rid: str, point: SweepPoint, epochs: int, val: dict[str, float] | None, ev: dict[str, float] | None,
              seconds: list[float], tokens: int, extra: dict[str, Any]) -> RunResult:
    """A finished point's RunResult: accuracy and NLL per next token of the --eval version (`ev`) and the held-out
    rows (`val`), the teacher agreement of the first measured, training time and tokens; `extra` gets
    ``train_tokens``, ``tokens_per_second`` and each set's perplexity, KL to the teacher and tokens."""
    train_s = sum(seconds)
    extra = {**extra, "train_tokens": tokens, "tokens_per_second": tokens / train_s if train_s else None,
             "kind": "tokens"}
    for name, m in (("val", val), ("eval", ev)):
        if m is not None:
            extra.update({f"{name}_perplexity": m["perplexity"], f"{name}_kl_teacher": m["kl_teacher"],
                          f"{name}_tokens": m["tokens"]})
    ref = ev or val or {}
    return RunResult(rid, point.loss, point.temperature, point.alpha, epochs, ev["accuracy"] if ev else None, None,
                     ev["nll"] if ev else None, float(ref.get("teacher_agreement", 0.0)), train_s, seconds, extra,
                     point.seed, False, val["accuracy"] if val else None, None, val["nll"] if val else None)


def kl_how(kinds: dict[str, str]) -> str:
    """summary.json's ``validation.kl_teacher``: how each held-out set ({"val"/"eval": "topk"/"sampled"}) measures
    KL to the teacher, once when they agree."""
    if len(set(kinds.values())) == 1:
        return KL_HOW[next(iter(kinds.values()))]
    return "; ".join(f"{which}: {KL_HOW[k]}" for which, k in kinds.items())


def lm_summary(head: dict[str, Any], results: list[RunResult], several_seeds: bool) -> dict[str, Any]:
    """summary.json: `head` (kind, targets, student, teacher, validation), the runs, ``over_seeds`` when several
    seeds were swept, and ``best_by_validation``: the run with the lowest held-out NLL."""
    out: dict[str, Any] = {**head, "runs": [asdict(r) for r in results]}
    if several_seeds:
        out["over_seeds"] = lm_over_seeds(results)
    scored = [r for r in results if r.val_nll is not None]
    if scored:
        best = min(scored, key=lambda r: r.val_nll)  # type: ignore[arg-type, return-value]
        out["best_by_validation"] = {"run": best.run, "val_nll": best.val_nll,
                                     "val_perplexity": math.exp(best.val_nll or 0.0)}
    return out


def lm_over_seeds(results: list[RunResult]) -> list[dict[str, Any]]:
    """One entry per (loss, T, alpha) (`rundir.over_seeds`): run id without the seed, the seeds, and
    ``<metric>_mean`` / ``<metric>_sd`` (sample SD; 0 for one seed) of each of `LM_METRICS` that every seed has,
    plus ``val_nll``."""
    return over_seeds(results, lambda r: {**{m: r.extra.get(m) for m in LM_METRICS}, "val_nll": r.val_nll})


def plot_lm_sweep(results: list[RunResult], path: Path, title: str) -> Path | None:
    """Held-out perplexity (the --eval version where measured, else the held-out rows) against T, mean over seeds
    with +-1 SD bars; None when no metric was measured or there are fewer than two points."""
    agg = lm_over_seeds(results)
    metric = next((m for m in ("eval_perplexity", "val_perplexity") if agg and all(f"{m}_mean" in g for g in agg)),
                  None)
    if metric is None or len(agg) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key in dict.fromkeys((g["loss"], g["alpha"]) for g in agg):
        gs = sorted((g for g in agg if (g["loss"], g["alpha"]) == key), key=lambda g: g["temperature"])
        y, err = [g[f"{metric}_mean"] for g in gs], [g[f"{metric}_sd"] for g in gs]
        if key[0] == "hard":
            ax.axhline(y[0], linestyle="--", linewidth=1, color="grey", label="hard (true next tokens)")
        else:
            ax.errorbar([g["temperature"] for g in gs], y, yerr=err, marker="o", capsize=3,
                        label=f"{key[0]}, alpha={key[1]:g}")
    return save_sweep_plot(fig, ax, path, title, ("held-out version" if metric == "eval_perplexity" else
                                                  "held-out rows") + " perplexity", max(len(g["seeds"]) for g in agg))


__all__ = ["LM_METRICS", "lm_over_seeds", "plot_lm_sweep"]
