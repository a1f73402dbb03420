"""Does distillation beat hard labels on the teachers users really bring? Three MNIST teachers of one architecture
that differ only in confidence, one small student, hard labels vs KD vs standardised KD, chosen on validation.

Phases (each reused when rerun with the same settings):
  1. teachers   benchmarks/_confidence_teachers.py: a LeNet-style CNN trained three ways on the 60k MNIST training
                images: calibrated (dropout), overconfident (no regularisation, many epochs, large logits),
                undertrained (plain SGD stopped at 92% on a training subset).
  2. label      `kdstore label` once per teacher over the 60k (float32 logits + top-5).
  3. advice     `kdstore.advice.advise` on each version: entropy, max and second probability per T.
  4. students   per teacher three `kdstore train` calls with --val-fraction 0.1 (the same 10% held out
                everywhere) and --seed 0,1,2: hard labels + plain KD at T in {1, 2, 4, 8, 20}; standardised KD at
                T in {1, 2, 4}, both at the default alpha 0.9; standardised KD at alpha 1, T in {0.5, 1, 2}.
                Everything else at kdstore's defaults (Adam 1e-3, cosine, batch 128).
  5. report     per teacher and method the mean +- SD of the test errors over seeds; the run chosen by validation
                (a) among the sweep the advice suggests and (b) among every run; the goal check; written to
                OUT/confidence_results.json.

Run: python benchmarks/prepare_mnist.py; python benchmarks/teacher_confidence.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks._confidence_teachers import FACTORY, RECIPES, train_teacher  # noqa: E402
from benchmarks.hinton_mnist import kdstore, label_once  # noqa: E402
from kdstore.advice import TEMPERATURES, advise  # noqa: E402
from kdstore.store import Version  # noqa: E402

PLAIN_T = TEMPERATURES
STD_T = (1.0, 2.0, 4.0)  # standardised KD at the default alpha 0.9
STD1_T = (0.5, 1.0, 2.0)  # standardised KD from the soft targets alone (alpha 1)


def students(name: str, ref: str, a: argparse.Namespace, test: Path, out: Path) -> list[dict[str, Any]]:
    """The two `kdstore train` sweeps of one teacher; returns every run of both summaries."""
    common = ["--targets", ref, "--student", a.student, "--epochs", str(a.epochs), "--seed", a.seeds,
              "--val-fraction", "0.1", "--eval", str(test), "--device", "cpu", "--quiet", "--resume"]
    sweeps = {"plain": ["--loss", "hard,kd", "-T", ",".join(f"{t:g}" for t in PLAIN_T)],
              "std": ["--loss", "kd", "--standardize", "-T", ",".join(f"{t:g}" for t in STD_T)],
              "std-a1": ["--loss", "kd", "--standardize", "-T", ",".join(f"{t:g}" for t in STD1_T), "--alpha", "1"]}
    runs = []
    for part, extra in sweeps.items():
        run_dir = out / "students" / f"{name}-{part}"
        kdstore(["train", *common, *extra, "--out", str(run_dir)])
        runs += json.loads((run_dir / "summary.json").read_text())["runs"]
    return runs


def groups(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per sweep point (over seeds): mean and SD of test and validation errors."""
    from kdstore.rundir import RunResult, over_seeds

    return {g["run"]: g for g in over_seeds([RunResult(**r) for r in runs])}


def choose(gs: dict[str, dict[str, Any]], allowed: set[str] | None = None) -> dict[str, Any]:
    """The point with the fewest mean validation errors (ties: lower validation NLL) among `allowed`."""
    pool = [g for k, g in gs.items() if allowed is None or k in allowed]
    return min(pool, key=lambda g: (g["val_errors_mean"], g["val_nll_mean"]))


def advised_points(adv: Any) -> set[str]:
    """The run ids of the sweep the advice suggests (always with the hard-label run)."""
    from kdstore.rundir import run_id

    return {"hard"} | {run_id("kd", t, a, standardize=s) for s in adv.standardize for t in adv.temperatures
                       for a in adv.alphas}


