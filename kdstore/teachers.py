"""Load teachers (TorchScript files, or a model spec plus weights) and fingerprint them."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdstore.errors import StudentError, TeacherError, arg
from kdstore.store.files import sha256_file
from kdstore.students import build_model, is_model_spec

TEACHER_HELP = (
    "a TorchScript file (teacher.pt), or MODEL@WEIGHTS where MODEL is a built-in spec (mlp:784-1200-1200-10) "
    "or package.module:factory and WEIGHTS a .safetensors or state-dict .pt file"
)


@dataclass
class Teacher:
    """A loaded teacher in eval mode, with its provenance."""

    source: str
    kind: str  # torchscript | factory | builtin
    weights: str | None
    sha256: str
    module: nn.Module

    def describe(self, teacher_id: str, num_classes: int) -> dict[str, Any]:
        names = getattr(self.module, "class_names", None)
        return {"id": teacher_id, "source": self.source, "kind": self.kind, "weights": self.weights,
                "sha256": self.sha256, "num_classes": num_classes,
                "class_names": list(map(str, names)) if isinstance(names, (list, tuple)) else None}


def split_spec(spec: str) -> tuple[str, str | None]:
    """'MODEL@WEIGHTS' -> (MODEL, WEIGHTS); a path to an existing file -> (path, None)."""
    if Path(spec).is_file() or "@" not in spec:
        return spec, None
    model, _, weights = spec.rpartition("@")
    return model, weights


def load_teacher(spec: str, option: str = "teacher") -> Teacher:
    """Load a teacher from `spec` (see TEACHER_HELP) onto the CPU in eval mode.

    Raises:
        TeacherError: missing file, import/build failure, weights that do not fit.
    """
    model_spec, weights = split_spec(spec)
    if weights is None and Path(model_spec).is_file():
        return _load_torchscript(Path(model_spec), option)
    if not is_model_spec(model_spec):
        raise TeacherError(f"{arg(option)} {spec!r}: no such file, and not a model spec; expected {TEACHER_HELP}")
    kind = "factory" if model_spec.split(":")[0] not in ("mlp", "cnn") else "builtin"
    if weights is None and kind == "builtin":
        raise TeacherError(f"{arg(option)} {spec!r}: a built-in spec needs trained weights: "
                           f"{model_spec}@weights.safetensors")
    try:
        # a built-in model whose weights come from a file is built without memory or random init (the meta device)
        # and takes the loaded tensors as they are: a 150k-class head would otherwise be initialised for nothing
        with torch.device("meta") if kind == "builtin" else contextlib.nullcontext():
            module = build_model(model_spec)
    except StudentError as e:
        raise TeacherError(f"{arg(option)}: {e}") from None
    if weights is not None:
        state = load_state_dict(Path(weights), option)
        try:
            module.load_state_dict(state, strict=True, assign=kind == "builtin")
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise TeacherError(
                f"{arg(option)} {spec!r}: weights {weights} do not fit {model_spec}: "
                f"{' '.join(s.strip() for s in first[:3])}"
            ) from None
        digest = sha256_file(weights)
    else:
        digest = state_dict_sha256(module)
    module.eval()
    return Teacher(spec, kind, weights, digest, module)


def _load_torchscript(path: Path, option: str) -> Teacher:
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 deprecates TorchScript; it is still the documented teacher format, and a warning
            # promoted to an error (-W error) must not make a valid teacher file unloadable.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError/ValueError variants for non-TorchScript files
        raise TeacherError(
            f"{arg(option)} {path}: cannot load it as TorchScript "
            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); "
            "save it with torch.jit.script(model).save(path), or give MODEL@WEIGHTS"
        ) from None
    module.eval()
    return Teacher(str(path), "torchscript", None, sha256_file(path), module)


def load_state_dict(path: Path, option: str = "teacher") -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from a .pt/.pth with `torch.load(weights_only=True)` (no pickle code)."""
    if not path.is_file():
        raise TeacherError(f"{arg(option)}: weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherError(
            f"{arg(option)}: cannot read weights {path} ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:160]}); "
            "expected .safetensors or a state_dict saved with torch.save (tensors only)"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherError(f"{arg(option)}: {path} does not hold a state_dict (name -> tensor)")
    return obj


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), in key order."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
