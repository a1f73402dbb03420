"""Per-token teacher features (#19, language models): `kdstore label --features` on a tiny seeded Llama stores each
named module's hidden states per token (whole, or PCA-projected with the projection as an attachment) equal to the
teacher's own within float16; docs/lm.md's polars and DuckDB snippets read them; an interrupted run resumes to
the same bytes; `kdstore train --hint` trains a `gpt:` student's modules towards them (memory and streamed,
regressors in checkpoints, resume bit for bit), and bad names are one-line errors naming both sides."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore import features
from kdstore.errors import ConfigError, TeacherError
from kdstore.features import Projection
from kdstore.lm_data import TokenTargetDataset, collate, stream_batches
from kdstore.lm_labeling import LMLabelConfig, label_lm
from kdstore.lm_teachers import load_lm_teacher
from kdstore.lm_training import LMTrainConfig, LMTrainer
from kdstore.store import Version
from tests import lm_fixtures as lf
from tests.helpers import REPO_ROOT, all_bytes, cli, data_bytes

LAYERS = ("model.layers.0", "model.norm")
COLS = ("t0_feature_model_layers_0", "t0_feature_model_norm")
HINTS = ("model.layers.0:blocks.0", "model.norm:blocks.1:0.5")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lf.write_corpus(tmp_path_factory.mktemp("lmf_corpus"))


def config(corpus: Path, out: Path, name: str = "h", **kw: Any) -> LMLabelConfig:
    """44 rows of 16 tokens in 9 shards of 5 rows, batches of 3; both layers of the tiny Llama (hidden 32)."""
    return lf.feature_label_config(corpus, out, name, kw.pop("features", LAYERS), **kw)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def whole(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lf.labeled(config(corpus, tmp_path_factory.mktemp("lmf_whole")))


@pytest.fixture(scope="module")
def projected(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lf.labeled(config(corpus, tmp_path_factory.mktemp("lmf_proj"), "p", feature_rank=8, feature_fit_rows=10))


def teacher_hidden(ids: np.ndarray) -> dict[str, np.ndarray]:
    """The teacher's outputs of LAYERS for token ids (N, L), float32, computed here with forward hooks."""
    teacher = load_lm_teacher(f"hf:{lf.hf_dir()}")
    with torch.inference_mode(), features.capture(teacher.module, LAYERS, teacher.source) as got:
        teacher.module(input_ids=torch.from_numpy(ids.astype(np.int64)))
        return {m: got[m].float().numpy() for m in LAYERS}


def test_whole_features_are_the_teachers_hidden_states(whole: Path) -> None:
    v = Version(whole)
    m = v.manifest
    assert [c["name"] for c in m["columns"] if c["role"] == "feature"] == list(COLS)
    assert m["features"]["per_token"] and [x["stored_shape"] for x in m["features"]["layers"]] == [[16, 32]] * 2
    assert all(x["projection"] is None for x in m["features"]["layers"]) and "attachments" not in m
    got = v.read_all(["input_ids", "attention_mask", *COLS])
    want = teacher_hidden(got["input_ids"])
    for module, col in zip(LAYERS, COLS, strict=True):
        stored = got[col]
        assert stored.shape == (44, 16, 32) and stored.dtype == np.float16
        np.testing.assert_allclose(stored.astype(np.float32), want[module], rtol=2e-3,
                                   atol=2e-3 * float(np.abs(want[module]).max()))
        real = want[module][got["attention_mask"] == 1]
        st = m["statistics"]["features"][col]
        assert st["rows"] == int(got["attention_mask"].sum()) and st["variance_kept"] is None
        assert st["stored_variance"] == pytest.approx(float(real.var(0).mean()), rel=1e-2)


