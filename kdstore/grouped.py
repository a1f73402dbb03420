"""Students of one architecture trained as one: the points of a sweep in a single pass.

Each point's parameters are stacked on a new leading dimension (`torch.func.stack_module_state`) and one forward
runs all of them: for a kdstore MLP a few batched matmuls, for other students `torch.func.vmap` over
`torch.func.functional_call`. The points' losses are summed before one backward, and no parameter is shared, so each
point's gradient is exactly the gradient of its own loss. One optimizer steps every point's parameters as per-point
views of the stacked tensors; SGD, Adam and AdamW update each tensor from its own gradient and state alone, so
each point takes the step it would take alone. What differs from training the points one by one is the order of
floating-point sums inside the batched matmuls.

Checkpoints stay per point, in the format of an ungrouped run (`point_optimizer_state` takes a point's part of the
group's optimizer state, `stack_optimizer_states` joins per-point states), so a run resumes grouped or not.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from kdstore.errors import ConfigError, arg

__all__ = ["StudentGroup", "auto_group_size", "group_refusal", "point_optimizer_state", "stack_optimizer_states"]

AUTO_MAX = 16  # points per pass when --group-size is auto (and memory allows)


class StudentGroup:
    """P copies of one architecture, each with its own parameters, stored stacked as (P, ...) tensors.

    The forward reads the stacked tensors; the optimizer updates per-point views of them (`parameters()`, point
    after point), which `backward` hands each point's slice of the stacked gradient. So a step touches one point's
    tensors at a time, as training it alone would (on a CPU the stacked tensors would not stay in cache through
    Adam's several passes), the update of each tensor is the very same computation, and nothing is copied."""

    def __init__(self, models: list[nn.Module]) -> None:
        params, buffers = stack_module_state(models)  # type: ignore[arg-type]
        self.stacked: dict[str, Tensor] = params
        self.buffers: dict[str, Tensor] = buffers
        self.size = len(models)
        self.points = [{k: v.detach()[i].requires_grad_() for k, v in params.items()} for i in range(self.size)]
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture; its own weights are never used
        # A tied parameter (an LM head sharing the token embedding) is stacked once under its first name; moving the
        # base to "meta" unties it, so the forward passes the stacked tensor under every name it has.
        self.aliases = _tied_aliases(models[0])
        self.mlp_layers = _plain_mlp_layers(models[0])

    def parameters(self) -> list[Tensor]:
        """Every point's parameters, point after point (what the optimizer steps)."""
        return [v for point in self.points for v in point.values()]

    def __call__(self, x: Tensor, shared: bool) -> Tensor:
        """(P, B, C) logits: every point on the same (B, ...) inputs (`shared`), or point p on x[p] of (P, B, ...)."""
        if self.mlp_layers:
            return _mlp_forward(self.stacked, self.mlp_layers, x, shared)

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor], xs: Tensor) -> Tensor:
            return functional_call(self.base, (params, buffers), (xs,))  # type: ignore[no-any-return]

        params = {**self.stacked, **{alias: self.stacked[name] for alias, name in self.aliases.items()}}
        with warnings.catch_warnings():  # ops without a batching rule (CPU attention) loop over the points: correct
            warnings.filterwarnings("ignore", "There is a performance drop because we have not yet implemented")
            return vmap(one, in_dims=(0, 0, None if shared else 0))(params, self.buffers, x)  # type: ignore[no-any-return]

    def backward(self, loss: Tensor) -> None:
        """Backpropagate `loss` to the stacked tensors and give each point its slice of their gradients."""
        for v in self.stacked.values():
            v.grad = None
        loss.backward()
        for k, v in self.stacked.items():
            for i, point in enumerate(self.points):
                point[k].grad = None if v.grad is None else v.grad[i]

    def state(self, i: int) -> dict[str, Tensor]:
        """A copy of point i's parameters and buffers under the keys of its module's state_dict (a copy: saving a
        view would save the whole stacked storage)."""
        out = {k: v.detach().clone() for k, v in self.points[i].items()}
        out.update({k: v[i].clone() for k, v in self.buffers.items()})
        out.update({alias: out[name] for alias, name in self.aliases.items()})
        return out

    def load_into(self, model: nn.Module, i: int) -> nn.Module:
        """Copy point i's weights into `model` (one of the architecture) and return it."""
        model.load_state_dict(self.state(i))
        return model


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{second name: first name} of every parameter registered under more than one name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _plain_mlp_layers(model: nn.Module) -> int:
    """The number of layers of a kdstore MLP without dropout (its stacked forward is a few batched matmuls), else 0."""
    from kdstore.students import MLP

    if type(model) is not MLP or model.dropout or model.input_dropout:
        return 0
    return len(model.layers)


