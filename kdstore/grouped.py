"""Students of one architecture trained as one: the points of a sweep in a single pass.

Each point's parameters are stacked on a new leading dimension (`torch.func.stack_module_state`) and one forward
runs all of them (`torch.func.vmap` over `torch.func.functional_call`): for an MLP every layer becomes one batched
matmul. The points' losses are summed before the backward, and no parameter is shared, so each point's gradient is
exactly the gradient of its own loss; the optimizers kdstore uses (SGD, Adam, AdamW) update each element from that
element's gradient and state alone, so one optimizer over the stacked tensors takes every point's own step. What
differs from training the points one by one is the order of floating-point sums inside the batched matmuls.

Checkpoints stay per point, in the format of an ungrouped run (`point_optimizer_state` slices the stacked state,
`stack_optimizer_states` stacks per-point states back), so a run can be resumed grouped or not.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

__all__ = ["StudentGroup", "auto_group_size", "group_refusal", "point_optimizer_state", "stack_optimizer_states"]

AUTO_MAX = 16  # points per pass when --group-size is auto (and memory allows)


class StudentGroup:
    """P copies of one architecture, each with its own parameters, as stacked (P, ...) leaf tensors."""

    def __init__(self, models: list[nn.Module]) -> None:
        params, buffers = stack_module_state(models)  # type: ignore[arg-type]
        self.params: dict[str, Tensor] = params
        self.buffers: dict[str, Tensor] = buffers
        self.size = len(models)
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture; its own weights are never used

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def __call__(self, x: Tensor, shared: bool) -> Tensor:
        """(P, B, C) logits: every point on the same (B, ...) inputs (`shared`), or point p on x[p] of (P, B, ...)."""
        def one(params: dict[str, Tensor], buffers: dict[str, Tensor], xs: Tensor) -> Tensor:
            return functional_call(self.base, (params, buffers), (xs,))  # type: ignore[no-any-return]

        return vmap(one, in_dims=(0, 0, None if shared else 0))(self.params, self.buffers, x)  # type: ignore[no-any-return]

    def state(self, i: int) -> dict[str, Tensor]:
        """A copy of point i's parameters and buffers under the keys of its module's state_dict (a copy: saving a
        slice would save the whole stacked storage)."""
        out = {k: v[i].detach().clone() for k, v in self.params.items()}
        out.update({k: v[i].clone() for k, v in self.buffers.items()})
        return out

    def load_into(self, model: nn.Module, i: int) -> nn.Module:
        """Copy point i's weights into `model` (one of the architecture) and return it."""
        model.load_state_dict(self.state(i))
        return model


def group_refusal(model: nn.Module, x: Tensor) -> str | None:
    """Why students of `model`'s architecture cannot be trained as a group, or None when they can: a forward and a
    backward of two stacked copies on `x` (two rows of the training inputs) must run and draw no random numbers
    (dropout in training mode would differ from training each point alone)."""
    if any(True for _ in model.buffers()):
        return "the student has buffers (e.g. batch norm statistics), which a stacked forward cannot update per point"
    try:
        group = StudentGroup([model, model])
        group(x, shared=True).float().sum().backward()
    except Exception as e:  # user students may use anything vmap does not support; they then train one by one
        return f"a stacked forward failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
    return None


def auto_group_size(points: int, per_point_bytes: int, budget_bytes: int) -> int:
    """How many points share a pass when --group-size is auto: all of them up to AUTO_MAX, fewer when their
    parameters, optimizer state, activations and targets (`per_point_bytes`) would not fit `budget_bytes`."""
    fit = max(1, budget_bytes // max(per_point_bytes, 1))
    return int(max(1, min(points, AUTO_MAX, fit)))


def per_point_bytes(model: nn.Module, batch_size: int, rows: int, classes: int) -> int:
    """A point's memory in a group: float32 parameters with their gradient and two optimizer moments, the activations
    of one batch (estimated as 4 x the widest layer's outputs per parameterised layer) and its in-memory targets."""
    n = sum(p.numel() for p in model.parameters())
    widths = [p.shape[0] for p in model.parameters() if p.ndim >= 1]
    acts = 4 * batch_size * sum(widths) if widths else 0
    return 4 * (4 * n + acts + rows * classes)


def stack_optimizer_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer state for the stacked parameters from the points' own states (all fresh or all restored at
    the same step): per-element tensors (moments, momentum) stacked, per-parameter scalars (Adam's step) kept."""
    first = states[0]
    out: dict[str, Any] = {"param_groups": copy.deepcopy(first["param_groups"]), "state": {}}
    for idx, entry in first["state"].items():
        out["state"][idx] = {k: torch.stack([s["state"][idx][k] for s in states]) if _per_element(v) else v
                             for k, v in entry.items()}
    return out


def point_optimizer_state(state: dict[str, Any], i: int) -> dict[str, Any]:
    """Point i's slice of a stacked optimizer state, in the format of an optimizer over its own module."""
    return {"param_groups": copy.deepcopy(state["param_groups"]),
            "state": {idx: {k: (v[i].clone() if _per_element(v) else v.clone() if isinstance(v, Tensor) else v)
                            for k, v in entry.items()} for idx, entry in state["state"].items()}}


def _per_element(v: object) -> bool:
    return isinstance(v, Tensor) and v.ndim > 0