def test_projected_features_reconstruct_through_the_attachment(projected: Path) -> None:
    v = Version(projected)
    assert v.verify(full=True) == []
    got = v.read_all(["input_ids", "attention_mask", *COLS])
    want = teacher_hidden(got["input_ids"])
    real = got["attention_mask"] == 1
    for module, col, layer in zip(LAYERS, COLS, v.manifest["features"]["layers"], strict=True):
        proj = layer["projection"]
        assert layer["stored_shape"] == [16, 8] and proj["rank"] == 8 and proj["fit_rows"] == 10
        assert proj["fit_tokens"] == int(real[:10].sum())
        p = Projection.from_columns(v.read_attachment(proj["attachment"]))
        assert p.components.shape == (8, 32)
        torch.testing.assert_close(p.components @ p.components.T, torch.eye(8), atol=1e-5, rtol=0)
        h = torch.from_numpy(want[module])
        coords = p.project(h.reshape(-1, 32))[0].reshape(44, 16, 8).numpy()
        scale = float(np.abs(coords).max())
        np.testing.assert_allclose(got[col].astype(np.float32), coords, rtol=2e-3, atol=2e-3 * scale)
        # the recorded share of the variance kept, over every real token
        centred = want[module][real] - p.mean.numpy()
        kept = float((coords[real] ** 2).sum() / (centred**2).sum())
        assert v.manifest["statistics"]["features"][col]["variance_kept"] == pytest.approx(kept, abs=1e-4)


def test_full_rank_projection_reconstructs_the_hidden_states(corpus: Path, tmp_path: Path) -> None:
    v = Version(label_lm(config(corpus, tmp_path, features=("model.norm",), feature_rank=32,
                                feature_fit_rows=20)).path)  # type: ignore[arg-type]
    stats = v.manifest["statistics"]["features"]["t0_feature_model_norm"]
    assert stats["variance_kept"] == pytest.approx(1.0, abs=1e-5)
    ns = doc_block("features-reconstruct", v.path)
    want = teacher_hidden(v.read_all(["input_ids"])["input_ids"])["model.norm"]
    np.testing.assert_allclose(ns["hidden"], want, atol=5e-3 * float(np.abs(want).max()))