def report(res: dict[str, Any]) -> str:
    """One Markdown table: per teacher the mean +- SD of test errors of every method, the advice's verdict, the
    run validation chose among the advised sweep, and the goal."""
    cols = ([("hard", "hard")] + [(f"kd-T{t:g}-a0.9", f"KD T={t:g}") for t in PLAIN_T]
            + [(f"kd-std-T{t:g}-a0.9", f"std T={t:g}") for t in STD_T]
            + [(f"kd-std-T{t:g}-a1", f"std T={t:g} α=1") for t in STD1_T])
    lines = ["| teacher (test errors; mean top-1 - top-2 logit gap) | " + " | ".join(c for _, c in cols)
             + " | advice at T=4 | chosen on validation among the advised sweep | goal |",
             "|---|" + "---|" * (len(cols) + 3)]
    for name, t in res["teachers"].items():
        gs, info, ch = t["groups"], t["teacher"], t["advised_choice"]
        cells = [f"{gs[k]['eval_errors_mean']:.1f} ± {gs[k]['eval_errors_sd']:.1f}" if k in gs else "-"
                 for k, _ in cols]
        lines.append(f"| {name} ({info['test_errors']}; {info['mean_top2_gap']:.1f}) | " + " | ".join(cells)
                     + f" | {t['advice']['verdict']} | **{ch['eval_errors_mean']:.1f} ± {ch['eval_errors_sd']:.1f}** "
                     f"({ch['run']}) | {t['goal']} |")
    return "\n".join(lines)


def goal(name: str, hard: dict[str, Any], chosen: dict[str, Any]) -> str:
    """Never worse than hard labels beyond the seed spread; >= 10% fewer errors for the overconfident teacher."""
    spread = max(hard["eval_errors_sd"], chosen["eval_errors_sd"])
    fewer = (hard["eval_errors_mean"] - chosen["eval_errors_mean"]) / hard["eval_errors_mean"]
    ok = chosen["eval_errors_mean"] <= hard["eval_errors_mean"] + spread
    if name == "overconfident":
        ok = ok and fewer >= 0.10
    return f"{'met' if ok else 'NOT met'} ({100 * fewer:+.1f}% vs hard)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--student", default="mlp:784-100-10")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--teachers", default=",".join(RECIPES))
    ap.add_argument("--data-dir", type=Path, default=HERE / "data")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "confidence")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, test = a.data_dir / "mnist_train.parquet", a.data_dir / "mnist_test.parquet"
    if not (train.exists() and test.exists()):
        sys.exit(f"{a.data_dir} lacks the MNIST Parquet files: run python benchmarks/prepare_mnist.py first")
    res: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(a).items()}, "torch": torch.__version__,
                           "teachers": {}, "seconds": {}}
    for name in a.teachers.split(","):
        t0 = time.perf_counter()
        info = train_teacher(name, train, test, a.out / "teachers")
        spec = f"{FACTORY}@{a.out / 'teachers' / f'{name}.safetensors'}"
        ref = label_once(a.out / "targets", f"mnist-{name}", spec, train, info["sha256"], "cpu")
        adv = advise(Version(ref))[0]
        runs = students(name, ref, a, test, a.out)
        gs = groups(runs)
        chosen, best_any = choose(gs, advised_points(adv)), choose(gs)
        res["teachers"][name] = {"teacher": info, "targets": ref, "advice": adv.to_json(), "runs": runs,
                                 "groups": gs, "advised": sorted(advised_points(adv)), "advised_choice": chosen,
                                 "any_choice": best_any, "goal": goal(name, gs["hard"], chosen)}
        res["seconds"][name] = time.perf_counter() - t0
        (a.out / "confidence_results.json").write_text(json.dumps(res, indent=1))
    res["table"] = report(res)
    (a.out / "confidence_results.json").write_text(json.dumps(res, indent=1))
    print(res["table"])
    for name, t in res["teachers"].items():
        print(f"{name}: advice {t['advice']['verdict']}: {' '.join(t['advice']['words'])}")
        print(f"  chosen by validation among the advised sweep {t['advised']}: {t['advised_choice']['run']}; "
              f"among every run: {t['any_choice']['run']} ({t['any_choice']['eval_errors_mean']:.1f} test errors)")
    print(f"wrote {a.out / 'confidence_results.json'}")
    return res


if __name__ == "__main__":
    main()
