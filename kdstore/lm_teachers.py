"""Language-model teachers: load one (a Hugging Face directory, a GGUF file, or a factory) with its tokenizer and
provenance, and run it with the output head applied to chunks of positions, so (B, L, V) logits never exist.

Reading files is `lm_files`' job; transformers is imported only when a teacher is loaded (``kdstore[lm]``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdstore.errors import ConfigError, TeacherError, arg
from kdstore.lm_files import first_line, load_tokenizer, read_gguf, read_hf_dir, tokenizer_fingerprint

LM_TEACHER_HELP = (
    "hf:DIR (a Hugging Face model directory with its tokenizer), hf:FILE.gguf (dequantised to float32), or "
    "package.module:factory returning (model, tokenizer) or a model mapping token ids (B, L) to logits (B, L, V)"
)
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class LMTeacher:
    """A loaded language-model teacher (eval mode, float32, CPU) with its provenance. Create with `load_lm_teacher`.

    `vocab_size` is the width of the logits (rows of the output head); `len(tokenizer)` may be smaller when the
    model pads its vocabulary (the extra rows are ids the tokenizer never produces).
    """

    source: str
    kind: str  # hf | gguf | factory
    sha256: str  # of the weights: the file's own sha256 for one file, else sha256 over "name sha256\n" lines
    files: tuple[dict[str, Any], ...]  # [{"name", "sha256", "bytes"}] of the weights files, sorted by name
    module: nn.Module
    tokenizer: Any
    vocab_size: int
    max_context: int | None
    chunked_head: bool  # True: the body runs once and the head per chunk of positions (memory bounded)
    cache: str = "off"  # GGUF only: "hit" (dequantised weights read from the cache), "written", or "off"
    _body: Any = field(default=None, repr=False)
    _head: Any = field(default=None, repr=False)

    def tokenizer_fingerprint(self) -> dict[str, Any]:
        """The tokenizer's identity for the manifest (see `tokenizer_fingerprint`), computed once per loaded teacher
        (hashing the serialised tokenizer takes ~0.5 s at a 49,152-token vocabulary: a fixed cost per label run that
        a caller labeling several corpora with one teacher paid every time); a fresh copy each call."""
        cached = self.__dict__.get("_tokenizer_fingerprint")  # frozen dataclass: a memo outside the fields
        if cached is None:
            cached = tokenizer_fingerprint(self.tokenizer, self.vocab_size)
            self.__dict__["_tokenizer_fingerprint"] = cached
        return copy.deepcopy(cached)

    def describe(self, teacher_id: str) -> dict[str, Any]:
        """The manifest's entry for this teacher."""
        cfg = getattr(self.module, "config", None)
        versions = {"torch": torch.__version__}
        for lib in ("transformers", "tokenizers", "gguf"):
            try:
                versions[lib] = importlib.metadata.version(lib)
            except importlib.metadata.PackageNotFoundError:
                versions[lib] = None
        return {
            "id": teacher_id, "source": self.source, "kind": self.kind, "sha256": self.sha256,
            "files": [dict(f) for f in self.files],
            "architecture": getattr(cfg, "model_type", None) or type(self.module).__name__,
            "parameters": sum(p.numel() for p in self.module.parameters()), "dtype": "float32",
            "max_context": self.max_context, "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer_fingerprint(), "chunked_head": self.chunked_head, "libraries": versions,
        }

    def iter_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    positions_per_chunk: int = 256,
                    out: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Run the teacher on `input_ids` (B, L) and yield ``(start, logits)`` with float32 logits of shape
        (B, c, V) for positions [start, start + c), c <= `positions_per_chunk`.

        The transformer body runs once; the output head runs per chunk, so peak memory holds B x c x V floats,
        not B x L x V. For right-padded rows `attention_mask` may be None: a causal model's real positions do not
        see the padding after them, and without a mask a row's logits do not depend on the other rows' padding.

        Args:
            out: a float32 tensor of at least B x min(L, positions_per_chunk) x V elements that every chunk's logits
                are written into in turn (the same bits as a fresh tensor): a yielded chunk is overwritten by the
                next one, so copy what you keep. Saves mapping (page-faulting) a fresh B x c x V array per chunk,
                ~15% of the head's time at SmolLM2's vocabulary. Ignored unless the head is a plain `nn.Linear`.

        Raises:
            ConfigError: bad shapes, chunk size, token ids outside the vocabulary, L above the context, or an `out`
                too small, not contiguous or not float32.
        """
        if input_ids.ndim != 2:
            raise ConfigError(f"input_ids of shape {tuple(input_ids.shape)}: expected (batch, positions)")
        if positions_per_chunk < 1:
            raise ConfigError(f"{arg('positions_per_chunk')} {positions_per_chunk}: must be >= 1")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ConfigError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match input_ids "
                              f"{tuple(input_ids.shape)}")
        n = input_ids.shape[1]
        if self.max_context is not None and n > self.max_context:
            raise ConfigError(f"{n} positions per row: the teacher's context is {self.max_context}; use shorter rows")
        ids = input_ids.to(torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ConfigError(f"token ids in [{int(ids.min())}, {int(ids.max())}]: the teacher's vocabulary is "
                              f"0..{self.vocab_size - 1}; tokenise with the teacher's tokenizer")
        if out is not None:
            need = input_ids.shape[0] * min(n, positions_per_chunk) * self.vocab_size
            if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < need:
                raise ConfigError(f"out: {out.numel()} {out.dtype} elements; the chunks need {need} contiguous float32")
            out = out.view(-1)
        return self._chunks(ids, attention_mask, positions_per_chunk, out)  # checked now, not at the first next()

    def _chunks(self, ids: torch.Tensor, mask: torch.Tensor | None, step: int,
                out: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
        # inference_mode is entered around each computation, never across a yield (it would leak into the caller)
        with torch.inference_mode():
            if self.chunked_head:
                whole = self._body(input_ids=ids, attention_mask=mask).last_hidden_state
            elif hasattr(self.module, "config"):  # a transformers model that cannot be split
                whole = _logits_of(self.module(input_ids=ids, attention_mask=mask))
            else:  # a factory module maps ids to logits; right padding needs no mask
                whole = _logits_of(self.module(ids))
        linear = self._head if type(self._head) is nn.Linear else None
        for s in range(0, ids.shape[1], step):
            if self.chunked_head:
                with torch.inference_mode():  # a contiguous slice: the head's matmul is ~30% slower on a strided one
                    h = whole[:, s:s + step].contiguous()
                    z = _linear_into(linear, h, out) if linear and out is not None else self._head(h).float()
            else:
                z = whole[:, s:s + step].float()
            yield s, z


def load_lm_teacher(spec: str, *, tokenizer: str | None = None, cache: bool = False,
                    option: str = "teacher") -> LMTeacher:
    """Load a language-model teacher from `spec` (see LM_TEACHER_HELP) onto the CPU, in eval mode and float32.

    Args:
        spec: ``hf:DIR``, ``hf:FILE.gguf`` or ``package.module:factory``.
        tokenizer: for a factory returning only a model: a tokenizer directory, ``tokenizer.json`` or ``.gguf``.
        cache: GGUF only: keep the dequantised weights as safetensors under the kdstore cache directory
            (``$KDSTORE_CACHE/lm-teachers``), keyed by the GGUF's sha256 and the transformers version; a later
            load reads them instead of dequantising again.
        option: the argument named in error messages.

    Raises:
        TeacherError: missing files or packages, a file the installed libraries cannot read, a bad factory, or a
            tokenizer with more ids than the model has logits.
    """
    if spec.startswith("hf:"):
        path = Path(spec[3:]).expanduser()
        if path.suffix.lower() == ".gguf":
            model, tok, files, status = read_gguf(spec, path, cache, option)
            return _finish(spec, "gguf", files, model, tok, option, cache=status)
        model, tok, files = read_hf_dir(spec, path, option)
        return _finish(spec, "hf", files, model, tok, option)
    if _FACTORY_RE.match(spec):
        return _load_factory(spec, tokenizer, option)
    raise TeacherError(f"{arg(option)} {spec!r}: not a language-model teacher; expected {LM_TEACHER_HELP}")


# ---------------------------------------------------------------------------------------------- internals
def _load_factory(spec: str, tokenizer: str | None, option: str) -> LMTeacher:
    module_name, _, attr = spec.rpartition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # any import-time failure of user code is a user error
        raise TeacherError(f"{arg(option)} {spec}: cannot import {attr!r} from {module_name!r} ({first_line(e)}); "
                           "check the name and that it is on PYTHONPATH") from None
    try:
        out = factory()
    except Exception as e:
        raise TeacherError(f"{arg(option)} {spec}: calling {attr}() failed ({first_line(e)})") from None
    model, tok = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(model, nn.Module):
        raise TeacherError(f"{arg(option)} {spec}: {attr}() returned {type(model).__name__}; expected an nn.Module "
                           "or (nn.Module, tokenizer)")
    tok = tok if tok is not None else tokenizer
    if tok is None:
        raise TeacherError(f"{arg(option)} {spec}: no tokenizer; return (model, tokenizer) from {attr}() or pass "
                           f"{arg('tokenizer')} (a tokenizer directory, tokenizer.json or .gguf)")
    if isinstance(tok, (str, Path)):
        tok = load_tokenizer(str(tok), option="tokenizer")
    from kdstore.teachers import state_dict_sha256

    digest = state_dict_sha256(model)
    return _finish(spec, "factory", ({"name": "state_dict", "sha256": digest, "bytes": None},), model, tok, option)


def _combined_sha256(files: tuple[dict[str, Any], ...]) -> str:
    if len(files) == 1:
        return str(files[0]["sha256"])
    return hashlib.sha256("".join(f"{f['name']} {f['sha256']}\n" for f in files).encode()).hexdigest()


def _linear_into(head: nn.Linear, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``head(h)`` of hidden states `h` (B, c, H) written into the first B x c x V elements of the flat float32 `out`:
    `nn.Linear` on a contiguous 3-d input is one matrix product of the (B x c, H) rows (plus the bias), so the same
    operation and bits as ``head(h)``, without allocating its result."""
    b, c, hidden = h.shape
    v = head.weight.shape[0]
    z = out[: b * c * v].view(b * c, v)
    if head.bias is None:
        torch.mm(h.reshape(b * c, hidden), head.weight.t(), out=z)
    else:
        torch.addmm(head.bias, h.reshape(b * c, hidden), head.weight.t(), out=z)
    return z.view(b, c, v)


