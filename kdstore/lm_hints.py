"""`kdstore train --hint LAYER:STUDENT_MODULE[:WEIGHT]` for language-model students: TinyBERT's hidden-state loss
(Jiao et al. 2019, eq. 7, ``MSE(H^S W_h, H^T)``) against per-token teacher features stored by `kdstore label
--features` (`kdstore.lm_features`), without the teacher.

`LMHintedStudent` wraps the student: its forward returns the student's logits and keeps each hinted module's
output (B, L, Ds) (captured by a forward hook; a module returning a tuple gives its first element) mapped through a
learned linear regressor to the stored width (D, or r when projected: the stored coordinates are Euclidean, so
the regressor learns the projected target directly). `hint_loss` is the weighted `feature_losses.feature_mse` over
the batch's target positions (``target_mask``: every real token of text, the positions that predict the
assistant's tokens of chat). Checkpoints hold the regressors; the saved student is `student_of(model)` alone.

TinyBERT's attention loss (eq. 6): ``--hint attn:model.layers.N:blocks.M[:WEIGHT]`` (or ``attn_mean:...``) reads
the stored attention probabilities of teacher layer N and compares them with those of the student's block M (a
`gpt:` student's `lm_students.Block`, switched to keep its probabilities) through `feature_losses.attention_mse`,
with no regressor; a student with another number of heads than the stored maps is compared head-averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdstore import features
from kdstore.errors import ConfigError, ShapeMismatchError, arg
from kdstore.feature_losses import attention_mse, feature_mse
from kdstore.hints import HINT_HELP, HintSpec, StoredFeature, check_student_modules, stored_features
from kdstore.lm_features import attention_heads
from kdstore.lm_students import lm_logits


def parse_hint(text: str) -> HintSpec:
    """A --hint: ``LAYER:STUDENT_MODULE[:WEIGHT]``, or ``attn:LAYER:STUDENT_BLOCK[:WEIGHT]`` (also ``attn_mean:``)
    for an attention map, whose LAYER keeps its prefix (the stored feature's name)."""
    if attention_heads(text)[0] is None:
        return HintSpec.parse(text)
    prefix, _, rest = text.partition(":")
    try:
        s = HintSpec.parse(rest)
    except ConfigError:
        raise ConfigError(f"{arg('hint')} {text!r}: expected {HINT_HELP} (WEIGHT > 0), or "
                          f"{prefix}:LAYER:STUDENT_BLOCK[:WEIGHT] for attention maps") from None
    return HintSpec(f"{prefix}:{s.layer}", s.module, s.weight)


def is_attention(spec: HintSpec) -> bool:
    return attention_heads(spec.layer)[0] is not None


def parse_hints(hints: Sequence[str], manifest: Mapping[str, Any], where: str) -> tuple[list[HintSpec],
                                                                                         list[StoredFeature]]:
    """The --hint specs and the stored per-token feature each one reads (ConfigError: a LAYER the version does not
    store, a version without features, or features stored per row)."""
    specs = [parse_hint(h) for h in hints]
    stored = stored_features(specs, manifest, where)
    if not (manifest.get("features") or {}).get("per_token"):
        raise ConfigError(f"{arg('hint')}: {where} stores its features per row, not per token")
    return specs, stored


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


class LMHintedStudent(nn.Module):
    """A language-model student plus one linear regressor per hint, from its module's per-token output width to
    the stored feature's. After a forward pass `hinted` holds the regressed outputs (B, L, width), by column."""

    def __init__(self, student: nn.Module, specs: Sequence[HintSpec], stored: Sequence[StoredFeature]) -> None:
        super().__init__()
        self.student, self.specs, self.stored = student, list(specs), list(stored)
        self.hinted: dict[str, Tensor] = {}
        modules = dict(student.named_modules())
        check_student_modules(modules, self.specs)
        widths = iter(_probe(student, modules, [s for s in self.specs if not is_attention(s)]))
        self.regressors = nn.ModuleList(nn.Identity() if is_attention(s) else nn.Linear(next(widths), f.width)
                                        for s, f in zip(self.specs, self.stored, strict=True))
        self._captured: dict[int, Tensor] = {}
        self._blocks: dict[int, Any] = {}
        for i, s in enumerate(self.specs):
            if is_attention(s):
                self._blocks[i] = _attention_block(modules[s.module], s)
            else:
                modules[s.module].register_forward_hook(self._hook(i))

    def _hook(self, i: int) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            self._captured[i] = _first(out)
        return hook

    def forward(self, input_ids: Tensor) -> Tensor:
        self._captured.clear()
        logits = lm_logits(self.student, input_ids)
        self.hinted = {f.column: self._blocks[i].attention if i in self._blocks else reg(self._captured[i])
                       for i, (f, reg) in enumerate(zip(self.stored, self.regressors, strict=True))}
        return logits

    def hint_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Sum over hints of weight x `feature_mse` (in units of the stored feature's variance) of the last forward
        pass against the batch's stored features (``feature:COLUMN``), over its target positions."""
        mask = batch["target_mask"].bool()
        total = torch.zeros((), device=mask.device)
        for s, f in zip(self.specs, self.stored, strict=True):
            target = batch[f"feature:{f.column}"]
            pred = self.hinted[f.column]
            if is_attention(s):
                total = total + s.weight * _attention_loss(s, pred, target, mask)
                continue
            if pred.shape != target.shape:
                raise ShapeMismatchError(f"{arg('hint')} {s.layer}:{s.module}: the regressed student output "
                                         f"{tuple(pred.shape)} does not match the stored feature "
                                         f"{tuple(target.shape)}")
            total = total + s.weight * feature_mse(pred, target, scale=f.scale, mask=mask)
        return total


def student_of(model: nn.Module) -> nn.Module:
    """The student itself (without the regressors) of a model that may be an `LMHintedStudent`."""
    return model.student if isinstance(model, LMHintedStudent) else model


def _attention_loss(s: HintSpec, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """`attention_mse` of a block's kept probabilities against the stored maps; head-averaged when the head counts
    differ; a different sequence length is a one-line ShapeMismatchError."""
    if pred.ndim == 4 and target.ndim == 4 and pred.shape[1] != target.shape[1]:
        pred, target = pred.mean(1), target.float().mean(1)
    if pred.shape[-2:] != target.shape[-2:] or pred.shape[0] != target.shape[0]:
        raise ShapeMismatchError(f"{arg('hint')} {s.layer}:{s.module}: the student's attention maps "
                                 f"{tuple(pred.shape)} do not match the stored ones {tuple(target.shape)}")
    return attention_mse(pred, target, mask=mask)


def _attention_block(block: nn.Module, s: HintSpec) -> nn.Module:
    """A student block that can keep its attention probabilities (`lm_students.Block`), switched to keep them."""
    if not hasattr(block, "keep_attention"):
        raise ConfigError(f"{arg('hint')} {s.layer}:{s.module}: the student module {s.module!r} "
                          f"({type(block).__name__}) does not expose attention probabilities; name a block of a gpt: "
                          "student (blocks.N)")
    block.keep_attention = True
    return block


@torch.no_grad()
def _probe(student: nn.Module, modules: dict[str, nn.Module], specs: Sequence[HintSpec]) -> list[int]:
    """Each hinted module's output width, from a forward pass over token ids (1, 2).

    Raises:
        ShapeMismatchError: a module whose output is not per token (batch, positions, width).
    """
    if not specs:
        return []
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(student.parameters()).device)
    got = features.probe_outputs(student, [s.module for s in specs], lambda: lm_logits(student, ids), "the student",
                                 option="hint")
    widths = []
    for s in specs:
        out = got.get(s.module)
        if not isinstance(out, Tensor) or out.ndim != 3 or tuple(out.shape[:2]) != (1, 2):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeMismatchError(f"{arg('hint')} {s.layer}:{s.module}: the student module's output {shape} on "
                                     "token ids (1, 2) is not per token (batch, positions, width)")
        widths.append(int(out.shape[-1]))
    return widths
