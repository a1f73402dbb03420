"""Stored teacher features (#19): label --features (whole, pooled, projected), the attachment, statistics, resume,
readers without kdstore, train --hint (FitNets) in memory and streamed, and every error path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore import feature_losses, features, hints
from kdstore.errors import ConfigError, ShapeMismatchError, TeacherError
from kdstore.store import Version
from kdstore.store.catalog import verify
from tests import fixtures_models as fm
from tests.conftest import Data
from tests.helpers import FIX, assert_clean_error, cli, data_bytes, run_label, versions_of

TEACHER = f"{FIX}:tiny_teacher"  # nn.Sequential: modules "0" (Linear 8->16), "1" (ReLU), "2" (Linear 16->5)


def _teacher_spec(data: Data) -> str:
    return f"{TEACHER}@{data.weights}"


def _hidden(data: Data, module: int = 0) -> np.ndarray:
    """The teacher's output of module `module` on every transfer row, float32 (the reference)."""
    from safetensors.torch import load_file

    m = fm.tiny_teacher()
    m.load_state_dict(load_file(str(data.weights)))
    with torch.no_grad():
        return m[: module + 1](torch.from_numpy(data.x)).numpy()


# --- pure functions: golden values ---------------------------------------------------------------------------------


def test_feature_mse_golden_values() -> None:
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.zeros(2, 2)
    # per row mean over D: (1 + 4) / 2 = 2.5 and (9 + 16) / 2 = 12.5; mean over rows 7.5
    assert feature_mse_value(pred, target) == pytest.approx(7.5)
    assert feature_mse_value(pred, target, scale=2.5) == pytest.approx(3.0)
    per_token = torch.stack([pred, pred + 1])  # (B=2, L=2, D=2)
    mask = torch.tensor([[True, False], [False, True]])
    # counted: batch 0 position 0 (2.5) and batch 1 position 1 ((16 + 25) / 2 = 20.5): mean 11.5
    assert float(feature_losses.feature_mse(per_token, torch.zeros(2, 2, 2), mask=mask)) == pytest.approx(11.5)
    none = torch.zeros(2, 2, dtype=torch.bool)
    assert float(feature_losses.feature_mse(per_token, torch.zeros(2, 2, 2), mask=none)) == 0.0
    half = feature_losses.feature_mse(pred, target.half())
    assert half.dtype == torch.float32


def feature_mse_value(pred: torch.Tensor, target: torch.Tensor, **kw: Any) -> float:
    return float(feature_losses.feature_mse(pred, target, **kw))


def test_feature_mse_refuses_shape_mismatches() -> None:
    with pytest.raises(ShapeMismatchError, match=r"pred shape \(2, 3\) does not match target shape \(2, 2\)"):
        feature_losses.feature_mse(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ShapeMismatchError, match=r"mask shape \(3,\) does not match the positions \(2, 2\)"):
        feature_losses.feature_mse(torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale must be > 0"):
        feature_losses.feature_mse(torch.zeros(2, 2), torch.zeros(2, 2), scale=0.0)


def test_fit_projection_finds_the_directions_and_the_rank_for_a_variance_share() -> None:
    g = torch.Generator().manual_seed(0)
    # 3-D points with variances 9, 1, 0.01 along e3, e1, e2 and mean (1, 2, 3)
    z = torch.randn(4000, 3, generator=g) * torch.tensor([3.0, 1.0, 0.1])
    f = z[:, [1, 2, 0]] + torch.tensor([1.0, 2.0, 3.0])
    p = features.fit_projection(f, None, 0.95, "m")
    assert p.rank == 2  # 9 / 10.01 < 0.95 <= 10 / 10.01
    assert torch.allclose(p.components.abs(), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), atol=0.02)
    assert (p.components.gather(1, p.components.abs().argmax(1, keepdim=True)) > 0).all()  # the sign convention
    assert torch.allclose(p.mean, torch.tensor([1.0, 2.0, 3.0]), atol=0.1)
    assert float(p.explained.sum()) / p.total_variance == pytest.approx(10 / 10.01, abs=0.01)
    back = Projection_round_trip(p)
    assert torch.equal(back.components, p.components) and torch.equal(back.mean, p.mean)
    assert features.fit_projection(f, 1, None, "m").rank == 1
    with pytest.raises(ConfigError, match=r"feature_rank 4: m has 3 values per row and the fit sample 4000 rows; "
                                          r"use at most 3"):
        features.fit_projection(f, 4, None, "m")


