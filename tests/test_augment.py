"""kdstore.augment: the spec grammar, parameters drawn from (seed, sample, view) alone, and each operation applied
exactly (shift, flip), as torchvision does it (crop boxes), or regenerated from its key (noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdstore import augment
from kdstore.errors import ConfigError


def test_parse_and_canonical_form() -> None:
    spec = augment.parse_augment("shift:2, crop:0.35-1 ,flip,noise:0.1")
    assert str(spec) == "shift:2,crop:0.35-1.0,flip,noise:0.1"
    assert str(augment.parse_augment("crop:0.5-1:0.5-2")) == "crop:0.5-1.0:0.5-2.0"
    assert augment.parse_augment(str(spec)) == spec
    assert spec.needs_image and not augment.parse_augment("noise:0.5").needs_image


@pytest.mark.parametrize(("text", "match"), [
    ("shift", r"augment 'shift': cannot parse 'shift'; expected a comma-separated list of shift:P"),
    ("rotate:10", r"cannot parse 'rotate:10'"),
    ("shift:0", r"shift needs P >= 1"),
    ("crop:0.5-1.5", r"crop needs 0 < S0 <= S1 <= 1 .*a crop larger than the image"),
    ("crop:0.9-0.5", r"crop needs 0 < S0 <= S1 <= 1"),
    ("", r"cannot parse ''"),
])
def test_bad_specs_are_one_line_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        augment.parse_augment(text)


def test_image_ops_need_image_inputs() -> None:
    augment.check_shape(augment.parse_augment("shift:1"), (28, 28))
    augment.check_shape(augment.parse_augment("flip"), (3, 32, 32))
    augment.check_shape(augment.parse_augment("noise:0.1"), (40,))
    with pytest.raises(ConfigError, match=r"need image inputs of shape \(H, W\) or \(C, H, W\); the transfer "
                                          r"set's inputs are \[784\]"):
        augment.check_shape(augment.parse_augment("shift:2"), (784,))


def test_parameters_depend_only_on_seed_sample_and_view() -> None:
    spec = augment.parse_augment("shift:3,crop:0.3-1,flip,noise:0.2")
    samples, views = np.repeat(np.arange(50), 4), np.tile(np.arange(4), 50)
    full = augment.draw_params(spec, (28, 28), seed=7, samples=samples, views=views)
    part = augment.draw_params(spec, (28, 28), seed=7, samples=samples[101:150], views=views[101:150])
    for name, a in full.items():
        np.testing.assert_array_equal(a[101:150], part[name])
    other = augment.draw_params(spec, (28, 28), seed=8, samples=samples, views=views)
    assert not np.array_equal(full["aug0_shift"], other["aug0_shift"])
    assert full["aug0_shift"].dtype == np.int8 and np.abs(full["aug0_shift"]).max() == 3
    assert {-3, 3} <= set(full["aug0_shift"].ravel().tolist())  # the whole range is drawn
    top, left, h, w = full["aug1_crop"].astype(int).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    assert ((h * w) / 784 >= 0.3 - 0.05).all()
    assert 0.3 < full["aug2_flip"].mean() < 0.7
    identity = views == 0
    neutral = augment.draw_params(spec, (28, 28), seed=7, samples=samples, views=views, identity=identity)
    assert (neutral["aug0_shift"][identity] == 0).all() and (neutral["aug1_crop"][identity] == [0, 0, 28, 28]).all()
    assert (neutral["aug2_flip"][identity] == 0).all() and (neutral["aug3_noise"][identity] == -1).all()


def test_shift_and_flip_are_exact_copies() -> None:
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 4, 5)
    spec = augment.parse_augment("shift:2")
    out = augment.apply(spec, x, {"aug0_shift": torch.tensor([[1, -2], [0, 0]], dtype=torch.int8)})
    want = torch.zeros(4, 5)
    want[1:, :3] = x[0, :3, 2:]  # down 1, left 2, zeros where nothing came from
    torch.testing.assert_close(out[0], want, rtol=0, atol=0)
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=0)
    c = -torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(1, 3, 4, 5) - 1  # channels, negative values
    out = augment.apply(spec, c, {"aug0_shift": torch.tensor([[-2, 2]], dtype=torch.int8)})
    want = torch.zeros(1, 3, 4, 5)
    want[0, :, :2, 2:] = c[0, :, 2:, :3]  # up 2, right 2, every channel alike; the fill is +0.0
    assert torch.equal(out, want) and not torch.signbit(out[0, :, 2:, :]).any()
    flipped = augment.apply(augment.parse_augment("flip"), x[:, None], {"aug0_flip": torch.tensor([1, 0])})
    torch.testing.assert_close(flipped[0, 0], x[0].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(flipped[1, 0], x[1], rtol=0, atol=0)


def test_crop_of_the_whole_image_is_the_identity_and_a_crop_resizes() -> None:
    x = torch.rand(3, 2, 8, 8)
    spec = augment.parse_augment("crop:0.5-1")
    whole = torch.tensor([[0, 0, 8, 8]] * 3, dtype=torch.int16)
    torch.testing.assert_close(augment.apply(spec, x, {"aug0_crop": whole}), x, rtol=0, atol=0)
    quarter = torch.tensor([[0, 0, 4, 4]] * 3, dtype=torch.int16)
    out = augment.apply(spec, x, {"aug0_crop": quarter})
    assert out.shape == x.shape
    # the top-left 4x4, upsampled 2x (pixel centres): output pixel (1, 1) samples source pixel (0.25, 0.25)
    want = 0.5625 * x[..., 0, 0] + 0.1875 * x[..., 0, 1] + 0.1875 * x[..., 1, 0] + 0.0625 * x[..., 1, 1]
    torch.testing.assert_close(out[..., 1, 1], want, rtol=1e-5, atol=1e-6)


def test_noise_is_regenerated_from_its_key() -> None:
    x = torch.zeros(3, 40)
    spec = augment.parse_augment("noise:0.5")
    keys = torch.tensor([11, 11, -1])
    out = augment.apply(spec, x, {"aug0_noise": keys})
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)  # same key, same noise
    assert (out[2] == 0).all()  # -1: the identity view
    big = augment.apply(spec, torch.zeros(1, 20000), {"aug0_noise": torch.tensor([5])})
    assert abs(float(big.std()) - 0.5) < 0.02 and abs(float(big.mean())) < 0.02


# --- labeling views ---------------------------------------------------------------------------------------------------


def _image_transfer(tmp_path):  # type: ignore[no-untyped-def]
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdstore.quickstart import dataset_file

    t = pq.read_table(dataset_file("digits_train.parquet")).slice(0, 60)
    path = tmp_path / "digits60.parquet"
    pq.write_table(t.replace_schema_metadata(pq.read_schema(dataset_file("digits_train.parquet")).metadata), path,
                   row_group_size=25)
    assert pa.types.is_fixed_size_list(t.schema.field("image").type)
    return path


def _label_views(transfer, out, **kw):  # type: ignore[no-untyped-def]
    from kdstore.labeling import LabelConfig, label
    from kdstore.quickstart import teacher_spec

    opts = {"top_k": 3, "views": 3, "augment": "shift:1,crop:0.6-1,flip", "shard_rows": 60, "row_group_rows": 9,
            "batch_size": 20, "device": "cpu", **kw}
    return label(LabelConfig(teachers=(teacher_spec(),), transfer=str(transfer), out=str(out), name="v", **opts))


def test_labeled_views_store_the_view_the_teacher_saw(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kdstore.quickstart import teacher_spec
    from kdstore.store import Version
    from kdstore.teachers import load_teacher
    from kdstore.transfer import open_transfer

    res = _label_views(_image_transfer(tmp_path), tmp_path / "s")
    v = Version(res.path)
    m = v.manifest
    assert m["num_rows"] == 180 and m["transfer_set"]["rows"] == 60 and m["storage"]["row_group_rows"] == 9
    assert m["storage"]["shard_rows"] == 60 and [f["rows"] for f in m["files"]] == [60, 60, 60]
    assert m["views"] == {"count": 3, "augment": "shift:1,crop:0.6-1.0,flip", "seed": 0, "identity_first": True,
                          "input_shape": [8, 8], "params": ["aug0_shift", "aug1_crop", "aug2_flip"]}
    cols = v.read_all(["sample_id", "view", "aug0_shift", "aug1_crop", "aug2_flip", "t0_logits"])
    np.testing.assert_array_equal(cols["sample_id"], np.repeat(np.arange(60), 3))
    np.testing.assert_array_equal(cols["view"], np.tile(np.arange(3), 60))
    assert (cols["aug0_shift"][cols["view"] == 0] == 0).all()  # view 0 is the input itself
    # replay: the stored parameters, applied to the transfer rows, give the inputs whose logits were stored
    ts = open_transfer(_image_transfer(tmp_path))
    x, _ = ts.read_rows(0, 60)
    params = {n: torch.from_numpy(cols[n]) for n in ("aug0_shift", "aug1_crop", "aug2_flip")}
    replayed = augment.apply(augment.parse_augment(m["views"]["augment"]),
                             torch.from_numpy(x[cols["sample_id"]]), params)
    teacher = load_teacher(teacher_spec()).module
    with torch.no_grad():
        z = teacher(replayed).numpy()
    np.testing.assert_allclose(cols["t0_logits"].astype(np.float32), z, rtol=2e-3, atol=2e-3)
    s = m["statistics"]["teachers"]["t0"]
    assert s["accuracy_identity_views"] > s["accuracy_augmented_views"]


def test_views_resume_and_shards_give_the_same_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import data_bytes

    transfer = _image_transfer(tmp_path)
    whole = _label_views(transfer, tmp_path / "a").path
    for i in (1, 0):  # two jobs of a sharded run, in either order
        _label_views(transfer, tmp_path / "b", shard_index=i, num_shards=2)
    assert data_bytes(tmp_path / "b" / "v" / "v1") == data_bytes(whole)
    with pytest.raises(KeyboardInterrupt):
        _interrupted(transfer, tmp_path)
    resumed = _label_views(transfer, tmp_path / "c")
    assert resumed.resumed_shards == 1 and data_bytes(resumed.path) == data_bytes(whole)


def _interrupted(transfer, tmp_path):  # type: ignore[no-untyped-def]
    from kdstore.labeling import LabelConfig, label
    from kdstore.quickstart import teacher_spec

    seen = [0]

    def interrupt(n: int) -> None:
        seen[0] += n
        if seen[0] > 25:  # samples: inside the second shard (20 samples = 60 rows each)
            raise KeyboardInterrupt

    cfg = LabelConfig(teachers=(teacher_spec(),), transfer=str(transfer), out=str(tmp_path / "c"), name="v", top_k=3,
                      views=3, augment="shift:1,crop:0.6-1,flip", shard_rows=60, row_group_rows=9, batch_size=20,
                      device="cpu")
    label(cfg, progress=interrupt)


@pytest.mark.parametrize(("kw", "match"), [
    ({"views": 0}, r"views 0: must be >= 1"),
    ({"augment": None}, r"views 3 needs augment SPEC"),
    ({"augment": "shift:1,twist"}, r"augment 'shift:1,twist': cannot parse 'twist'"),
    ({"views": 1}, r"views 1 with the identity view first leaves no augmented view"),
])
def test_view_options_errors(tmp_path, kw, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=match):
        _label_views(_image_transfer(tmp_path), tmp_path / "s", **kw)
    assert not (tmp_path / "s" / "v").exists() or not list((tmp_path / "s" / "v").glob("v*"))


def test_views_on_vectors_take_noise_only(data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import assert_clean_error, cli

    r = cli(["label", "--teacher", data.teacher_pt, "--transfer", data.parquet, "--out", tmp_path / "s", "--name",
             "n", "--views", "2", "--augment", "shift:2", "--top-k", "3", "--quiet", "--device", "cpu"])
    assert_clean_error(r, r"--augment shift:2: shift, crop and flip need image inputs")
    assert not (tmp_path / "s" / "n").exists()
    r = cli(["label", "--teacher", data.teacher_pt, "--transfer", data.parquet, "--out", tmp_path / "s", "--name",
             "n", "--views", "2", "--augment", "noise:0.1", "--top-k", "3", "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "t0 on views: unaugmented" in r.output
