"""`kdstore inspect`: the terminal card, the README.md card with plots (derived files), and its statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdstore.card import compute_statistics
from kdstore.store import Version
from tests.conftest import Data, teacher_logits
from tests.helpers import all_bytes, assert_clean_error, cli
from tests.sharing_helpers import copy_version, label_store

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shared(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return label_store(data, tmp_path_factory.mktemp("card_store"))


def test_inspect_terminal_card(shared: dict[str, Path]) -> None:
    ds = shared["pq"].parent
    r = cli(["inspect", f"{ds}@v1"])
    assert r.exit_code == 0, r.output
    m = json.loads((shared["pq"] / "manifest.json").read_text())
    out = r.output
    assert out.startswith(f"pq@v1   {shared['pq']}\n  100 rows x 5 classes; parquet, 3 file(s)")
    assert f"teacher t0   teacher.pt  (torchscript, sha256 {m['teachers'][0]['sha256'][:12]})" in out
    assert ("transfer set transfer.parquet  (original, 100 rows, labels in 'label', "
            f"sha256 {m['transfer_set']['sha256'][:12]})") in out
    assert "stored       fp16 logits + top-3 (int16 indices, float16 values, uniform tail), log-sum-exp, labels" in out
    acc = m["statistics"]["teachers"]["t0"]["accuracy"]
    assert f"{100 * acc:.2f}%" in out
    fid = m["statistics"]["teachers"]["t0"]["topk_fidelity_kl"]
    header = next(ln for ln in out.splitlines() if ln.strip().startswith("teacher") and "T=1" in ln)
    assert header.split()[1:] == ["T=1", "T=2", "T=4", "T=8", "T=20"]
    row = out.splitlines()[out.splitlines().index(header) + 1].split()
    assert row[0] == "t0" and [float(x) for x in row[1:]] == pytest.approx([fid[t] for t in fid], rel=0.01)
    assert "most similar" not in out  # the data is only read with --card
    assert not (shared["pq"] / "card").exists()


def test_inspect_ensemble_and_top_k_only(shared: dict[str, Path]) -> None:
    r = cli(["inspect", shared["ens"].parent])
    assert r.exit_code == 0, r.output
    assert ("teacher t1   tests.fixtures_models:tiny_teacher@tiny_seed1.safetensors  (factory" in r.output
            and "no labels" in r.output)
    assert "unlabeled" in r.output
    r = cli(["inspect", shared["topk"].parent, "--json"])
    assert json.loads(r.output)["manifest"]["targets"]["logits"] is None


def test_card_writes_readme_and_plots_as_derived_files(shared: dict[str, Path], tmp_path: Path) -> None:
    vdir = copy_version(shared["pq"], tmp_path / "s")
    before = all_bytes(vdir)
    r = cli(["inspect", vdir, "--card", "-T", "4"])
    assert r.exit_code == 0, r.output
    card = vdir / "card"
    assert sorted(p.name for p in card.iterdir()) == ["README.md", "class_similarity.png", "confidence.png",
                                                       "reliability.png", "topk_mass.png"]
    assert f"wrote card {card / 'README.md'} (+ 4 plot(s))" in r.output
    assert "most similar classes at T=4 (t0, rows grouped by label)" in r.output and " ECE " in r.output
    for png in card.glob("*.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    readme = (card / "README.md").read_text()
    for name in ("confidence.png", "reliability.png", "class_similarity.png", "topk_mass.png"):
        assert f"]({name})" in readme
    assert readme.startswith("# pq v1\n") and "## Top-k fidelity" in readme and "| T = 20 |" in readme
    assert "derived" in readme and "`kdstore verify`" in readme
    # derived: the manifest and data files are byte-identical, and the version still verifies
    after = all_bytes(vdir)
    assert {k: v for k, v in after.items() if not k.startswith("card/")} == before
    assert cli(["verify", vdir]).exit_code == 0
    assert "derived_files" not in json.loads((vdir / "manifest.json").read_text())
    # rerunning replaces the card in place, leaving no temporary files
    assert cli(["inspect", vdir, "--card", "-T", "8"]).exit_code == 0
    assert sorted(p.name for p in card.iterdir()) == sorted(["README.md", "class_similarity.png", "confidence.png",
                                                             "reliability.png", "topk_mass.png"])
    assert "T = 8" in (card / "README.md").read_text()


def test_card_without_labels_or_logits(shared: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cards"
    r = cli(["inspect", shared["ens"].parent, "--card", "--card-dir", out / "ens", "--teacher", "t1"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "ens").iterdir()) == ["README.md", "class_similarity.png", "confidence.png",
                                                               "topk_mass.png"]  # no labels: no reliability
    assert "(t1, rows grouped by argmax)" in r.output
    assert not (shared["ens"] / "card").exists()
    r = cli(["inspect", shared["topk"].parent, "--card", "--card-dir", out / "topk"])
    assert r.exit_code == 0, r.output
    readme = (out / "topk" / "README.md").read_text()
    assert "Probability mass in the top-k per row (stored top-k)." in readme
    assert "rebuilt from the stored top-2" in readme
    assert (out / "topk" / "reliability.png").exists()  # labeled: soft targets rebuilt from the top-k


def test_card_statistics_match_a_direct_computation(data: Data, shared: dict[str, Path]) -> None:
    v = Version(shared["ens"].parent)  # fp32 logits: exact up to float32 softmax
    z = torch.from_numpy(v.read_all(["t0_logits"])["t0_logits"])
    t = 4.0
    s = compute_statistics(v, temperature=t)
    p = torch.softmax(z / t, 1).double().numpy()
    pred = z.argmax(1).numpy()
    want = np.stack([p[pred == c].mean(0) if (pred == c).any() else np.zeros(5) for c in range(5)])
    np.testing.assert_allclose(s.similarity, want, atol=1e-6)
    assert s.group_rows.tolist() == np.bincount(pred, minlength=5).tolist() and s.grouped_by == "argmax"
    p1 = torch.softmax(z, 1)
    t0 = s.teachers[0]
    assert t0.mean_confidence == pytest.approx(float(p1.max(1).values.mean()), rel=1e-5)
    top2 = torch.topk(p1, 2, 1).values.sum(1)  # ens stores top-2: mass from the stored top-k + log-sum-exp
    assert t0.mass_mean(2) == pytest.approx(float(top2.mean()), rel=1e-5)
    assert t0.accuracy is None and t0.ece is None

    lab = Version(shared["pq"])  # labeled: ECE from equal-width bins, checked against numpy
    s = compute_statistics(lab)
    zl = teacher_logits(data.x)
    conf, pred = torch.softmax(zl, 1).max(1)
    conf, pred = conf.double().numpy(), pred.numpy()
    correct = pred == data.y
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum((bins == b).sum() / 100 * abs(correct[bins == b].mean() - conf[bins == b].mean())
              for b in range(15) if (bins == b).any())
    assert s.teachers[0].ece == pytest.approx(ece, abs=2e-3)  # fp16 logits vs exact
    assert s.teachers[0].accuracy == pytest.approx(correct.mean())


def test_inspect_errors_are_one_line(shared: dict[str, Path], tmp_path: Path) -> None:
    ds = shared["pq"].parent
    assert_clean_error(cli(["inspect", ds, "--card", "-T", "0"]), r"--temperature 0.0: must be a finite number > 0")
    assert_clean_error(cli(["inspect", ds, "--card", "--teacher", "t9"]), r"--teacher t9: .* has teachers t0")
    assert_clean_error(cli(["inspect", f"{ds}@v7"]), r"version v7 not found")
    r = cli(["inspect", ds, "--card-dir", tmp_path])
    assert r.exit_code == 2 and "--card-dir and --teacher only apply with --card" in r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(cli(["inspect", ds, "--card", "--card-dir", blocker / "sub"]), r"cannot create .*--card-dir DIR")


def test_inspect_json(shared: dict[str, Path], tmp_path: Path) -> None:
    r = cli(["inspect", shared["pq"].parent, "--json", "--card", "--card-dir", tmp_path / "c"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["manifest"]["name"] == "pq" and out["manifest"]["version"] == 2
    cs = out["card_statistics"]
    assert cs["temperature"] == 4.0 and len(cs["similarity"]) == 5
    assert 0 <= cs["teachers"]["t0"]["ece"] <= 1
