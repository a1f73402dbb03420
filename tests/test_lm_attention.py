"""TinyBERT's attention loss (#19, language models): `kdstore label --features attn:model.layers.N` stores a tiny
seeded Llama's attention probabilities per sequence (per head, or averaged with ``attn_mean:``) equal to the
teacher's own (eager attention, ``output_attentions``) within float16, each real row summing to 1 over its causal
prefix; polars and DuckDB read them; an interrupted run resumes to the same bytes; `attention_mse` has golden
values; `kdstore train --hint attn:model.layers.N:blocks.M` lowers a `gpt:` student's attention loss (memory and
streamed, resume bit for bit), and bad names or shapes are one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore.errors import ConfigError, ShapeMismatchError, TeacherError
from kdstore.feature_losses import attention_mse
from kdstore.features import FeatureSpec
from kdstore.lm_features import TokenFeatures
from kdstore.lm_labeling import LMLabelConfig, label_lm
from kdstore.lm_students import GPT
from kdstore.lm_teachers import load_lm_teacher
from kdstore.lm_training import LMTrainConfig, LMTrainer
from kdstore.store import Version
from tests import lm_fixtures as lf
from tests.helpers import cli, data_bytes
from tests.test_lm_features import doc_block

NAMES = ("attn:model.layers.1", "attn_mean:model.layers.0")
COLS = ("t0_feature_attn_model_layers_1", "t0_feature_attn_mean_model_layers_0")
HINTS = ("attn:model.layers.1:blocks.1", "attn_mean:model.layers.0:blocks.0:2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lf.write_corpus(tmp_path_factory.mktemp("lma_corpus"))


def config(corpus: Path, out: Path, name: str = "a", **kw: Any) -> LMLabelConfig:
    """44 rows of 16 tokens in 9 shards of 5 rows, batches of 3; the tiny Llama has 2 layers of 4 heads."""
    return lf.feature_label_config(corpus, out, name, kw.pop("features", NAMES), **kw)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def maps(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lf.labeled(config(corpus, tmp_path_factory.mktemp("lma")))


def teacher_attentions(ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """The teacher's attention probabilities per layer (N, H, L, L), computed here by transformers itself."""
    module = load_lm_teacher(f"hf:{lf.hf_dir()}").module
    module.set_attn_implementation("eager")
    with torch.inference_mode():
        out = module(input_ids=torch.from_numpy(ids.astype(np.int64)), output_attentions=True)
    return tuple(a.float().numpy() for a in out.attentions)


def test_stored_maps_are_the_teachers_attention(maps: Path) -> None:
    v = Version(maps)
    m = v.manifest
    layers = m["features"]["layers"]
    assert [x["column"] for x in layers] == list(COLS)
    assert [x["stored_shape"] for x in layers] == [[4, 16, 16], [16, 16]]
    assert [(x["kind"], x["heads"], x["heads_stored"], x["bytes_per_row"]) for x in layers] == [
        ("attention", 4, "all", 4 * 16 * 16 * 2), ("attention", 4, "mean", 16 * 16 * 2)]
    got = v.read_all(["input_ids", "attention_mask", *COLS])
    want = teacher_attentions(got["input_ids"])
    per_head, mean = got[COLS[0]].astype(np.float32), got[COLS[1]].astype(np.float32)
    assert got[COLS[0]].dtype == np.float16 and per_head.shape == (44, 4, 16, 16)
    np.testing.assert_allclose(per_head, want[1], atol=1e-3)
    np.testing.assert_allclose(mean, want[0].mean(1), atol=1e-3)
    real = got["attention_mask"] == 1
    assert np.allclose(per_head.sum(-1).transpose(0, 2, 1)[real], 1.0, atol=5e-3)
    assert not np.triu(per_head, 1).any() and not np.triu(mean, 1).any()
    stats = m["statistics"]["features"]
    assert stats[COLS[0]]["rows"] == 4 * int(real.sum()) and stats[COLS[1]]["rows"] == int(real.sum())