def Projection_round_trip(p: features.Projection) -> features.Projection:  # noqa: N802
    return features.Projection.from_columns(p.columns())


def test_feature_spec_errors() -> None:
    with pytest.raises(ConfigError, match=r"feature_rank and feature_variance both choose the projection"):
        features.FeatureSpec(("a",), rank=2, variance=0.9)
    with pytest.raises(ConfigError, match=r"feature_variance 1.5: must be in \(0, 1\)"):
        features.FeatureSpec(("a",), variance=1.5)
    with pytest.raises(ConfigError, match=r"feature_pool 'sum': expected one of none, avg, max"):
        features.FeatureSpec(("a",), pool="sum")
    with pytest.raises(ConfigError, match=r"features a.b,a_b: two names map to one column"):
        features.FeatureSpec(("a.b", "a_b"))
    with pytest.raises(ConfigError, match=r"features 0,0: a module is repeated"):
        features.FeatureSpec(("0", "0"))


def test_reduce_output_pools_spatial_axes() -> None:
    out = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert features.reduce_output(out, "avg", "m", 2).shape == (2, 3)
    assert torch.equal(features.reduce_output(out, "max", "m", 2)[0], torch.tensor([3.0, 7.0, 11.0]))
    assert features.reduce_output(out, "none", "m", 2).shape == (2, 12)


def test_hint_spec_parsing() -> None:
    assert hints.HintSpec.parse("layers.1:layers.3") == hints.HintSpec("layers.1", "layers.3", 1.0)
    assert hints.HintSpec.parse("0:net.2:0.5") == hints.HintSpec("0", "net.2", 0.5)
    for bad in ("layers.1", "a:b:c", "a:b:0", ":b"):
        with pytest.raises(ConfigError, match=r"expected LAYER:STUDENT_MODULE\[:WEIGHT\]"):
            hints.HintSpec.parse(bad)


# --- labeling ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_whole_features_round_trip(data: Data, store: Path, fmt: str) -> None:
    res = run_label(_teacher_spec(data), data.parquet, store, top_k=3, format=fmt, features=("0", "2"),
                    feature_dtype="float32")
    v = Version(res.path)
    cols = v.read_all(["t0_feature_0", "t0_feature_2", "t0_logits"])
    assert np.allclose(cols["t0_feature_0"], _hidden(data, 0), atol=1e-5)
    # the last module's output is the logits (stored in float16)
    assert np.allclose(cols["t0_feature_2"], cols["t0_logits"], rtol=1e-3, atol=1e-3)
    layer = v.manifest["features"]["layers"][0]
    assert layer == {"module": "0", "column": "t0_feature_0", "output_shape": [16], "pool": "none",
                     "stored_shape": [16], "dtype": "float32", "projection": None}
    stats = v.manifest["statistics"]["features"]["t0_feature_0"]
    assert stats["rows"] == len(data.x) and stats["variance_kept"] is None
    assert stats["stored_variance"] == pytest.approx(float(_hidden(data, 0).var(0).mean()), rel=1e-4)
    assert v.attachments == [] and verify(res.path).ok


