"""Tiny, seeded teacher factories for the tests, usable as `--teacher tests.fixtures_models:NAME`.

Every factory builds its weights from a fixed seed with its own generator, so a factory teacher without
`@WEIGHTS` has the same state dict (and fingerprint) in every process. Subprocesses need the repository
root on PYTHONPATH (see `tests.conftest.subprocess_env`).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

IN_FEATURES = 8
HIDDEN = 16
NUM_CLASSES = 5
NAN_SENTINEL = 42.0  # nan_teacher returns NaN logits for rows whose first feature equals this
SLEEP_ENV = "KDSTORE_TEST_SLEEP"


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return module.eval()


def mlp(num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Sequential:
    """Linear(8, 16) -> ReLU -> Linear(16, num_classes), seeded."""
    m = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes))
    return _seeded(m, seed)  # type: ignore[return-value]


def tiny_teacher() -> nn.Module:
    """The 8 -> 16 -> 5 teacher (the same weights as the TorchScript fixture)."""
    return mlp()


def three_class_teacher() -> nn.Module:
    """8 -> 16 -> 3: disagrees with tiny_teacher on the number of classes."""
    return mlp(3, seed=3)


class _Wrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()


class SlowTeacher(_Wrap):
    """tiny_teacher that sleeps $KDSTORE_TEST_SLEEP seconds (default 0.15) per batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get(SLEEP_ENV, "0.15")))
        return self.net(x)  # type: ignore[no-any-return]


def slow_teacher() -> nn.Module:
    return SlowTeacher().eval()


class NanTeacher(_Wrap):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        bad = x[:, 0] == NAN_SENTINEL
        return torch.where(bad[:, None], torch.full_like(z, float("nan")), z)


def nan_teacher() -> nn.Module:
    """tiny_teacher, except rows whose first feature is NAN_SENTINEL get NaN logits."""
    return NanTeacher().eval()


class ThreeDTeacher(_Wrap):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, :, None]  # (B, C, 1)


def three_d_teacher() -> nn.Module:
    """Returns (batch, classes, 1) instead of (batch, classes)."""
    return ThreeDTeacher().eval()


class AssertingTeacher(_Wrap):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == IN_FEATURES  # a bare assert: the exception has an empty message
        return self.net(x)  # type: ignore[no-any-return]


def asserting_teacher() -> nn.Module:
    """tiny_teacher that checks its input width with a bare `assert`."""
    return AssertingTeacher().eval()


def not_a_module() -> object:
    return "not a module"


class NanStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(IN_FEATURES, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)) * float("nan")  # the right shape, but the loss is NaN from the first step


def nan_student() -> nn.Module:
    """An 8 -> 5 student whose logits are all NaN (a diverging run, usable as --student)."""
    return NanStudent()


def exact_teacher(num_classes: int = NUM_CLASSES, seed: int = 7) -> nn.Module:
    """Linear(8, C) whose weights and bias are multiples of 1/4 in [-2, 2]: on inputs that are multiples of 1/4
    (see tests.test_golden) every logit is an exact multiple of 1/16, so it is the same bits on any CPU, in any
    summation order and at any memory alignment (golden file hashes must not depend on the machine)."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(IN_FEATURES, num_classes)
    with torch.no_grad():
        m.weight.copy_(torch.randint(-8, 9, m.weight.shape, generator=g).float() / 4)
        m.bias.copy_(torch.randint(-8, 9, m.bias.shape, generator=g).float() / 4)
    return m.eval()


def exact_teacher_b() -> nn.Module:
    """A second exact teacher (another seed), for ensembles in the golden test."""
    return exact_teacher(seed=8)


THREADS_SEEN: list[int] = []


class _ThreadRecorder(_Wrap):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        THREADS_SEEN.append(torch.get_num_threads())
        return self.net(x)  # type: ignore[no-any-return]


def thread_recording_teacher() -> nn.Module:
    """tiny_teacher that appends torch's intra-op thread count to THREADS_SEEN at every forward."""
    return _ThreadRecorder().eval()


def wide_mlp(seed: int = 0) -> nn.Module:
    """256 -> 1024 -> 1024 -> 100: the size at which a resumed label run once differed from an uninterrupted one."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 100)).eval()


WIDE_CLASSES = 151_936  # an LLM-sized output (Qwen2's vocabulary)


def wide_teacher() -> nn.Module:
    """8 -> 151,936 classes: a teacher whose full logits of a shard would not fit in memory."""
    return _seeded(nn.Linear(IN_FEATURES, WIDE_CLASSES), seed=5)


def flatten_teacher() -> nn.Module:
    """Logits = the input's pixels ((B, H, W) -> (B, H*W)): stored float32 logits are exactly the input the teacher
    saw, so a test can compare a replayed view with the labeled one bit for bit."""
    return nn.Flatten().eval()


def bn_student() -> nn.Module:
    """An 8-input, 5-class student with batch norm: its running statistics keep it out of a stacked group."""
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