def test_polars_and_duckdb_read_the_maps(maps: Path) -> None:
    import duckdb
    import polars as pl

    v = Version(maps)
    ns = doc_block("attention-polars", maps)
    assert ns["maps"].shape == (44, 4, 16, 16)
    assert np.allclose(ns["row_sums"].transpose(0, 2, 1)[ns["real"]], 1.0, atol=5e-3)
    files = [str(maps / f["path"]) for f in v.manifest["files"]]
    stored = v.read_all([COLS[1]])[COLS[1]]
    frame = pl.read_parquet(files, columns=["sample_id", COLS[1]]).sort("sample_id")
    assert np.array_equal(frame[COLS[1]].to_numpy(), stored)
    # row (query position) 3 of each sequence's head-averaged map: 4 keys carry its whole mass
    rows = duckdb.sql(f"""SELECT sample_id, list_sum({COLS[1]}[4]) AS mass, {COLS[1]}[4][5] AS future
                          FROM read_parquet({files}) ORDER BY sample_id""").fetchall()
    assert len(rows) == 44 and all(abs(r[1] - 1.0) < 5e-3 and r[2] == 0 for r in rows)


def test_resume_after_interruption_is_byte_identical(maps: Path, corpus: Path, tmp_path: Path) -> None:
    cfg = config(corpus, tmp_path)
    lf.interrupt_labeling(cfg)
    res = label_lm(cfg)
    assert res.resumed_shards >= 3 and res.path is not None
    assert data_bytes(res.path) == data_bytes(maps)
    assert res.manifest["statistics"] == Version(maps).manifest["statistics"]


def test_attention_features_leave_the_teacher_as_it_was(maps: Path, corpus: Path, tmp_path: Path) -> None:
    """Hidden states beside attention maps are the same as without them (the eager switch is undone)."""
    both = Version(label_lm(config(corpus, tmp_path / "b", features=("model.layers.0", NAMES[0]))).path)
    alone = Version(label_lm(config(corpus, tmp_path / "h", features=("model.layers.0",))).path)
    col = "t0_feature_model_layers_0"
    np.testing.assert_allclose(both.read_all([col])[col].astype(np.float32),
                               alone.read_all([col])[col].astype(np.float32), atol=2e-3)
    teacher = load_lm_teacher(f"hf:{lf.hf_dir()}")
    assert teacher.module.config._attn_implementation != "eager"


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"features": ("attn:model.layers.9",)}, TeacherError, r"features attn:model\.layers\.9: .* has no module "
                                                           r"'model\.layers\.9'; attention maps name a decoder layer"),
    ({"features": ("attn:model.norm",)}, TeacherError, r"attn:model\.norm: its attention module returned NoneType, "
                                                       r"not probabilities"),
    ({"feature_rank": 4}, ConfigError, r"project hidden states; attention maps \(attn:model\.layers\.1, "
                                       r"attn_mean:model\.layers\.0\) are stored whole"),
])
def test_label_errors(corpus: Path, tmp_path: Path, kw: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match) as e:
        label_lm(config(corpus, tmp_path, **kw))
    assert "\n" not in str(e.value) and not list(tmp_path.rglob("part-*"))


