"""What a language-model sweep reports beyond its runs: per sweep point the mean and SD over seeds of the held-out
metrics (summary.json's ``over_seeds``, the table's last lines) and the sweep plot (RUN/sweep.png: held-out
perplexity against T, one line per soft loss and alpha, the hard-token runs as a dashed level)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdstore.rundir import RunResult, over_seeds, save_sweep_plot

LM_METRICS = ("val_perplexity", "val_kl_teacher", "eval_perplexity", "eval_kl_teacher", "tokens_per_second")


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
