"""Labeling overhead and storage cost.

1. `kdstore label` wall time / pure teacher inference wall time, same data and batch size (goal <= 1.10:
   writing overlaps compute).
2. Bytes per sample for full fp32/fp16 logits and top-k (k = 1, 5, 10, C/4) vs np.save of fp32 logits, with
   the top-k fidelity (KL between exact and rebuilt soft targets) beside each.

Run: python benchmarks/bench_label.py [--rows 60000] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import best_of, make_teacher, make_transfer
from kdstore.device import resolve_device
from kdstore.labeling import LabelConfig, label
from kdstore.quickstart import dataset_file, teacher_spec
from kdstore.teachers import load_teacher
from kdstore.transfer import open_transfer


def pure_inference(spec: str, transfer: Path, batch_size: int, device: torch.device) -> None:
    """Read the transfer set in batches and run the teacher: everything labeling does except storing."""
    t = load_teacher(spec)
    t.module.to(device)
    ts = open_transfer(transfer)
    with torch.inference_mode():
        for _, x, _ in ts.iter_batches(batch_size):
            t.module(torch.from_numpy(x).to(device)).float().cpu()
    ts.close()


def overhead(tmp: Path, rows: int, batch_size: int, device: str) -> dict[str, float]:
    transfer = make_transfer(tmp / "transfer.parquet", rows)
    spec = make_teacher(tmp / "teacher.safetensors", [784, 1200, 1200, 10])
    dev = resolve_device(device)
    n = [0]

    def run_label() -> None:
        n[0] += 1
        label(LabelConfig(teachers=(spec,), transfer=str(transfer), out=str(tmp / "store"), name=f"b{n[0]}",
                          batch_size=batch_size, device=device, precision="fp32", top_k=10))

    pure_inference(spec, transfer, batch_size, dev)  # warm-up: first heavy torch work is slow
    run_label()
    t_inf = best_of(lambda: pure_inference(spec, transfer, batch_size, dev))
    t_lab = best_of(run_label)
    return {"rows": rows, "inference_s": t_inf, "label_s": t_lab, "ratio": t_lab / t_inf}


def storage(tmp: Path) -> list[dict[str, object]]:
    """Bytes per sample and fidelity on the real digits teacher (C = 10)."""
    spec, transfer = teacher_spec(), dataset_file("digits_train.parquet")
    rows = open_transfer(transfer).rows
    t = load_teacher(spec)
    x, _ = open_transfer(transfer).read_rows(0, rows)
    with torch.inference_mode():
        logits = t.module(torch.from_numpy(x)).float().numpy()
    np.save(tmp / "logits.npy", logits)
    npy = (tmp / "logits.npy").stat().st_size / rows
    out: list[dict[str, object]] = []
    c = logits.shape[1]
    settings = [("full fp32", True, "float32", None), ("full fp16", True, "float16", None)]
    settings += [(f"top-{k} fp16", False, "float16", k) for k in sorted({1, max(1, c // 4), 5, 10})]
    for i, (what, keep, dtype, k) in enumerate(settings):
        r = label(LabelConfig(teachers=(spec,), transfer=str(transfer), out=str(tmp / "s2"), name=f"s{i}",
                              keep_logits=keep, logits_dtype=dtype, top_k=k, device="cpu"))
        m = r.manifest
        size = sum(f["bytes"] for f in m["files"]) / rows
        fid = m["statistics"]["teachers"]["t0"].get("topk_fidelity_kl")
        out.append({"stored": what, "bytes_per_sample": size, "vs_npy_fp32": size / npy,
                    "kl_T1": fid["1.0"] if fid and k else 0.0, "kl_T4": fid["4.0"] if fid and k else 0.0,
                    "kl_T20": fid["20.0"] if fid and k else 0.0})
    out.append({"stored": "np.save fp32 logits (baseline)", "bytes_per_sample": npy, "vs_npy_fp32": 1.0})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kdstore-bench-"))
    try:
        o = overhead(tmp, args.rows, args.batch_size, args.device)
        print(f"label overhead ({o['rows']} rows, 784-1200-1200-10 teacher, batch {args.batch_size}, "
              f"device {resolve_device(args.device)}, torch threads {torch.get_num_threads()}):")
        print(f"  pure inference {o['inference_s']:.2f} s   kdstore label {o['label_s']:.2f} s   "
              f"ratio label/inference = {o['ratio']:.3f}  (goal <= 1.10)")
        s = storage(tmp)
        print("storage on the digits teacher (C = 10); KL(exact || rebuilt) in nats, mean per row:")
        print(f"  {'stored':<32} {'B/sample':>9} {'vs npy':>7} {'KL@T1':>9} {'KL@T4':>9} {'KL@T20':>9}")
        for r in s:
            kl = "".join(f" {r[k]:9.2e}" for k in ("kl_T1", "kl_T4", "kl_T20")) if "kl_T1" in r else ""
            print(f"  {r['stored']:<32} {r['bytes_per_sample']:9.1f} {r['vs_npy_fp32']:7.2f}{kl}")
        if args.json:
            args.json.write_text(json.dumps({"overhead": o, "storage": s}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