def doc_block(name: str, version: Path) -> dict[str, Any]:
    """Run docs/lm.md's `# doc-test: NAME` block against `version`."""
    text = (REPO_ROOT / "docs" / "lm.md").read_text("utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                 if b.startswith(f"# doc-test: {name}\n"))
    code, n = re.subn(r'^version = ".*"$', f"version = {str(version)!r}", block, flags=re.M)
    assert n == 1
    ns: dict[str, Any] = {}
    exec(compile(code, f"docs/lm.md:{name}", "exec"), ns)
    return ns


def test_duckdb_reads_one_row_per_token(whole: Path) -> None:
    ns = doc_block("features-duckdb", whole)
    v = Version(whole)
    got = v.read_all(["attention_mask", COLS[0]])
    df = ns["hidden"].df().sort_values(["seq", "pos"])
    assert len(df) == 44 * 16
    assert np.array_equal(np.stack(df["h"].to_numpy()), got[COLS[0]].reshape(44 * 16, 32).astype(np.float32))
    real = got[COLS[0]].astype(np.float64)[got["attention_mask"] == 1]
    assert ns["norms"].fetchall()[0][0] == pytest.approx(float((real**2).sum(1).mean()), rel=1e-6)


def test_resume_after_interruption_is_byte_identical(projected: Path, corpus: Path, tmp_path: Path) -> None:
    cfg = config(corpus, tmp_path, "p", feature_rank=8, feature_fit_rows=10)
    lf.interrupt_labeling(cfg)
    assert not (tmp_path / "p" / "v1").exists() and list((tmp_path / "p").glob(".staging-*/features/*.parquet"))
    res = label_lm(cfg)
    assert res.resumed_shards >= 3 and res.path is not None
    assert data_bytes(res.path) == data_bytes(projected)
    assert all_bytes(res.path / "features") == all_bytes(projected / "features")
    assert res.manifest["statistics"] == Version(projected).manifest["statistics"]
    assert res.manifest["attachments"] == Version(projected).manifest["attachments"]


def test_two_shard_jobs_equal_one_run(projected: Path, corpus: Path, tmp_path: Path) -> None:
    first = label_lm(config(corpus, tmp_path, "p", feature_rank=8, feature_fit_rows=10, shard_index=0,
                            num_shards=2))
    assert first.path is None
    second = label_lm(config(corpus, tmp_path, "p", feature_rank=8, feature_fit_rows=10, shard_index=1,
                             num_shards=2))
    assert second.path is not None and data_bytes(second.path) == data_bytes(projected)
    assert all_bytes(second.path / "features") == all_bytes(projected / "features")


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"features": ("model.layers.9",)}, TeacherError, r"features model\.layers\.9: .* has no module of that name; "
                                                      r"it has model, model\.embed_tokens"),
    ({"features": ("model.rotary_emb",)}, TeacherError, r"model\.rotary_emb: its output .* is not per token"),
    ({"features": (), "feature_rank": 4}, ConfigError, r"give features NAME"),
    ({"feature_rank": 33}, ConfigError, r"feature_rank 33: model\.layers\.0 has 32 values per row .* at most 32"),
    ({"feature_variance": 1.5}, ConfigError, r"feature_variance 1\.5: must be in \(0, 1\)"),
])
def test_label_errors(corpus: Path, tmp_path: Path, kw: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        label_lm(config(corpus, tmp_path, **kw))
    assert not list(tmp_path.rglob("part-*"))


def test_feature_pool_is_refused_for_language_models(corpus: Path, tmp_path: Path) -> None:
    r = cli(["label", "--teacher", f"hf:{lf.hf_dir()}", "--transfer", corpus, "--out", tmp_path, "--name", "x",
             "--seq-len", "16", "--features", "model.norm", "--feature-pool", "avg", "--quiet"])
    assert r.exit_code == 2 and "--feature-pool (a language model's features are stored per token)" in r.output


# ------------------------------------------------------------------------------------------------------- training
def train_config(targets: Path, out: Path, **kw: Any) -> LMTrainConfig:
    return lf.hinted_train_config(targets, out, kw.pop("hints", HINTS), **kw)  # type: ignore[no-any-return]


def test_batches_carry_the_stored_features(projected: Path) -> None:
    v = Version(projected)
    ds = TokenTargetDataset(v, "topk", features=[COLS[1]])
    b = collate([ds[0], ds[1]])
    assert b[f"feature:{COLS[1]}"].shape == (2, 16, 8)
    assert np.array_equal(b[f"feature:{COLS[1]}"].numpy(), v.read_all([COLS[1]])[COLS[1]][:2])
    streamed = next(stream_batches(v, "topk", 4, seed=0, epoch=0, features=[COLS[0]]))
    assert streamed[f"feature:{COLS[0]}"].shape == (4, 16, 8)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_hint_training_learns_the_features(projected: Path, tmp_path: Path, mode: str) -> None:
    hinted = LMTrainer(train_config(projected, tmp_path / "h", epochs=4, data_mode=mode))
    hinted.run()
    lf.assert_hints_learned(tmp_path / "h", COLS)


def test_hint_resume_is_bit_for_bit(projected: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = LMTrainer(train_config(projected, tmp_path / "whole", epochs=3)).run()[0]
    lf.interrupt_in_epoch_2(monkeypatch, lambda: LMTrainer(train_config(projected, tmp_path / "cut", epochs=3)).run())
    ckpt = torch.load(tmp_path / "cut" / "runs" / "topk-T1-a1" / "checkpoint.pt", weights_only=True)
    assert ckpt["model"]["regressors.0.weight"].shape == (8, 16) and "regressors.1.bias" in ckpt["model"]
    resumed = LMTrainer(train_config(projected, tmp_path / "cut", epochs=3)).run(resume=True)[0]
    assert resumed.val_nll == whole.val_nll
    lf.assert_same_student(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.parametrize(("hint", "match"), [
    ("model.layers.0:blocks.7", r"^hint model\.layers\.0:blocks\.7: the student has no module 'blocks\.7'; it has "
                                r"tok, pos, blocks, blocks\.0"),
    ("model.layers.1:blocks.0", r"^hint model\.layers\.1:blocks\.0: .*@v1 stores features of model\.layers\.0, "
                                r"model\.norm, not 'model\.layers\.1'$"),
    ("model.norm", r"expected LAYER:STUDENT_MODULE\[:WEIGHT\]"),
    ("model.norm:ln:-1", r"WEIGHT > 0"),
])
def test_hint_errors_are_one_line(projected: Path, tmp_path: Path, hint: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        LMTrainer(train_config(projected, tmp_path / "x", hints=(hint,)))
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_hint_needs_a_version_with_features(corpus: Path, tmp_path: Path) -> None:
    plain = label_lm(config(corpus, tmp_path, "plain", features=())).path
    with pytest.raises(ConfigError, match=r"stores no teacher features; relabel with `kdstore label --features"):
        LMTrainer(train_config(plain, tmp_path / "x"))  # type: ignore[arg-type]


def test_cli_label_features_then_train_hint(corpus: Path, tmp_path: Path) -> None:
    r = cli(["label", "--teacher", f"hf:{lf.hf_dir()}", "--transfer", corpus, "--out", tmp_path / "s", "--name",
             "h", "--seq-len", "16", "--top-k", "8", "--batch-size", "4", "--features", "model.layers.1",
             "--feature-variance", "0.9", "--feature-fit-rows", "12", "--quiet"])
    assert r.exit_code == 0, r.output
    assert re.search(r"feature model\.layers\.1: 32 -> \d+ per token \(PCA rank \d+, keeps \d+\.\d% of the "
                     r"variance", r.output), r.output
    m = Version(tmp_path / "s" / "h").manifest
    assert m["features"]["settings"]["fit_rows"] == 12 and m["features"]["settings"]["variance"] == 0.9
    r = cli(["train", "--targets", tmp_path / "s" / "h", "--student", "gpt:2-16-2", "--hint",
             "model.layers.1:blocks.1:2", "--epochs", "2", "--val-fraction", "0.25", "--out", tmp_path / "run",
             "--quiet"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["config"]["hints"] == ["model.layers.1:blocks.1:2"]
    assert "train_hint_loss" in (tmp_path / "run" / "metrics.jsonl").read_text()
    r = cli(["train", "--targets", tmp_path / "s" / "h", "--student", "gpt:2-16-2", "--hint", "model.norm:ln",
             "--out", tmp_path / "bad", "--quiet"])
    assert r.exit_code != 0 and "stores features of model.layers.1, not 'model.norm'" in r.output


def test_convert_keeps_cuts_or_drops_per_token_features(projected: Path, tmp_path: Path) -> None:
    src = Version(projected)
    layer = src.manifest["features"]["layers"][0]
    col, rank = layer["column"], layer["projection"]["rank"]
    r = cli(["convert", projected, "--top-k", "4", "--out", tmp_path, "--name", "kept", "--quiet"])
    assert r.exit_code == 0, r.output
    kept = Version(tmp_path / "kept")
    assert np.array_equal(kept.read_all([col])[col], src.read_all([col])[col])
    assert kept.manifest["statistics"]["features"][col]["variance_kept"] == \
        src.manifest["statistics"]["features"][col]["variance_kept"]
    assert cli(["verify", tmp_path / "kept"]).exit_code == 0
    r = cli(["convert", projected, "--feature-rank", "3", "--out", tmp_path, "--name", "cut", "--quiet"])
    assert r.exit_code == 0, r.output
    cut = Version(tmp_path / "cut")
    assert np.array_equal(cut.read_all([col])[col], src.read_all([col])[col][..., :3])
    new = cut.manifest["features"]["layers"][0]
    assert new["stored_shape"] == [layer["stored_shape"][0], 3] and new["projection"]["rank"] == 3 < rank
    assert 0 < cut.manifest["statistics"]["features"][col]["variance_kept"] < \
        src.manifest["statistics"]["features"][col]["variance_kept"]
    p = Projection.from_columns(cut.read_attachment(new["projection"]["attachment"]))
    assert p.rank == 3 and cli(["verify", tmp_path / "cut"]).exit_code == 0
    r = cli(["convert", projected, "--drop-features", "--out", tmp_path, "--name", "c", "--quiet"])
    assert r.exit_code == 0, r.output
    m = Version(tmp_path / "c").manifest
    assert "features" not in m and "attachments" not in m and "features" not in m["statistics"]
    assert not any(c["role"] == "feature" for c in m["columns"])
    assert cli(["verify", tmp_path / "c"]).exit_code == 0


def test_inspect_describes_per_token_features(projected: Path) -> None:
    r = cli(["inspect", projected])
    assert r.exit_code == 0, r.output
    block = r.output.split("teacher features per token (kdstore train --hint LAYER:MODULE)\n")[1].splitlines()
    m = json.loads((projected / "manifest.json").read_text())
    layer = m["features"]["layers"][0]
    assert block[0].startswith(f"  {layer['module']} ({layer['column']}): {layer['output_shape']} -> "
                               f"{layer['stored_shape']} float16, PCA rank {layer['projection']['rank']} (fitted on "
                               f"{layer['projection']['fit_tokens']} tokens of ")
    assert "of the variance over all tokens" in block[0]
