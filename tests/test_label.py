"""kdstore.labeling / kdstore.teachers / kdstore.device through the library: settings, teachers, failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore import labeling
from kdstore.device import resolve_device, resolve_precision
from kdstore.errors import ConfigError, InputError, ShapeMismatchError, TeacherError
from kdstore.store import Version
from kdstore.students import MLP
from kdstore.teachers import load_teacher, state_dict_sha256
from tests import fixtures_models as fm
from tests.conftest import Data, teacher_logits, write_parquet_array
from tests.helpers import FIX, label_config, run_label, versions_of

# --- settings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"teacher": []}, "teachers is required"),
     ({"format": "zip"}, "format 'zip': expected one of parquet, hdf5"),
     ({"top_k": 0}, r"top_k 0: must be >= 1 \(or 0 to store no top-k\)"),
     ({"top_k": None, "keep_logits": False}, r"nothing to store: no full logits \(keep_logits False\) and no top-k "
                                             r"\(top_k 0\)"),
     ({"logits_dtype": "float64"}, "logits_dtype 'float64': expected one of float16, bfloat16, float32"),
     ({"batch_size": 0}, "batch_size 0: must be >= 1"),
     ({"shard_rows": 0}, "shard_rows 0 / row_group_rows 16: must be >= 1"),
     ({"row_group_rows": -1}, "row_group_rows -1: must be >= 1"),
     ({"tail": "cubic"}, "tail 'cubic': expected one of uniform, drop"),
     ({"name": "../x"}, "name '../x' is not a valid dataset name")],
)
def test_label_config_rejects(data: Data, store: Path, kw: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"teacher": str(data.teacher_pt), "transfer": data.parquet, "out": store}
    args.update(kw)
    with pytest.raises(ConfigError, match=match):
        label_config(**args)


def test_label_config_lists_every_problem(data: Data, store: Path) -> None:
    with pytest.raises(ConfigError, match=r"format 'x': .*; batch_size 0: must be >= 1; tail 'y'"):
        label_config(data.teacher_pt, data.parquet, store, format="x", batch_size=0, tail="y")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
def test_device_and_precision_without_cuda() -> None:
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError,
                       match="device cuda: CUDA is not available on this machine; use device auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device cuda:1: CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"device 'tpu' is not understood; expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError, match=r"precision 'fp8': expected one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", cpu)


def test_bf16_autocast_on_cpu(data: Data, store: Path) -> None:
    res = run_label(data.teacher_pt, data.parquet, store, precision="bf16", logits_dtype="float32")
    assert res.manifest["labeling"]["precision"] == "bf16"
    logits = Version(res.path).read_all(["t0_logits"])["t0_logits"]
    np.testing.assert_allclose(logits, teacher_logits(data.x).numpy(), atol=0.1, rtol=0.05)


# --- teachers ------------------------------------------------------------------------------------------------------


def test_every_transfer_format_gives_the_same_targets(data: Data, store: Path) -> None:
    cols = ["sample_id", "t0_logits", "t0_topk_indices", "t0_topk_values", "t0_logsumexp"]
    ref = Version(run_label(data.teacher_pt, data.parquet, store, "pq", logits_dtype="float32").path).read_all(cols)
    for fmt in ("npz", "npy", "h5"):
        got = Version(run_label(data.teacher_pt, getattr(data, fmt), store, fmt, logits_dtype="float32").path)
        assert got.has_labels == (fmt != "npy")
        for c, a in got.read_all(cols).items():
            np.testing.assert_allclose(a, ref[c], atol=1e-6, err_msg=f"{fmt}: {c}")
    res = run_label(data.teacher_pt, data.parquet_numeric, store, "num", logits_dtype="float32",
                    input_columns=tuple(f"f{i}" for i in range(8)))
    assert res.manifest["transfer_set"]["inputs"]["columns"] == [f"f{i}" for i in range(8)]
    np.testing.assert_allclose(Version(res.path).read_all(["t0_logits"])["t0_logits"], ref["t0_logits"], atol=1e-6)


def test_factory_teacher_with_and_without_weights(data: Data, store: Path) -> None:
    t = load_teacher(data.factory_spec)
    assert (t.kind, t.weights, t.source) == ("factory", str(data.weights), data.factory_spec)
    assert not t.module.training
    bare = load_teacher(f"{FIX}:tiny_teacher")
    assert bare.kind == "factory" and bare.weights is None
    assert bare.sha256 == state_dict_sha256(fm.tiny_teacher()) == load_teacher(f"{FIX}:tiny_teacher").sha256
    assert bare.sha256 != state_dict_sha256(fm.mlp(seed=1))
    res = run_label(f"{FIX}:tiny_teacher", data.parquet, store, logits_dtype="float32")
    np.testing.assert_allclose(Version(res.path).read_all(["t0_logits"])["t0_logits"], teacher_logits(data.x).numpy(),
                               atol=1e-6)


def test_builtin_teacher_with_weights(data: Data, tmp_path: Path, store: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model = MLP([8, 16, 5]).eval()
    w = tmp_path / "mlp.safetensors"
    save_file(model.state_dict(), str(w))
    t = load_teacher(f"mlp:8-16-5@{w}")
    assert t.kind == "builtin"
    res = run_label(f"mlp:8-16-5@{w}", data.parquet, store, logits_dtype="float32")
    with torch.no_grad():
        ref = model(torch.from_numpy(data.x)).numpy()
    np.testing.assert_allclose(Version(res.path).read_all(["t0_logits"])["t0_logits"], ref, atol=1e-6)
    with pytest.raises(TeacherError, match=r"'mlp:8-16-5': a built-in spec needs trained weights: mlp:8-16-5@weights"):
        load_teacher("mlp:8-16-5")


def test_state_dict_pt_weights(data: Data, tmp_path: Path) -> None:
    sd = fm.mlp(seed=1).state_dict()
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    a = load_teacher(f"{FIX}:tiny_teacher@{tmp_path / 'w.pt'}")
    b = load_teacher(f"{FIX}:tiny_teacher@{tmp_path / 'ckpt.pt'}")
    for t in (a, b):
        for k, v in t.module.state_dict().items():
            assert torch.equal(v, sd[k])
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(TeacherError, match=r"list.pt does not hold a state_dict \(name -> tensor\)"):
        load_teacher(f"{FIX}:tiny_teacher@{tmp_path / 'list.pt'}")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(TeacherError,
                       match=r"cannot read weights .*bad.safetensors \(.*\); expected .safetensors or a state_dict"):
        load_teacher(f"{FIX}:tiny_teacher@{tmp_path / 'bad.safetensors'}")
    with pytest.raises(TeacherError, match=r"teacher: weights file .*missing.safetensors not found"):
        load_teacher(f"{FIX}:tiny_teacher@{tmp_path / 'missing.safetensors'}")


@pytest.mark.parametrize(
    ("spec", "match"),
    [("no_such_pkg_kdstore.models:teacher", r"teacher: cannot import module 'no_such_pkg_kdstore.models' .*"
                                            r"ModuleNotFoundError.*check the name and that it is on PYTHONPATH"),
     (f"{FIX}:missing_factory", rf"'{FIX}:missing_factory': module '{FIX}' has no callable 'missing_factory'"),
     (f"{FIX}:not_a_module", r"not_a_module\(\) returned str, expected a torch.nn.Module"),
     (f"{FIX}:NUM_CLASSES", "has no callable 'NUM_CLASSES'"),
     ("nonexistent/teacher.pt",
      r"'nonexistent/teacher.pt': no such file, and not a model spec; expected a TorchScript"),
     ("mlp:8-x-5@w.safetensors", "no such file, and not a model spec")],
)
def test_teacher_spec_errors(spec: str, match: str) -> None:
    with pytest.raises(TeacherError, match=match):
        load_teacher(spec)


def test_not_torchscript(tmp_path: Path) -> None:
    (tmp_path / "teacher.pt").write_text("not a model\n")
    with pytest.raises(TeacherError,
                       match=r"teacher.pt: cannot load it as TorchScript \(RuntimeError: .*\); save it with"):
        load_teacher(str(tmp_path / "teacher.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(TeacherError, match="cannot load it as TorchScript"):
        load_teacher(str(tmp_path / "empty.pt"))


def test_weights_that_do_not_fit(data: Data, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(fm.mlp(3).state_dict(), str(tmp_path / "w3.safetensors"))
    with pytest.raises(TeacherError, match=r"weights .*w3.safetensors do not fit tests.fixtures_models:tiny_teacher: "
                                           r"Error\(s\) in loading state_dict .*size mismatch"):
        load_teacher(f"{FIX}:tiny_teacher@{tmp_path / 'w3.safetensors'}")
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TeacherError, match=r"do not fit .*(Missing|Unexpected) key"):
        load_teacher(f"{FIX}:tiny_teacher@{tmp_path / 'other.safetensors'}")


# --- failures while labeling ------------------------------------------------------------------------------------------


def assert_nothing_committed(store: Path, name: str = "ds") -> None:
    assert versions_of(store / name) == []


def test_nan_logits_name_the_row(data: Data, tmp_path: Path, store: Path) -> None:
    x = data.x.copy()
    x[57, 0] = fm.NAN_SENTINEL
    transfer = write_parquet_array(tmp_path / "nan.parquet", x, data.y)
    with pytest.raises(TeacherError,
                       match=rf"teacher {FIX}:nan_teacher: NaN or Inf logits for row 57 of .*nan.parquet; "
                             "nothing was committed"):
        run_label(f"{FIX}:nan_teacher", transfer, store)
    assert_nothing_committed(store)


def test_nan_in_the_first_rows_is_caught_by_the_probe_or_the_check(data: Data, tmp_path: Path, store: Path) -> None:
    x = data.x.copy()
    x[1, 0] = fm.NAN_SENTINEL
    transfer = write_parquet_array(tmp_path / "nan.parquet", x, data.y)
    with pytest.raises(TeacherError, match="NaN or Inf logits for row 1 "):
        run_label(f"{FIX}:nan_teacher", transfer, store)
    assert_nothing_committed(store)


def test_teacher_output_not_2d(data: Data, store: Path) -> None:
    with pytest.raises(TeacherError, match=rf"teacher {FIX}:three_d_teacher: output \(2, 5, 1\) for a batch of 2; "
                                           r"expected logits of shape \(batch, classes\)"):
        run_label(f"{FIX}:three_d_teacher", data.parquet, store)
    assert_nothing_committed(store)


def test_wrong_input_width(data: Data, tmp_path: Path, store: Path) -> None:
    narrow = write_parquet_array(tmp_path / "narrow.parquet", data.x[:, :6], data.y)
    with pytest.raises(TeacherError, match=r"forward pass failed on inputs of shape \(2, 6\) .*check input_columns"):
        run_label(data.teacher_pt, narrow, store)
    with pytest.raises(TeacherError,
                       match=r"asserting_teacher: forward pass failed on inputs of shape \(2, 6\) \(AssertionError"):
        run_label(f"{FIX}:asserting_teacher", narrow, store)
    with pytest.raises(TeacherError, match=r"forward pass failed on inputs of shape \(2, 9\)"):
        run_label(data.teacher_pt, data.parquet_numeric, store)  # f0..f7 + weight
    assert_nothing_committed(store)


def test_top_k_larger_than_classes(data: Data, store: Path) -> None:
    with pytest.raises(ConfigError, match=r"top_k 6: the teachers have 5 classes; use 1..5"):
        run_label(data.teacher_pt, data.parquet, store, top_k=6)
    assert not (store / "ds").exists()


def test_labels_out_of_range(data: Data, tmp_path: Path, store: Path) -> None:
    y = data.y.copy()
    y[63] = 7
    transfer = write_parquet_array(tmp_path / "bad_labels.parquet", data.x, y)
    with pytest.raises(InputError, match=r"row 63 has label 7, outside the teachers' class range 0..4; fix the labels "
                                         "or pass label_column none"):
        run_label(data.teacher_pt, transfer, store)
    assert_nothing_committed(store)
    y[63] = -1
    transfer = write_parquet_array(tmp_path / "neg_labels.parquet", data.x, y)
    with pytest.raises(InputError, match="row 63 has label -1"):
        run_label(data.teacher_pt, transfer, store, "neg")
    res = run_label(data.teacher_pt, transfer, store, "neg", label_column="none")
    assert not Version(res.path).has_labels


def test_ensemble_class_mismatch(data: Data, store: Path) -> None:
    with pytest.raises(ShapeMismatchError,
                       match=rf"the teachers disagree on the number of classes: .*teacher.pt has 5, "
                             rf"{FIX}:three_class_teacher has 3; an ensemble needs one class set"):
        run_label([str(data.teacher_pt), f"{FIX}:three_class_teacher"], data.parquet, store)
    assert not (store / "ds").exists()


def test_single_class_teacher(data: Data, store: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(MLP([8, 1]).state_dict(), str(tmp_path / "one.safetensors"))
    with pytest.raises(TeacherError, match="outputs 1 class; at least 2 are needed"):
        run_label(f"mlp:8-1@{tmp_path / 'one.safetensors'}", data.parquet, store)


def test_progress_counts_every_row_including_resumed(data: Data, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    labeling.label(label_config(data.teacher_pt, data.parquet, store), progress=seen.append)
    assert sum(seen) == 100 and seen[0] == 0

    real = labeling.label_shard
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(labeling, "label_shard", flaky)
        with pytest.raises(KeyboardInterrupt):
            labeling.label(label_config(data.teacher_pt, data.parquet, store, "again"))
    seen.clear()
    res = labeling.label(label_config(data.teacher_pt, data.parquet, store, "again"), progress=seen.append)
    assert res.resumed_shards == 1 and seen[0] == 40 and sum(seen) == 100


def test_config_dict_is_json(data: Data, store: Path) -> None:
    import json

    d = labeling.config_dict(label_config(data.teacher_pt, data.parquet, store))
    assert json.loads(json.dumps(d))["shard_rows"] == 40