def test_projected_features_reconstruct_through_the_attachment(data: Data, store: Path) -> None:
    res = run_label(_teacher_spec(data), data.parquet, store, top_k=3, features=("0",), feature_variance=0.9,
                    feature_fit_rows=60)
    v = Version(res.path)
    layer = v.manifest["features"]["layers"][0]
    proj = layer["projection"]
    assert proj["kind"] == "pca" and proj["fit_rows"] == 60 and proj["attachment"] == "features/t0_feature_0.parquet"
    assert [a["path"] for a in v.attachments] == ["features/t0_feature_0.parquet"]
    p = features.Projection.from_columns(v.read_attachment("features/t0_feature_0.parquet"))
    coords = v.read_all(["t0_feature_0"])["t0_feature_0"]
    assert coords.dtype == np.float16
    assert coords.shape == (len(data.x), p.rank) == (len(data.x), layer["stored_shape"][0])
    f = _hidden(data, 0)
    back = p.mean.numpy() + coords.astype(np.float32) @ p.components.numpy()
    kept = 1 - ((f - back) ** 2).sum() / ((f - p.mean.numpy()) ** 2).sum()
    stated = v.manifest["statistics"]["features"]["t0_feature_0"]["variance_kept"]
    assert kept == pytest.approx(stated, abs=2e-3)  # measured over all rows (the fp16 rounding aside)
    assert proj["explained_variance_ratio_fit"] >= 0.9


def test_a_damaged_attachment_fails_verify(data: Data, store: Path) -> None:
    res = run_label(_teacher_spec(data), data.parquet, store, top_k=3, features=("0",), feature_rank=3)
    att = res.path / "features" / "t0_feature_0.parquet"
    raw = bytearray(att.read_bytes())
    raw[40] ^= 0xFF
    att.write_bytes(bytes(raw))
    report = verify(res.path)
    assert not report.ok and any(p.startswith("features/t0_feature_0.parquet: sha256") for p in report.problems)
    att.unlink()
    assert any(p == "features/t0_feature_0.parquet: missing" for p in verify(res.path).problems)