# ----------------------------------------------------------------------------------------------------- the loss
def test_attention_mse_golden_values() -> None:
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (L=2, L=2)
    half = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # row 0: 0; row 1: 0.25 + 0.25 = 0.5 summed over keys; mean over rows 0.25
    assert float(attention_mse(one_hot[None], half[None])) == pytest.approx(0.25)
    # heads (B=1, H=2): head 0 as above (0.25), head 1 equal (0): mean over heads 0.125
    pred, target = torch.stack([one_hot, half])[None], torch.stack([half, half])[None]
    assert float(attention_mse(pred, target)) == pytest.approx(0.125)
    # the mask counts query row 1 only: head 0 0.5, head 1 0 -> 0.25
    assert float(attention_mse(pred, target, mask=torch.tensor([[False, True]]))) == pytest.approx(0.25)
    assert float(attention_mse(pred, target, mask=torch.zeros(1, 2, dtype=torch.bool))) == 0.0
    # a per-head student against head-averaged stored maps: its heads are averaged first ((one_hot + half) / 2)
    avg = (one_hot + half) / 2
    assert float(attention_mse(pred, avg[None])) == pytest.approx(float(((avg - avg) ** 2).sum()))
    assert float(attention_mse(pred, half[None])) == pytest.approx(2 * 0.25**2 / 2)
    # float16 stored maps are compared in float32
    assert attention_mse(pred, target.half()).dtype == torch.float32


def test_attention_mse_refuses_mismatches() -> None:
    with pytest.raises(ShapeMismatchError, match=r"the student has 2 heads, the stored maps 3; compare "
                                                  r"head-averaged maps"):
        attention_mse(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ShapeMismatchError, match=r"pred shape \(1, 4, 4\) does not match target shape \(1, 5, 5\)"):
        attention_mse(torch.zeros(1, 4, 4), torch.zeros(1, 5, 5))
    with pytest.raises(ShapeMismatchError, match=r"mask shape \(1, 3\) does not match the query positions \(1, 4\)"):
        attention_mse(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ShapeMismatchError, match=r"must be \(B, H, L, L\) or \(B, L, L\)"):
        attention_mse(torch.zeros(4, 4), torch.zeros(4, 4))


