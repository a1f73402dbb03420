"""The three MNIST teachers of benchmarks/teacher_confidence.py, trained in a plain torch loop: one architecture
(a LeNet-style CNN), three ways of training it, so that only the teacher's confidence differs.

    calibrated      dropout 0.25 after the convolutions and 0.5 before the head, Adam 1e-3 with a cosine
                    schedule: soft, fairly calibrated outputs
    overconfident   no regularisation, Adam 1e-3 at a constant rate for many epochs: it fits the training set
                    exactly and its logits keep growing (large top-1/top-2 gaps, near one-hot soft targets)
    undertrained    plain SGD (lr 0.01, batch 64) for at most one epoch, stopping early once it is right on 92% of a
                    fixed 5k training subset; with seed 0 it never got there and ran the whole epoch (88% on its
                    training set, 89% on the test set)

`lenet` is the factory `kdstore label --teacher benchmarks._confidence_teachers:lenet@WEIGHTS` builds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._hinton_data import load_xy
from kdstore.store.files import sha256_file

FACTORY = "benchmarks._confidence_teachers:lenet"

RECIPES: dict[str, dict[str, Any]] = {
    "calibrated": {"dropout": 0.5, "conv_dropout": 0.25, "optimizer": "adam", "lr": 1e-3, "schedule": "cosine",
                   "epochs": 12, "batch_size": 128},
    "overconfident": {"dropout": 0.0, "conv_dropout": 0.0, "optimizer": "adam", "lr": 1e-3, "schedule": "constant",
                      "epochs": 20, "batch_size": 128},
    "undertrained": {"dropout": 0.0, "conv_dropout": 0.0, "optimizer": "sgd", "lr": 0.01, "schedule": "constant",
                     "epochs": 1, "batch_size": 64, "stop_at_train_accuracy": 0.92, "check_every": 10},
}


class LeNet(nn.Module):
    """conv5(16) - pool - conv5(32) - pool - fc 256 - fc 10 on 28 x 28 inputs (flat inputs are reshaped).
    Dropout is functional, so weights trained with it load into `lenet()` built without."""

    def __init__(self, dropout: float = 0.0, conv_dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 5), nn.Conv2d(16, 32, 5)
        self.fc1, self.fc2 = nn.Linear(512, 256), nn.Linear(256, 10)
        self.dropout, self.conv_dropout = dropout, conv_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = nn.functional
        x = f.max_pool2d(torch.relu(self.conv1(x.reshape(-1, 1, 28, 28))), 2)
        x = f.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = f.dropout(x.flatten(1), self.conv_dropout, self.training)
        x = f.dropout(torch.relu(self.fc1(x)), self.dropout, self.training)
        return self.fc2(x)  # type: ignore[no-any-return]


def lenet() -> nn.Module:
    """The teachers' architecture (no dropout: labeling runs in eval mode anyway)."""
    return LeNet()


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = torch.cat([model(x[a : a + 4096]) for a in range(0, len(x), 4096)])
    model.train()
    return out


def train_teacher(name: str, train: Path, test: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """Train teacher `name` (RECIPES) on `train`; write OUT/NAME.safetensors and OUT/NAME.json (reused when the
    recipe is unchanged)."""
    from safetensors.torch import save_file

    cfg = {**RECIPES[name], "seed": seed, "train": train.name}
    info_path, weights = out / f"{name}.json", out / f"{name}.safetensors"
    if info_path.exists() and weights.exists():
        info = json.loads(info_path.read_text())
        if info["config"] == cfg:
            return info  # type: ignore[no-any-return]
    x, y = load_xy(train)
    xt, yt = load_xy(test)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LeNet(cfg["dropout"], cfg["conv_dropout"])
    opt: torch.optim.Optimizer = (torch.optim.Adam(model.parameters(), lr=cfg["lr"]) if cfg["optimizer"] == "adam"
                                  else torch.optim.SGD(model.parameters(), lr=cfg["lr"]))
    bs, steps = cfg["batch_size"], math.ceil(len(x) / cfg["batch_size"])
    t0, step, stop = time.perf_counter(), 0, False
    for epoch in range(cfg["epochs"]):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(steps):
            if cfg["schedule"] == "cosine":
                for g in opt.param_groups:
                    g["lr"] = cfg["lr"] * 0.5 * (1 + math.cos(math.pi * (epoch + i / steps) / cfg["epochs"]))
            idx = perm[i * bs : (i + 1) * bs]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            target = cfg.get("stop_at_train_accuracy")
            if (target and step % cfg["check_every"] == 0
                    and float((logits_of(model, x[:5000]).argmax(1) == y[:5000]).float().mean()) >= target):
                stop = True
                break
        print(f"  teacher {name}: epoch {epoch + 1}/{cfg['epochs']} ({step} steps) "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        if stop:
            break
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    z, zt = logits_of(model, x), logits_of(model, xt)
    top2 = z.topk(2, dim=1).values
    info = {"config": cfg, "steps": step, "seconds": time.perf_counter() - t0, "sha256": sha256_file(weights),
            "train_errors": int((z.argmax(1) != y).sum()), "test_errors": int((zt.argmax(1) != yt).sum()),
            "logit_min": float(z.min()), "logit_max": float(z.max()),
            "mean_top2_gap": float((top2[:, 0] - top2[:, 1]).mean()),
            "test_nll": float(nn.functional.cross_entropy(zt, yt))}
    info_path.write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    here = Path(__file__).resolve().parent
    data, dest = here / "data", Path(sys.argv[1]) if len(sys.argv) > 1 else here / "out" / "confidence" / "teachers"
    dest.mkdir(parents=True, exist_ok=True)
    for n in RECIPES:
        print(n, json.dumps({k: v for k, v in train_teacher(n, data / "mnist_train.parquet",
                                                             data / "mnist_test.parquet", dest).items()
                             if k != "config"}), flush=True)
