"""End to end on the command line: `kdstore label` then `kdstore train` (console script), and `kdstore quickstart`."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import jsonschema

from kdstore.store import Version
from kdstore.store import manifest as mf
from tests.conftest import Data
from tests.helpers import FIX, REPO_ROOT, cli, kdstore_command, subprocess_env


def test_label_then_train(data: Data, tmp_path: Path) -> None:
    store, out = tmp_path / "store", tmp_path / "run"
    r = cli(["label", "--teacher", f"{FIX}:tiny_teacher", "--transfer", data.parquet, "--out", store, "--name", "tiny",
             "--top-k", "3", "--shard-rows", "40", "--row-group-rows", "16", "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    version = store / "tiny" / "v1"
    manifest = json.loads((version / "manifest.json").read_text())
    schema = json.loads((REPO_ROOT / "schemas" / "manifest.v2.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(manifest)
    mf.validate(manifest)
    assert Version(store / "tiny").verify(full=True) == []

    p = subprocess.run([*kdstore_command(), "train", "--targets", str(store / "tiny"), "--student", "mlp:8-16-5",
                        "--loss", "kd", "-T", "2", "--alpha", "0.7", "--epochs", "2", "--batch-size", "20",
                        "--eval", str(data.parquet), "--device", "cpu", "--out", str(out)],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no warnings, no progress bar off a terminal
    lines = p.stdout.splitlines()
    assert lines[1].startswith("kd-T2-a0.7 ") and lines[-1].startswith(f"outputs in {out}/ (summary.json")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["train_loss"]) and m["train_loss"] > 0 for m in metrics)
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    assert run["run"] == "kd-T2-a0.7" and run["eval_accuracy"] == metrics[-1]["eval_accuracy"]
    assert (out / "runs" / "kd-T2-a0.7" / "student.safetensors").is_file()


def test_quickstart(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    r = cli(["quickstart", "--epochs", "2", "--out", out, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("1/3 labeling ") and lines[-1].startswith("done in ")
    assert sum(line.startswith("student mlp:") and " hard labels " in line for line in lines) == 1
    assert sum(line.startswith("student mlp:") and " KD T=" in line for line in lines) == 3
    assert Version(out / "targets" / "digits").verify(full=True) == []
    summaries = sorted(out.glob("runs-v1/*/summary.json"))
    runs = [run for p in summaries for run in json.loads(p.read_text())["runs"]]
    assert len(runs) == 4 and all(run["epochs"] == 2 and 0 <= run["eval_accuracy"] <= 1 for run in runs)