def test_gpt_block_keeps_its_attention_only_when_asked() -> None:
    torch.manual_seed(0)
    model = GPT(50, 8, 2, 16, 2).eval()
    ids = torch.randint(0, 50, (3, 8))
    plain = model(ids)
    assert model.blocks[0].attention is None
    model.blocks[0].keep_attention = True
    kept = model(ids)
    a = model.blocks[0].attention
    assert a is not None and a.shape == (3, 2, 8, 8) and torch.allclose(a.sum(-1), torch.ones(3, 2, 8))
    assert not torch.triu(a, 1).any() and torch.allclose(plain, kept, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ training
def train_config(targets: Path, out: Path, **kw: Any) -> LMTrainConfig:
    """gpt:2-16-2 has 2 heads per block: against the 4 stored heads of layer 1 it is compared head-averaged."""
    return lf.hinted_train_config(targets, out, kw.pop("hints", HINTS), **kw)  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_attention_loss_decreases(maps: Path, tmp_path: Path, mode: str) -> None:
    LMTrainer(train_config(maps, tmp_path / "h", epochs=4, data_mode=mode, lr=3e-3)).run()
    lf.assert_hints_learned(tmp_path / "h", COLS)


def test_attention_hint_resume_is_bit_for_bit(maps: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = LMTrainer(train_config(maps, tmp_path / "whole", epochs=3)).run()[0]
    lf.interrupt_in_epoch_2(monkeypatch, lambda: LMTrainer(train_config(maps, tmp_path / "cut", epochs=3)).run())
    resumed = LMTrainer(train_config(maps, tmp_path / "cut", epochs=3)).run(resume=True)[0]
    assert resumed.val_nll == whole.val_nll
    lf.assert_same_student(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.parametrize(("hint", "match"), [
    ("attn:model.layers.1:ln", r"^hint attn:model\.layers\.1:ln: the student module 'ln' \(LayerNorm\) does not "
                               r"expose attention probabilities; name a block of a gpt: student \(blocks\.N\)$"),
    ("attn:model.layers.1:blocks.5", r"^hint attn:model\.layers\.1:blocks\.5: the student has no module 'blocks\.5'"),
    ("attn:model.layers.0:blocks.0", r"stores features of attn:model\.layers\.1, attn_mean:model\.layers\.0, not "
                                     r"'attn:model\.layers\.0'$"),
    ("attn:model.layers.1", r"^hint 'attn:model\.layers\.1': expected .*attn:LAYER:STUDENT_BLOCK\[:WEIGHT\] for "
                            r"attention maps$"),
])
def test_attention_hint_errors_are_one_line(maps: Path, tmp_path: Path, hint: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        LMTrainer(train_config(maps, tmp_path / "x", hints=(hint,)))
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_cli_label_attention_then_train(corpus: Path, tmp_path: Path) -> None:
    r = cli(["label", "--teacher", f"hf:{lf.hf_dir()}", "--transfer", corpus, "--out", tmp_path / "s", "--name",
             "a", "--seq-len", "16", "--top-k", "8", "--batch-size", "4", "--features", "attn_mean:model.layers.1",
             "--quiet"])
    assert r.exit_code == 0, r.output
    assert "feature attn_mean:model.layers.1: attention maps [16, 16] per sequence (4 heads, mean stored, " \
           "float16: 32 B/token before compression)" in r.output
    r = cli(["train", "--targets", tmp_path / "s" / "a", "--student", "gpt:2-16-2", "--hint",
             "attn_mean:model.layers.1:blocks.1:2", "--epochs", "1", "--out", tmp_path / "run", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "train_hint_loss" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_convert_keeps_or_drops_the_maps_and_inspect_lists_them(maps: Path, tmp_path: Path) -> None:
    r = cli(["convert", maps, "--out", tmp_path, "--name", "kept", "--quiet"])
    assert r.exit_code == 0, r.output
    kept = Version(tmp_path / "kept")
    a, b = Version(maps).read_all(list(COLS)), kept.read_all(list(COLS))
    assert all(np.array_equal(a[c], b[c]) for c in COLS)
    assert kept.manifest["features"]["layers"] == Version(maps).manifest["features"]["layers"]
    r = cli(["convert", maps, "--out", tmp_path, "--name", "dropped", "--drop-features", "--quiet"])
    assert r.exit_code == 0 and "features" not in Version(tmp_path / "dropped").manifest
    r = cli(["inspect", maps])
    assert "attn:model.layers.1 (t0_feature_attn_model_layers_1): [4, 16, 16] -> [4, 16, 16] float16" in r.output


def test_a_shard_of_maps_too_large_for_memory_is_refused() -> None:
    """(rows, 4, 128, 128) float16 is 128 KiB a row: 16,384 rows fit in the 2 GiB a shard may hold."""
    spec = FeatureSpec(NAMES[:1])
    feats = TokenFeatures(spec, "t", {NAMES[0]: [4, 128, 128]}, {NAMES[0]: None})
    feats.check_shard(16384)
    with pytest.raises(ConfigError, match=r"^features attn:model\.layers\.1: a shard of 16385 rows would hold 2\.0 "
                                          r"GiB of features in memory; use shard_rows 16384 or fewer"):
        feats.check_shard(16385)


def test_a_gguf_teacher_stores_its_attention_too(corpus: Path, tmp_path: Path) -> None:
    """SmolLM2's GGUF loads as a transformers Llama: the same capture works (the fixture writes a tiny GGUF)."""
    res = label_lm(LMLabelConfig(teacher=f"hf:{lf.gguf_file()}", transfer=str(corpus), out=str(tmp_path), name="g",
                                 seq_len=16, top_k=8, batch_size=4, features=("attn_mean:model.layers.1",)))
    assert res.path is not None
    v = Version(res.path)
    got = v.read_all(["attention_mask", "t0_feature_attn_mean_model_layers_1"])
    maps = got["t0_feature_attn_mean_model_layers_1"].astype(np.float32)
    assert maps.shape[1:] == (16, 16) and v.manifest["features"]["layers"][0]["heads"] == 4
    assert np.allclose(maps.sum(-1)[got["attention_mask"] == 1], 1.0, atol=5e-3)
