"""The pieces the restructuring introduced: the target plan (pure), file utilities, argument-naming errors, the
CLI's comma lists and option names, and the writer's background thread."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest

from kdstore.errors import ConfigError, KdstoreError, StoreFormatError, arg
from kdstore.plan import TargetPlan, describe_need, plan_targets
from kdstore.store.files import atomic_path, atomic_write_bytes, atomic_write_json, temporary_path
from kdstore.store.layout import pick_version, split_ref


def manifest(*, logits: bool = True, k: int | None = 3, tail: str = "uniform", teachers: int = 1,
             c: int = 5) -> dict[str, Any]:
    return {"num_classes": c, "teachers": [{"id": f"t{i}"} for i in range(teachers)],
            "targets": {"logits": {"dtype": "float16"} if logits else None,
                        "top_k": {"k": k, "tail": tail} if k else None}}


# --- the target plan -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "loss", "alphas", "kw", "want"),
    [
        (manifest(), "kd", [0.9], {}, ({"logits", "label"}, "logits", 3, False)),
        (manifest(), "kd", [1.0], {}, ({"logits"}, "logits", 3, False)),
        (manifest(logits=False), "kd", [1.0], {}, ({"topk"}, "topk", 3, False)),
        (manifest(), "topk", [1.0], {"top_k": 2}, ({"topk"}, "topk", 2, False)),
        (manifest(k=None), "topk", [0.5], {"top_k": 2}, ({"logits", "label"}, "logits", 2, True)),
        (manifest(k=None), "kd", [1.0], {}, ({"logits"}, "logits", 5, False)),
        (manifest(), "mse", [1.0], {}, ({"logits"}, "logits", 3, False)),
        (manifest(), "hard", [0.0], {}, ({"logits", "label"}, "logits", 3, False)),  # logits: agreement only
        (manifest(logits=False), "ls", [0.0], {}, ({"topk", "label"}, "topk", 3, False)),
        (manifest(), "kd", [1.0, 0.5], {}, ({"logits", "label"}, "logits", 3, False)),  # union over the sweep
    ],
)
def test_plan_targets(m: dict[str, Any], loss: str, alphas: list[float], kw: dict[str, Any],
                      want: tuple[set[str], str, int, bool]) -> None:
    plan = plan_targets(m, loss=loss, alphas=alphas, **kw)
    assert (set(plan.need), plan.source, plan.k, plan.topk_from_logits) == want
    assert plan.teachers == ("t0",) and plan.num_classes == 5 and plan.tail == "uniform"


def test_plan_tail_teachers_and_ensemble() -> None:
    m = manifest(tail="drop", teachers=3)
    assert plan_targets(m, loss="kd", alphas=[1.0]).tail == "drop"
    assert plan_targets(m, loss="kd", alphas=[1.0], tail="uniform").tail == "uniform"
    assert plan_targets(m, loss="kd", alphas=[1.0]).teachers == ("t0", "t1", "t2")
    assert plan_targets(m, loss="kd", alphas=[1.0], ensemble="t2").teachers == ("t2",)
    assert isinstance(plan_targets(m, loss="kd", alphas=[1.0]), TargetPlan)


@pytest.mark.parametrize(
    ("m", "kw", "match"),
    [
        (manifest(), {"loss": "topk", "top_k": 4}, r"top_k 4: v stores top-3; use a k <= 3"),
        (manifest(k=None), {"loss": "topk", "top_k": 6}, r"top_k 6: v has 5 classes; use a k <= 5"),
        (manifest(teachers=2), {"loss": "kd", "ensemble": "t5"}, r"ensemble t5: v has teachers \['t0', 't1'\]"),
        (manifest(), {"loss": "l1"}, r"loss 'l1': expected one of kd, topk, mse, hard, ls"),
    ],
)
def test_plan_errors(m: dict[str, Any], kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_targets(m, alphas=[1.0], where="v", **kw)


def test_describe_need() -> None:
    assert describe_need("kd", 1.0) == {"logits"} and describe_need("kd", 0.5) == {"logits", "label"}
    assert describe_need("hard", 1.0) == {"label"} and describe_need("mse", 0.0) == {"logits"}


# --- errors that name arguments ---------------------------------------------------------------------------------------


def test_error_names_arguments_in_python_and_options_at_the_cli() -> None:
    e = ConfigError(f"{arg('top_k')} 0: must be >= 1; or pass {arg('keep_logits')} False")
    assert str(e) == "top_k 0: must be >= 1; or pass keep_logits False"
    assert e.fields == ("top_k", "keep_logits")
    assert e.render({"top_k": "--top-k"}) == "--top-k 0: must be >= 1; or pass keep_logits False"
    assert isinstance(e, ValueError) and isinstance(e, KdstoreError)
    assert arg("--eval") == "--eval"  # not an identifier: left as it is
    assert str(StoreFormatError("plain message")) == "plain message"


def test_cli_option_names_follow_the_command() -> None:
    from kdstore.cli import main
    from kdstore.cli._common import option_names

    train = option_names(main.commands["train"])
    assert train["temperatures"] == "--temperature" and train["seeds"] == "--seed" and train["eval"] == "--eval"
    assert train["data_mode"] == "--data" and train["top_k"] == "--top-k"
    label = option_names(main.commands["label"], {"format": "--format"})
    assert label["teacher"] == "--teacher" and label["input_columns"] == "--input-column"
    assert label["format"] == "--format" and label["keep_logits"] == "--logits"
    assert option_names(main.commands["convert"])["ref"] == "STORE/NAME[@vN]"  # an argument: its metavar


def test_comma_list_parameter() -> None:
    from kdstore.cli._common import FLOATS, INTS

    assert FLOATS.convert("1,2.5, 4", None, None) == (1.0, 2.5, 4.0)
    assert INTS.convert("0,1,2", None, None) == (0, 1, 2)
    assert INTS.convert((3,), None, None) == (3,)
    with pytest.raises(click.BadParameter, match="'1,x' is not a comma-separated list of numbers, e.g. 1,2,5"):
        FLOATS.convert("1,x", None, None)
    with pytest.raises(click.BadParameter, match="needs at least one value"):
        INTS.convert(",", None, None)


# --- references ----------------------------------------------------------------------------------------------------


def test_split_ref_and_pick_version() -> None:
    assert split_ref("s/ds@v3") == ("s/ds", 3) and split_ref("s/ds@2") == ("s/ds", 2)
    assert split_ref("s/ds@latest") == ("s/ds", None) and split_ref("s/ds") == ("s/ds", None)
    assert pick_version([1, 2, 5], None, "x", "s/ds") == 5 and pick_version([1, 2], 1, "x", "s/ds") == 1
    with pytest.raises(KdstoreError, match=r"x: version v3 not found; ds has v1, v2"):
        pick_version([1, 2], 3, "x", "s/ds")
    with pytest.raises(KdstoreError, match=r"x: s/ds holds no committed version \(hint\)"):
        pick_version([], None, "x", "s/ds", " (hint)")


# --- file utilities -------------------------------------------------------------------------------------------------


def test_atomic_writes_use_per_process_names_and_leave_nothing(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    assert str(os.getpid()) in temporary_path(target).name and temporary_path(target).name.startswith(".")
    atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{"a": 1}'
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"new"  # the old file, untouched
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_background_writer_surfaces_a_failure_and_keeps_finished_shards(tmp_path: Path) -> None:
    from kdstore.store import VersionWriter

    cols = [{"name": "sample_id", "role": "sample_id", "teacher": None, "dtype": "int64", "shape": []}]
    with VersionWriter(tmp_path, "ds", run_key="ab" * 8, fmt="parquet", columns=cols, shard_rows=4,
                       row_group_rows=2, shard_metadata={}) as w:
        w.write_async(0, 0, {"sample_id": np.arange(4, dtype=np.int64)}, {})
        w.write_async(1, 4, {"sample_id": np.arange(4, 8, dtype=np.float32)}, {})  # wrong dtype: fails on the thread
        with pytest.raises(StoreFormatError, match="column 'sample_id': got float32"):
            w.flush()
        assert sorted(w.completed()) == [0]
