"""The pieces of benchmarks/adult_munge.py on a tiny synthetic mixed table (no download, no real data).

CSV cleaning, the one-hot/standardising encoder, and munge -> encode -> label (ensemble) -> train, including the
generator record carried onto the encoded file so the manifest says kind 'synthetic'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.adult_data import (
    COLUMNS,
    LABEL,
    TabularEncoder,
    encoded_generator_record,
    parse_adult_csv,
    write_encoded,
)
from kdstore.labeling import LabelConfig, label
from kdstore.munge import MungeConfig, munge, read_generator_metadata, sha256_file, write_synthetic
from kdstore.training import TrainConfig, Trainer

CONT = ["age", "hours"]
CAT = ["job", "sex"]


def _mixed(n: int = 120, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, n)
    hours = rng.normal(40, 10, n)
    job = rng.choice(["clerk", "exec", "farm", "tech"], n)
    sex = rng.choice(["F", "M"], n)
    score = (age - 45) / 15 + (hours - 40) / 10 + (job == "exec") * 1.5 - (job == "farm") + rng.normal(0, 0.5, n)
    return pa.table({"age": pa.array(age, pa.int64()), "hours": pa.array(hours), "job": pa.array(job),
                     "sex": pa.array(sex), LABEL: pa.array((score > 0).astype(np.int64))})


def test_parse_adult_csv_cleans_and_labels() -> None:
    row = ("39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, "
           "2174, 0, 40, United-States, {}")
    text = "|1x3 Cross validator\n" + "\n".join([
        row.format("<=50K."),
        row.replace("State-gov", "?").format(">50K."),   # a missing value: dropped
        row.replace("39", "52", 1).format(">50K."),
    ]) + "\n\n"
    t = parse_adult_csv(text, skip_first_line=True)
    assert t.column_names == COLUMNS[:-1] + [LABEL]
    assert t.num_rows == 2
    assert t.column(LABEL).to_pylist() == [0, 1]
    assert t.column("age").to_pylist() == [39, 52] and t.schema.field("age").type == pa.int64()
    assert t.column("workclass").to_pylist() == ["State-gov", "State-gov"]  # stripped
    with pytest.raises(ValueError, match="income"):
        parse_adult_csv(row.format("maybe"))


def test_encoder_standardises_and_one_hots() -> None:
    t = _mixed()
    enc = TabularEncoder.fit(t, CONT, CAT)
    assert enc.dim == 2 + 4 + 2 and len(enc.feature_names) == enc.dim
    x = enc.transform(t)
    assert x.dtype == np.float32 and x.shape == (t.num_rows, enc.dim)
    np.testing.assert_allclose(x[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x[:, :2].std(0), 1, atol=1e-4)
    assert np.all(x[:, 2:].sum(1) == 2)  # one hot per categorical column
    jobs = t.column("job").to_pylist()
    assert all(x[i, 2 + enc.categories["job"].index(j)] == 1 for i, j in enumerate(jobs))
    new = pa.table({"age": pa.array([45], pa.int64()), "hours": [40.0], "job": ["pilot"], "sex": ["F"]})
    xn = enc.transform(new)
    assert xn[0, 2:6].sum() == 0 and xn[0, 6] == 1  # unseen category -> all zeros
    assert json.loads(json.dumps(enc.to_dict()))["dim"] == enc.dim


def test_munge_rounds_are_prefixes() -> None:
    """The benchmark takes the first m rounds of one M-round run as the m-round set: that must be exact."""
    t = _mixed(60)
    big = munge(t, MungeConfig(multiplier=3, label_column=LABEL, seed=5))
    small = munge(t, MungeConfig(multiplier=2, label_column=LABEL, seed=5))
    assert big.slice(0, small.num_rows).equals(small)


def test_munge_encode_label_train(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from benchmarks.adult_munge import train_teacher

    train, test = _mixed(120, seed=0), _mixed(80, seed=1)
    raw = tmp_path / "raw.parquet"
    pq.write_table(train, raw)
    cfg = MungeConfig(multiplier=2, p=0.5, s=1.0, seed=0, label_column=LABEL)
    synth = munge(train, cfg)
    assert synth.num_rows == 240 and LABEL not in synth.column_names
    synth_path = tmp_path / "synth_raw.parquet"
    write_synthetic(synth, synth_path, parent_path=raw, parent_sha256=sha256_file(raw), config=cfg)
    record = read_generator_metadata(synth_path)
    assert record is not None

    enc = TabularEncoder.fit(train, CONT, CAT)
    x_tr, y_tr = enc.transform(train), train.column(LABEL).to_numpy()
    write_encoded(tmp_path / "train.parquet", x_tr, y_tr)
    write_encoded(tmp_path / "test.parquet", enc.transform(test), test.column(LABEL).to_numpy())
    rec = encoded_generator_record(record, raw_path=synth_path, raw_sha256=sha256_file(synth_path),
                                   rows=360, original_rows=120, encoder="test")
    combined = write_encoded(tmp_path / "combined.parquet", np.concatenate([x_tr, enc.transform(synth)]), metadata=rec)
    assert pq.read_schema(combined).names == ["x"]
    assert pq.read_schema(combined).field("x").type == pa.list_(pa.float32(), enc.dim)
    with pytest.raises(ValueError, match="no generator record"):
        encoded_generator_record({}, raw_path=synth_path, raw_sha256="", rows=1)

    torch.manual_seed(0)
    specs = []
    for i, hidden in enumerate([(16,), (12,)]):
        model = train_teacher(x_tr, y_tr, hidden, seed=i, epochs=3, dropout=0.1, batch_size=32, lr=1e-2)
        path = tmp_path / f"t{i}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        specs.append(f"mlp:{enc.dim}-{'-'.join(map(str, hidden))}-2@{path}")

    store = tmp_path / "targets"
    orig = label(LabelConfig(teachers=tuple(specs), transfer=str(tmp_path / "train.parquet"), out=str(store),
                             name="orig", top_k=None, device="cpu", batch_size=64)).manifest
    assert orig["transfer_set"]["kind"] == "original" and orig["targets"]["labels"] is True
    assert set(orig["statistics"]["teachers"]) == {"t0", "t1"}
    assert orig["statistics"]["ensemble"]["accuracy"] is not None

    syn = label(LabelConfig(teachers=tuple(specs), transfer=str(combined), out=str(store), name="munge",
                            top_k=None, device="cpu", batch_size=64)).manifest
    ts = syn["transfer_set"]
    assert ts["kind"] == "synthetic" and ts["label_column"] is None and syn["targets"]["labels"] is False
    assert ts["generator"]["generator"] == "munge"
    assert ts["generator"]["settings"] == {"multiplier": 2, "p": 0.5, "s": 1.0, "seed": 0}
    assert ts["generator"]["parent"]["sha256"] == sha256_file(raw)
    assert ts["generator"]["composition"] == {"original_rows": 120, "synthetic_rows": 240}

    accs = {}
    for name, target, loss, alpha in [("a", "orig", "hard", 0.9), ("b", "orig", "kd", 0.5), ("c", "munge", "kd", 1.0)]:
        tc = TrainConfig(targets=str(store / target), student=f"mlp:{enc.dim}-4-2", out=str(tmp_path / f"run-{name}"),
                         losses=loss, temperatures=(2.0,), alphas=(alpha,), epochs=2, batch_size=32, lr=1e-2,
                         device="cpu", eval=str(tmp_path / "test.parquet"), ensemble="mean-prob")
        r = Trainer(tc).run()[0]
        assert r.eval_accuracy is not None and 0 <= r.eval_accuracy <= 1
        accs[name] = r.eval_accuracy
    assert len(accs) == 3