def _logits_of(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise TeacherError(f"the teacher returned {type(logits).__name__} "
                           f"{tuple(getattr(logits, 'shape', ()))}; expected logits (batch, positions, vocabulary)")
    return logits


def _finish(spec: str, kind: str, files: tuple[dict[str, Any], ...], model: nn.Module, tok: Any, option: str,
            cache: str = "off") -> LMTeacher:
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    model = model.eval().requires_grad_(False)
    cfg = getattr(model, "config", None)
    max_context = next((int(v) for k in _CONTEXT_KEYS if isinstance(v := getattr(cfg, k, None), int)), None)
    if max_context is None and isinstance(getattr(model, "max_context", None), int):
        max_context = int(model.max_context)  # type: ignore[arg-type]
    probe = torch.arange(4, dtype=torch.long).view(1, 4) % max(len(tok), 1)
    try:
        with torch.inference_mode():
            full = _logits_of(model(probe)).float()
    except TeacherError as e:
        raise TeacherError(f"{arg(option)} {spec}: {e}") from None
    except Exception as e:
        raise TeacherError(f"{arg(option)} {spec}: the model fails on token ids (1, 4) ({first_line(e)})") from None
    vocab = int(full.shape[-1])
    if len(tok) > vocab:
        raise TeacherError(f"{arg(option)} {spec}: the tokenizer has {len(tok)} ids but the model gives {vocab} "
                           "logits per position; they do not belong together")
    body, head = _split(model, probe, full)
    return LMTeacher(spec, kind, _combined_sha256(files), files, model, tok, vocab, max_context,
                     body is not None, cache, body, head)


def _split(model: nn.Module, probe: torch.Tensor, full: torch.Tensor) -> tuple[Any, Any]:
    """(body, head) of a Hugging Face causal LM when head(body(x)) reproduces model(x); else (None, None).

    The check catches architectures that transform logits after the head (soft-capping, scaling)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    body = getattr(model, "base_model", None)
    if not isinstance(head, nn.Module) or not isinstance(body, nn.Module) or body is model:
        return None, None
    try:
        with torch.inference_mode():
            z = head(body(input_ids=probe).last_hidden_state).float()
    except Exception:  # not the usual (base model -> hidden states -> head) shape: run the whole model instead
        return None, None
    return (body, head) if z.shape == full.shape and torch.allclose(z, full, rtol=1e-4, atol=1e-4) else (None, None)
