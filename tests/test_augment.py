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
