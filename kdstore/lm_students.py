"""Language-model students: a built-in small causal transformer (`gpt:LAYERS-DIM-HEADS`), a
`package.module:factory`, or a Hugging Face config/model directory (`hf:DIR`), checked against the stored targets'
vocabulary and sequence length.

A student maps token ids (B, L) to logits (B, L, V) (or an output with ``.logits``). `lm_logits` calls it either way.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdstore.errors import StudentError, arg
from kdstore.students import build_model

_GPT_RE = re.compile(r"^gpt:(\d+)-(\d+)-(\d+)$")


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 / nanoGPT): causal self-attention, then a 4x GELU MLP.

    With ``keep_attention = True`` (TinyBERT's attention loss, `kdstore.lm_hints`) the attention is computed
    explicitly and its probabilities (B, heads, L, L) are kept in ``attention`` after each forward pass (with their
    graph); otherwise the fused ``scaled_dot_product_attention`` runs and nothing is kept.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.keep_attention = False
        self.attention: Tensor | None = None
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.keep_attention:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            self.attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            y = self.attention @ v
        else:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small causal transformer (nanoGPT's shape): token + learned position embeddings, `layers` pre-LN blocks,
    a final LayerNorm and an output head tied to the token embedding. Context = `max_context` positions."""

    def __init__(self, vocab_size: int, max_context: int, layers: int, dim: int, heads: int) -> None:
        super().__init__()
        self.vocab_size, self.max_context = vocab_size, max_context
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(n, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # type: ignore[no-any-return]


def lm_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The student's logits (B, L, V) for ids (B, L), whether it returns a tensor or an output with ``.logits``."""
    out = model(input_ids)
    return out if isinstance(out, Tensor) else out.logits


def _context(model: nn.Module) -> int | None:
    ctx = getattr(model, "max_context", None)
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if ctx is None and cfg is not None and isinstance(getattr(cfg, name, None), int):
            ctx = getattr(cfg, name)
    return int(ctx) if ctx is not None else None


def _hf_model(spec: str, path: Path, vocab_size: int) -> nn.Module:
    if not (path / "config.json").is_file():
        raise StudentError(f"{arg('student')} {spec}: no config.json in {path}; give a Hugging Face model or config "
                           "directory")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from kdstore.lm_files import quiet
    except ImportError:
        raise StudentError(f"{arg('student')} {spec}: needs transformers; pip install 'kdstore[lm]'") from None
    weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    try:
        with quiet():
            if weights:
                return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # type: ignore[no-any-return]
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))  # type: ignore[no-any-return]
    except Exception as e:
        raise StudentError(f"{arg('student')} {spec}: transformers cannot build it ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:160]})") from None


def build_lm_student(spec: str, vocab_size: int, seq_len: int) -> nn.Module:
    """Build a student for per-token targets over `vocab_size` ids in rows of `seq_len` tokens.

    Args:
        spec: ``gpt:LAYERS-DIM-HEADS`` (context = seq_len), ``hf:DIR`` (a Hugging Face config directory: a fresh
            model; with weights: that model) or ``package.module:factory`` (``factory()`` returns the module).
        vocab_size: the stored ``targets.vocab_size`` (the teacher's logits).
        seq_len: the stored ``targets.seq_len``.

    Raises:
        StudentError: a malformed spec, a vocabulary that is not `vocab_size` (both sizes named), a context shorter
            than `seq_len`, or a forward pass that fails.
    """
    m = _GPT_RE.match(spec)
    if m:
        layers, dim, heads = (int(g) for g in m.groups())
        if min(layers, dim, heads) < 1 or dim % heads:
            raise StudentError(f"{arg('student')} {spec}: LAYERS, DIM and HEADS must be >= 1 and DIM a multiple of "
                               "HEADS (e.g. gpt:2-128-4)")
        model: nn.Module = GPT(vocab_size, seq_len, layers, dim, heads)
    elif spec.startswith("hf:"):
        model = _hf_model(spec, Path(spec[3:]), vocab_size)
    elif spec.startswith(("mlp:", "cnn:")):
        raise StudentError(f"{arg('student')} {spec}: a classification student; per-token targets need a language "
                           "model: gpt:LAYERS-DIM-HEADS (e.g. gpt:2-128-4), hf:DIR or package.module:factory")
    else:
        try:
            model = build_model(spec)
        except StudentError as e:
            raise StudentError(f"{arg('student')} {e}; for per-token targets also gpt:LAYERS-DIM-HEADS or "
                               "hf:DIR") from None
    ctx = _context(model)
    if ctx is not None and ctx < seq_len:
        raise StudentError(f"{arg('student')} {spec}: its context is {ctx} tokens, shorter than the stored "
                           f"sequences of {seq_len}; give it a context >= {seq_len}")
    try:
        with torch.no_grad():
            out = lm_logits(model, torch.zeros(1, 2, dtype=torch.long))
    except Exception as e:
        raise StudentError(f"{arg('student')} {spec}: forward failed on token ids of shape (1, 2) "
                           f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})") from None
    if out.ndim != 3 or out.shape[:2] != (1, 2):
        raise StudentError(f"{arg('student')} {spec}: maps ids (1, 2) to {tuple(out.shape)}; expected logits "
                           "(batch, positions, vocabulary)")
    if out.shape[-1] != vocab_size:
        raise StudentError(f"{arg('student')} {spec}: its vocabulary has {out.shape[-1]} ids, the stored targets "
                           f"{vocab_size}; the student must predict the teacher's tokenizer ids")
    return model


def describe_lm_student(spec: str, model: nn.Module) -> dict[str, Any]:
    """student.json's description: the spec, parameters, context and how to load the weights."""
    return {"student": spec, "parameters": sum(p.numel() for p in model.parameters()),
            "context": _context(model),
            "load": "kdstore.lm_students.build_lm_student(student, vocab_size, seq_len).load_state_dict("
                    "safetensors.torch.load_file('student.safetensors'), strict=False)"}