def test_features_read_with_duckdb_and_polars(data: Data, store: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    import polars as pl

    res = run_label(_teacher_spec(data), data.parquet, store, top_k=3, features=("0",), feature_rank=4)
    shards = str(res.path / "data" / "*.parquet")
    [(n, width)] = duckdb.sql(f"SELECT count(*), max(len(t0_feature_0)) FROM '{shards}'").fetchall()
    assert (n, width) == (len(data.x), 4)
    att = str(res.path / "features" / "t0_feature_0.parquet")
    rows = duckdb.sql(f"SELECT index, len(vector) FROM '{att}' ORDER BY index").fetchall()
    assert rows == [(i, 16) for i in range(-1, 4)]
    df = pl.read_parquet(shards)
    assert df["t0_feature_0"].to_numpy().shape == (len(data.x), 4)


def test_interrupted_feature_labeling_resumes_byte_identical(data: Data, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import kdstore.labeling as labeling

    kw = {"top_k": 3, "features": ("0",), "feature_variance": 0.9}
    clean = run_label(_teacher_spec(data), data.parquet, tmp_path / "clean", **kw).path
    real, calls = labeling.label_shard, []

    def flaky(*a: Any, **k: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    store = tmp_path / "store"
    with monkeypatch.context() as m:
        m.setattr(labeling, "label_shard", flaky)
        with pytest.raises(KeyboardInterrupt):
            run_label(_teacher_spec(data), data.parquet, store, **kw)
    assert versions_of(store / "ds") == []
    res = run_label(_teacher_spec(data), data.parquet, store, **kw)
    assert res.resumed_shards == 1
    assert data_bytes(res.path) == data_bytes(clean)
    assert (res.path / "features" / "t0_feature_0.parquet").read_bytes() == \
        (clean / "features" / "t0_feature_0.parquet").read_bytes()
    got, want = (json.loads((p / "manifest.json").read_text()) for p in (res.path, clean))
    assert got["attachments"] == want["attachments"] and got["statistics"]["features"] == want["statistics"]["features"]


def test_feature_errors_are_one_line_and_write_nothing(data: Data, store: Path) -> None:
    base = ["label", "--transfer", data.parquet, "--out", store, "--name", "ds", "--top-k", "3", "--quiet",
            "--device", "cpu"]
    assert_clean_error(cli([*base, "--teacher", _teacher_spec(data), "--features", "9"]),
                       r"^Error: --features 9: tests.fixtures_models:tiny_teacher@\S+ has no module of that name; "
                       r"it has 0, 1, 2 \(names as in named_modules\(\)\)$")
    assert_clean_error(cli([*base, "--teacher", data.teacher_pt, "--features", "0"]),
                       r"--features 0: cannot hook a module of .*teacher.pt .*features need a teacher given as "
                       r"MODEL@WEIGHTS")
    assert_clean_error(cli([*base, "--teacher", _teacher_spec(data), "--feature-rank", "2"]),
                       r"--feature-pool/--feature-rank/--feature-variance reduce the features named by --features; "
                       r"give --features NAME\[,NAME...\] too")
    assert_clean_error(cli([*base, "--teacher", _teacher_spec(data), "--features", "0", "--feature-rank", "40"]),
                       r"--feature-rank 40: 0 has 16 values per row .* use at most 16")
    assert not (store / "ds").exists() or versions_of(store / "ds") == []


# --- training with hints -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hinted_store(data: Data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("hints") / "store"
    return run_label(_teacher_spec(data), data.parquet, store, "feat", top_k=3, features=("0",),
                     feature_rank=4).path.parent


def _train(targets: Path, out: Path, *extra: Any, epochs: int = 2, student: str = "mlp:8-24-24-5") -> Any:
    return cli(["train", "--targets", targets, "--student", student, "--epochs", epochs, "--batch-size", 25,
                "--device", "cpu", "--quiet", "--out", out, *extra])


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_hint_training_saves_the_student_alone_and_learns_the_feature(hinted_store: Path, tmp_path: Path,
                                                                      mode: str) -> None:
    r = _train(hinted_store, tmp_path / "hint", "--hint", "0:layers.1:2", "--data", mode, "--seed", "0,1",
               epochs=6)
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "hint" / "runs" / "kd-T4-a0.9-s0" / "student.safetensors"))
    assert sorted(w) == [f"layers.{i}.{p}" for i in range(3) for p in ("bias", "weight")]  # no regressor
    config = json.loads((tmp_path / "hint" / "config.json").read_text())
    assert config["config"]["hints"] == ["0:layers.1:2"] and config["grouping"]["group_size"] == 1
    losses = [json.loads(x)["train_loss"] for x in (tmp_path / "hint" / "metrics.jsonl").read_text().splitlines()
              if '"kd-T4-a0.9-s0"' in x]
    assert losses[-1] < losses[0]


def test_the_hint_moves_the_student_feature_towards_the_teacher(hinted_store: Path, data: Data,
                                                                tmp_path: Path) -> None:
    """With the hint, a linear map of the student's 4-unit layer fits the teacher's projected feature better than
    without (measured by least squares on the trained students: the regressor's own fit aside)."""
    from safetensors.torch import load_file

    from kdstore.students import build_model

    v = Version(hinted_store)
    target = torch.from_numpy(v.read_all(["t0_feature_0"])["t0_feature_0"].astype(np.float32))
    residual = {}
    for name, extra in (("plain", []), ("hint", ["--hint", "0:layers.1:5"])):
        assert _train(hinted_store, tmp_path / name, *extra, "--lr", "0.01", epochs=30,
                      student="mlp:8-24-4-5").exit_code == 0
        m = build_model("mlp:8-24-4-5")
        m.load_state_dict(load_file(str(tmp_path / name / "runs" / "kd-T4-a0.9" / "student.safetensors")))
        with torch.no_grad():
            h = m.layers[1](torch.relu(m.layers[0](torch.from_numpy(data.x))))
        design = torch.cat([h, torch.ones(len(h), 1)], 1).double()
        sol = torch.linalg.lstsq(design, target.double()).solution
        residual[name] = float(((design @ sol - target.double()) ** 2).mean() / target.double().var(0).mean())
    assert residual["hint"] < 0.7 * residual["plain"], residual  # measured: 0.15 against 0.28


def test_hint_resume_is_bit_identical(hinted_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from kdstore.training import Trainer

    args = ["--hint", "0:layers.1", "--eval", str(Version(hinted_store).manifest["transfer_set"]["path"])]
    assert _train(hinted_store, tmp_path / "clean", *args, epochs=3).exit_code == 0
    real, calls = Trainer.loss, []

    def flaky(self: Trainer, *a: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 4 + 2:  # 4 steps per epoch: in epoch 2
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "loss", flaky)
        assert _train(hinted_store, tmp_path / "run", *args, epochs=3).exit_code != 0
    assert _train(hinted_store, tmp_path / "run", *args, "--resume", epochs=3).exit_code == 0
    a, b = (load_file(str(tmp_path / d / "runs" / "kd-T4-a0.9" / "student.safetensors")) for d in ("run", "clean"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hint_errors(hinted_store: Path, data: Data, store: Path, tmp_path: Path) -> None:
    plain = run_label(_teacher_spec(data), data.parquet, store, "plain", top_k=3).path.parent
    assert_clean_error(_train(plain, tmp_path / "a", "--hint", "0:layers.1"),
                       r"^Error: --hint: \S+plain@v1 stores no teacher features; relabel with "
                       r"`kdstore label --features NAME\[,NAME...\]`$")
    assert_clean_error(_train(hinted_store, tmp_path / "b", "--hint", "2:layers.1"),
                       r"--hint 2:layers.1: \S+feat@v1 stores features of 0, not '2'$")
    assert_clean_error(_train(hinted_store, tmp_path / "c", "--hint", "0:layers.7"),
                       r"--hint 0:layers.7: the student has no module 'layers.7'; it has layers, layers.0, layers.1, "
                       r"layers.2$")
    assert_clean_error(_train(hinted_store, tmp_path / "d", "--hint", "0"),
                       r"--hint '0': expected LAYER:STUDENT_MODULE\[:WEIGHT\]")
    assert_clean_error(_train(hinted_store, tmp_path / "e", "--hint", "0:layers.1", "--group-size", "2",
                              "-T", "1,2"),
                       r"--group-size 2: mlp:8-24-24-5 cannot train as a group: hints \(--hint\)")
    with pytest.raises(ShapeMismatchError, match=r"hint 0:flat: the student module's output \(2,\) is not a tensor"):
        hints.HintedStudent(_Flat(), [hints.HintSpec("0", "flat")],
                            [hints.StoredFeature("0", "t0_feature_0", 4, "none", 1.0)], torch.zeros(2, 8))
    with pytest.raises(TeacherError, match="has no module of that name"), \
            features.capture(torch.nn.Linear(2, 2), ["x"], "t"):
        pass


class _Flat(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flat = torch.nn.Identity()
        self.lin = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.flat(x.sum(1))
        return self.lin(x)


# --- convert and sharing -------------------------------------------------------------------------------------------


def test_convert_cuts_drops_or_keeps_features(data: Data, store: Path) -> None:
    from kdstore.convert import ConvertConfig, convert

    src = run_label(_teacher_spec(data), data.parquet, store, top_k=3, features=("0",), feature_rank=6).path
    v = Version(src)
    cut = Version(convert(ConvertConfig(str(src), feature_rank=2, name="cut")).path)
    old, new = (x.read_all(["t0_feature_0"])["t0_feature_0"] for x in (v, cut))
    assert np.array_equal(new, old[:, :2])  # the first directions' coordinates, bit for bit
    p_old = features.Projection.from_columns(v.read_attachment("features/t0_feature_0.parquet"))
    p_new = features.Projection.from_columns(cut.read_attachment("features/t0_feature_0.parquet"))
    assert torch.equal(p_new.components, p_old.components[:2]) and torch.equal(p_new.mean, p_old.mean)
    layer = cut.manifest["features"]["layers"][0]
    assert layer["stored_shape"] == [2] and layer["projection"]["rank"] == 2
    f = _hidden(data, 0)
    back = p_new.mean.numpy() + new.astype(np.float32) @ p_new.components.numpy()
    kept = 1 - ((f - back) ** 2).sum() / ((f - p_new.mean.numpy()) ** 2).sum()
    assert cut.manifest["statistics"]["features"]["t0_feature_0"]["variance_kept"] == pytest.approx(kept, abs=3e-3)
    h5 = Version(convert(ConvertConfig(str(src), to="hdf5", name="h5")).path)
    assert [a["path"] for a in h5.attachments] == ["features/t0_feature_0.h5"]
    assert np.array_equal(h5.read_all(["t0_feature_0"])["t0_feature_0"], old) and verify(h5.path).ok
    dropped = Version(convert(ConvertConfig(str(src), drop_features=True, name="dropped")).path)
    assert "features" not in dropped.manifest and dropped.attachments == []
    assert not any(c.startswith("t0_feature") for c in dropped.columns) and verify(dropped.path).ok
    with pytest.raises(ConfigError, match=r"feature_rank 7: 0 is stored on 6 principal directions; a projection can "
                                          r"only be cut, use 1..6"):
        convert(ConvertConfig(str(src), feature_rank=7, name="x"))


def test_push_and_pull_carry_the_attachment(data: Data, store: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from kdstore.store import open_version, publish
    from kdstore.store.remote import resolve_any

    monkeypatch.setenv("KDSTORE_CACHE", str(tmp_path / "cache"))
    src = run_label(_teacher_spec(data), data.parquet, store, top_k=3, features=("0",), feature_rank=3).path
    url = (tmp_path / "remote").as_uri()
    pushed = publish.push(src, url)
    assert (tmp_path / "remote" / "ds" / "v1" / "features" / "t0_feature_0.parquet").is_file()
    assert verify(pushed.url).ok
    pulled = open_version(resolve_any(pushed.url))
    assert pulled.read_attachment("features/t0_feature_0.parquet")["vector"].shape == (4, 16)
    assert pulled.verify(full=True) == []
    r = _train(pushed.url, tmp_path / "run", "--hint", "0:layers.1")
    assert r.exit_code == 0, r.output


def test_cli_end_to_end_label_inspect_train(data: Data, tmp_path: Path) -> None:
    store = tmp_path / "store"
    r = cli(["label", "--teacher", _teacher_spec(data), "--transfer", data.parquet, "--out", store, "--name", "feat",
             "--top-k", "3", "--features", "0", "--feature-variance", "0.9", "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("  feature 0:"))
    assert re_match(r"  feature 0: \[16\] -> \[\d+\] \(PCA rank \d+, keeps 9\d\.\d% of the variance\)", line)
    r = cli(["inspect", store / "feat"])
    assert r.exit_code == 0 and "teacher features (from t0; kdstore train --hint LAYER:MODULE)" in r.output
    assert re_match(r"  0 \(t0_feature_0\): \[16\] -> \[\d+\] float16, PCA rank \d+ \(fitted on 100 rows\), keeps",
                    r.output.split("teacher features")[1].splitlines()[1])
    r = _train(store / "feat", tmp_path / "run", "--hint", "0:layers.0:0.5", "--loss", "hard,kd")
    assert r.exit_code == 0, r.output
    assert [x["run"] for x in json.loads((tmp_path / "run" / "summary.json").read_text())["runs"]] == \
        ["hard", "kd-T4-a0.9"]


def re_match(pattern: str, text: str) -> bool:
    import re

    return re.match(pattern, text) is not None


def test_hint_epochs_train_only_below_the_hinted_module_first(hinted_store: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """FitNets' stage 1 (--hint-epochs): the hint alone moves the layers up to the hinted module and the regressor;
    the layers above it keep their initial weights until the logit loss joins."""
    from kdstore import training
    from kdstore.students import build_student

    real = training.with_hints

    def stop_in_epoch_2(model: Any, loss: Any, out: Any, batch: Any, epoch: int, hint_epochs: int) -> torch.Tensor:
        if epoch == 1:
            raise KeyboardInterrupt
        return real(model, loss, out, batch, epoch, hint_epochs)

    monkeypatch.setattr(training, "with_hints", stop_in_epoch_2)
    r = _train(hinted_store, tmp_path / "run", "--hint", "0:layers.0", "--hint-epochs", "1", epochs=2)
    assert r.exit_code != 0 and "interrupted" in r.output
    state = torch.load(tmp_path / "run" / "runs" / "kd-T4-a0.9" / "checkpoint.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    init = build_student("mlp:8-24-24-5", (8,), 5).state_dict()
    for name in ("layers.1.weight", "layers.2.weight", "layers.2.bias"):
        assert torch.equal(state[f"student.{name}"], init[name]), name
    assert not torch.equal(state["student.layers.0.weight"], init["layers.0.weight"])
    assert "regressors.0.weight" in state


def test_hint_epochs_errors(hinted_store: Path, tmp_path: Path) -> None:
    assert_clean_error(_train(hinted_store, tmp_path / "a", "--hint-epochs", "1"),
                       r"--hint-epochs 1: trains on the hints alone, and no --hint is given")
    assert_clean_error(_train(hinted_store, tmp_path / "b", "--hint", "0:layers.0", "--hint-epochs", "2", epochs=2),
                       r"--hint-epochs 2: must be in \[0, --epochs 2\)")


def test_features_with_views_are_each_views_own(data: Data, store: Path, tmp_path: Path) -> None:
    """With --views, a row's feature is the teacher's output on that view: view 0 (the identity) matches the
    unaugmented input's, the noisy views do not; training with a hint replays them."""
    res = run_label(_teacher_spec(data), data.parquet, store, top_k=3, features=("0",), feature_dtype="float32",
                    views=3, augment="noise:0.5")
    cols = Version(res.path).read_all(["view", "t0_feature_0"])
    f = _hidden(data, 0)
    ident = cols["t0_feature_0"][cols["view"] == 0]
    assert np.allclose(ident, f, atol=1e-5)
    noisy = cols["t0_feature_0"][cols["view"] == 1]
    assert np.abs(noisy - f).mean() > 0.05
    assert _train(res.path.parent, tmp_path / "run", "--hint", "0:layers.0").exit_code == 0


def test_feature_maps_get_fitnets_conv_regressors(tmp_path: Path) -> None:
    """A conv teacher's feature map stored whole keeps its (C, H, W) in the manifest; a student map at least as large
    is regressed by one convolution of kernel (Hs - Ht + 1, Ws - Wt + 1) (FitNets), anything else linearly."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from kdstore.students import build_model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 64)).astype(np.float32)
    transfer = tmp_path / "images.parquet"
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64),
                             "label": pa.array(rng.integers(0, 5, 100))}), transfer)
    torch.manual_seed(0)
    weights = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("cnn:8x8-5").state_dict().items()}, str(weights))
    res = run_label(f"cnn:8x8-5@{weights}", transfer, tmp_path / "store", "maps", top_k=3,
                    features=("features.0", "features.3"))
    layers = {layer["module"]: layer for layer in Version(res.path).manifest["features"]["layers"]}
    assert layers["features.0"]["output_shape"] == [32, 8, 8] and layers["features.0"]["stored_shape"] == [2048]
    assert layers["features.3"]["output_shape"] == [64, 4, 4]
    stored = hints.stored_features([hints.HintSpec("features.0", "features.0"),
                                    hints.HintSpec("features.3", "features.0"),
                                    hints.HintSpec("features.3", "head")], Version(res.path).manifest, "v")
    modules = ["features.0", "features.0", "head"]
    specs = [hints.HintSpec(f.layer, m) for f, m in zip(stored, modules, strict=True)]
    student = hints.HintedStudent(build_model("cnn:8x8-5"), specs, stored, torch.zeros(2, 64))
    same, smaller, flat = student.regressors
    assert isinstance(same, hints.ConvRegressor) and same.conv.kernel_size == (1, 1)
    assert isinstance(smaller, hints.ConvRegressor) and smaller.conv.kernel_size == (5, 5)
    assert isinstance(flat, torch.nn.Linear) and (flat.in_features, flat.out_features) == (5, 1024)
    student(torch.zeros(3, 64))
    assert [tuple(student.hinted[f.column].shape) for f in stored] == [(3, 2048), (3, 1024), (3, 1024)]
    r = _train(res.path.parent, tmp_path / "run", "--hint", "features.3:features.0", "--seed", "0", epochs=3,
               student="cnn:8x8-5")
    assert r.exit_code == 0, r.output