def _mlp_forward(params: dict[str, Tensor], layers: int, x: Tensor, shared: bool) -> Tensor:
    """`MLP.forward` for P stacked points: shared inputs meet all points' first layers in one matmul, then each
    layer is one batched matmul (baddbmm) over the points.

    Activations are kept feature-major, (P, features, B), so that each layer is ``W @ h`` and autograd's weight
    gradient ``grad @ h^T`` comes out in the (P, out, in) layout of the stacked weights; the batch-major ``h @ W^T``
    made it (P, in, out) and cost a transposing copy of every weight per step (13% of the step of 5 800-800 points).
    """
    h = x.flatten(1).t() if shared else x.flatten(2).transpose(1, 2)  # (in, B) or (P, in, B)
    for i in range(layers):
        w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]  # (P, out, in), (P, out)
        p, o, n = w.shape
        if h.ndim == 2:
            h = torch.addmm(b.reshape(p * o, 1), w.reshape(p * o, n), h).reshape(p, o, h.shape[1])
        else:
            h = torch.baddbmm(b.unsqueeze(2), w, h)
        if i < layers - 1:
            h = torch.relu(h)
    return h.transpose(1, 2)  # (P, B, C)


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


def settled_size(requested: int | None, points: int, student: str, refusal: str | None) -> tuple[int, str] | None:
    """(points per pass, why) when --group-size or a refusal settles it, None when automatic sizing decides:
    a refused student trains alone (ConfigError when a size above 1 was asked for), an asked size is capped at
    the sweep's."""
    if refusal is not None and requested is not None:
        raise ConfigError(f"{arg('group_size')} {requested}: {student} cannot train as a group: {refusal}; "
                          f"use {arg('group_size')} 1")
    if refusal is not None:
        return 1, refusal
    if requested is not None:
        return min(requested, points), f"{arg('group_size')} {requested}"
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
    """One optimizer state for a group from the points' own states, which come from optimizers over each point's
    module with the same parameter groups (all fresh, or all restored). Group g of the stacked optimizer holds
    every point's parameters of group g, point after point (as `StudentGroup.parameters()` lists them for one
    group)."""
    sizes = [len(g["params"]) for g in states[0]["param_groups"]]
    groups = copy.deepcopy(states[0]["param_groups"])
    state: dict[int, Any] = {}
    start = 0
    for g, n in enumerate(sizes):
        groups[g]["params"] = list(range(start, start + n * len(states)))
        offset = sum(sizes[:g])  # the point's own index of its group's first parameter
        for i, s in enumerate(states):
            state.update({start + i * n + j: s["state"][offset + j] for j in range(n) if offset + j in s["state"]})
        start += n * len(states)
    return {"param_groups": groups, "state": state}


def point_optimizer_state(state: dict[str, Any], i: int, n: int | list[int]) -> dict[str, Any]:
    """Point i's part of a group optimizer's state (`n` parameters per point, or per parameter group), as an
    optimizer over its own module would hold it: what an ungrouped checkpoint stores."""
    sizes = [n] if isinstance(n, int) else n
    points = len(state["param_groups"][0]["params"]) // sizes[0]
    groups = copy.deepcopy(state["param_groups"])
    out: dict[int, Any] = {}
    start = 0
    for g, size in enumerate(sizes):
        offset = sum(sizes[:g])
        groups[g]["params"] = list(range(offset, offset + size))
        for j in range(size):
            entry = state["state"].get(start + i * size + j)
            if entry is not None:
                out[offset + j] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in entry.items()}
        start += size * points
    return {"param_groups": groups, "state": out}
