"""Tiny offline language-model fixtures, built once per test session (functools.cache) in a temporary directory:
a byte-level BPE tokenizer trained in-process with a ChatML chat template, a 2-layer Llama saved as a Hugging Face
directory (`hf:DIR`), the same weights written as an F32 GGUF file (`hf:FILE.gguf`), and factory teachers.
Nothing is downloaded; everything is seeded. Files built here are shared: tests must not modify them.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (unk, bos, eos = pad), as in SmolLM2
# SmolLM2's template shape: ChatML, a default system prompt, and no {% generation %} block (so the assistant mask
# must come from rendering prefixes, not from return_assistant_tokens_mask).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = [
    "The government said on Tuesday that the new rules would take effect next year.",
    "Fire crews worked through the night to contain the blaze near the town.",
    "The minister told reporters the talks had been useful but difficult.",
    "Shares rose sharply after the company reported higher profits for the quarter.",
    "Police said the man was arrested at the airport and charged with fraud.",
    "Heavy rain caused flooding in several parts of the city on Sunday.",
    "The team won the match by three goals, their best result this season.",
    "Scientists found that the new treatment reduced symptoms in most patients.",
    "You are a helpful assistant. What is the capital of France? Paris is the capital of France.",
    "Hello! How are you today? I am fine, thank you. Can you help me with a question?",
]
GGUF_NAME = "tiny-llama-f32.gguf"
_ROOT = Path(tempfile.mkdtemp(prefix="kdstore-lm-fixtures-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.cache
def tokenizer() -> Any:
    """A ~500-token byte-level BPE tokenizer (bos <|im_start|> 1, eos = pad <|im_end|> 2, unk <|endoftext|> 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXT * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIALS[1], eos_token=SPECIALS[2],
                                  pad_token=SPECIALS[2], unk_token=SPECIALS[0])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama(vocab_size: int, *, tied: bool = True, seed: int = 0, max_context: int = 128) -> nn.Module:
    """A seeded 2-layer Llama (hidden 32, 4 heads / 2 kv heads) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_context,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@functools.cache
def hf_dir() -> Path:
    """`hf:DIR` teacher: the Llama with its vocabulary padded to a multiple of 64 rows above len(tokenizer)."""
    from kdstore.lm_files import quiet

    d = _ROOT / "hf"
    tok = tokenizer()
    with quiet():
        llama(-(-len(tok) // 64) * 64).save_pretrained(d)
        tok.save_pretrained(d)
    return d


@functools.cache
def gguf_source() -> nn.Module:
    """The reference model written to `gguf_file()`: vocabulary = len(tokenizer), untied head."""
    return llama(len(tokenizer()), tied=False, seed=1)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Q/K projections (transformers undoes it when it reads a GGUF file)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.cache
def gguf_file() -> Path:
    """`hf:FILE.gguf` teacher: `gguf_source()` and the tokenizer written as an F32 GGUF with gguf.GGUFWriter."""
    import json

    import gguf

    tok, model = tokenizer(), gguf_source()
    cfg = model.config
    tj = json.loads(tok.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    path = _ROOT / "gguf" / GGUF_NAME
    path.parent.mkdir()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
             ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
             ("post_attention_layernorm", "ffn_norm")]
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{a}.weight": f"blk.{i}.{b}.weight" for a, b in parts})
    for k, v in model.state_dict().items():
        a = v.detach().float().numpy()
        if k.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        w.add_tensor(names[k], np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@functools.cache
def unsupported_gguf_file() -> Path:
    """A well-formed GGUF file of an architecture transformers does not know."""
    import gguf

    path = _ROOT / "bad" / "tiny-madeup.gguf"
    path.parent.mkdir()
    w = gguf.GGUFWriter(str(path), "madeuparch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------- factory teachers
class Bigram(nn.Module):
    """ids (B, L) -> logits (B, L, V) from the current token only: a model that is not a transformers model."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(vocab_size, 8)
        self.out = nn.Linear(8, vocab_size)
        self.max_context = 64

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def bigram_teacher() -> tuple[nn.Module, Any]:
    """Factory: (module, tokenizer object)."""
    return Bigram(len(tokenizer())), tokenizer()


def bigram_only() -> nn.Module:
    """Factory returning only the module (the tokenizer is passed separately)."""
    return Bigram(len(tokenizer()))


def sharp_bigram() -> tuple[nn.Module, Any]:
    """Factory: a bigram teacher over 512 ids (the tokenizer's ~500 padded) with logits scaled up, so its
    next-token distributions are far from uniform (a student visibly learns them; training tests)."""
    model = Bigram(512)
    with torch.no_grad():
        model.out.weight.mul_(8.0)
    return model, tokenizer()


def bigram_2000() -> tuple[nn.Module, Any]:
    """Factory: a bigram model with 2,000 logits (more than the top-k limit of 1,024; the tokenizer uses its first
    ~500 ids), for top-k = V, the full-vocabulary reference."""
    return Bigram(2000), tokenizer()


def llama_200k() -> tuple[nn.Module, Any]:
    """Factory: a transformers Llama with a 200,000-row vocabulary (the tokenizer uses its first ~500 ids)."""
    return _llama_200k(), tokenizer()


@functools.cache
def _llama_200k() -> nn.Module:
    return llama(200_000, max_context=64)


class SoftCapped(nn.Module):
    """A transformers-shaped model (config, base_model, output head) that transforms logits after the head, as
    Gemma 2 does: head(body(x)) is not its output, so it must not be run in chunks of the head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = llama(len(tokenizer()), seed=3)
        self.config = self.inner.config

    @property
    def base_model(self) -> nn.Module:
        return self.inner.model

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return 3.0 * torch.tanh(self.inner(input_ids=input_ids, attention_mask=attention_mask).logits / 3.0)


def soft_capped() -> tuple[nn.Module, Any]:
    return SoftCapped(), tokenizer()


def too_small_vocab() -> tuple[nn.Module, Any]:
    """Factory whose model has fewer logits than the tokenizer has ids."""
    return Bigram(16), tokenizer()


def not_a_module() -> Any:
    return "not a module"


def failing() -> Any:
    raise RuntimeError("boom")


# ---------------------------------------------------------------------------------------------- test helpers
def write_corpus(directory: Path) -> Path:
    """The test corpus (TEXT three times, one document per line) as DIRECTORY/news.txt."""
    p = Path(directory) / "news.txt"
    p.write_text("\n".join(TEXT * 3) + "\n", "utf-8")
    return p


def interrupt_in_epoch_2(monkeypatch: Any, train: Any) -> None:
    """Run `train()` with LMTrainer's second held-out measurement (the end of epoch 2, after epoch 1's checkpoint)
    raising KeyboardInterrupt, as a kill would; the measurement is restored afterwards."""
    import pytest

    from kdstore.lm_training import LMTrainer

    real, calls = LMTrainer.measure, {"n": 0}

    def dies_in_epoch_2(self: Any, model: Any, which: str) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, model, which)

    monkeypatch.setattr(LMTrainer, "measure", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(LMTrainer, "measure", real)


def feature_label_config(corpus: Path, out: Path, name: str, features: tuple[str, ...], **kw: Any) -> Any:
    """An `LMLabelConfig` of the tiny Llama teacher (`hf_dir`: 2 layers, hidden 32, 4 heads) capturing `features`:
    44 rows of 16 tokens in 9 shards of 5 rows, batches of 3, top-8."""
    from kdstore.lm_labeling import LMLabelConfig

    opts: dict[str, Any] = {"seq_len": 16, "top_k": 8, "batch_size": 3, "shard_rows": 5, "row_group_rows": 2,
                            "features": features, **kw}
    return LMLabelConfig(teacher=f"hf:{hf_dir()}", transfer=str(corpus), out=str(out), name=name, **opts)


def labeled(config: Any) -> Path:
    """`label_lm(config)`'s version directory."""
    from kdstore.lm_labeling import label_lm

    path = label_lm(config).path
    assert path is not None
    return Path(path)


def hinted_train_config(targets: Path, out: Path, hints: tuple[str, ...], **kw: Any) -> Any:
    """An `LMTrainConfig` of gpt:2-16-2 (2 blocks, 2 heads) with `hints`: 2 epochs, batches of 8, a quarter held out."""
    from kdstore.lm_training import LMTrainConfig

    opts: dict[str, Any] = {"student": "gpt:2-16-2", "epochs": 2, "batch_size": 8, "val_fraction": 0.25,
                            "hints": hints, **kw}
    return LMTrainConfig(targets=str(targets), out=str(out), **opts)


def interrupt_labeling(config: Any, after_rows: int = 23) -> None:
    """Run `label_lm(config)` until its progress passes `after_rows` rows, then interrupt it as a Ctrl-C would."""
    import pytest

    from kdstore.lm_labeling import label_lm

    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        if done[0] >= after_rows:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_lm(config, progress=progress)


def assert_hints_learned(out: Path, columns: tuple[str, ...], run: str = "topk-T1-a1") -> None:
    """A hinted run's per-epoch hint loss falls every epoch (by 20% overall), its saved student has no regressors
    and no wrapper prefix, and student.json lists the hinted feature columns."""
    import json

    from safetensors.torch import load_file

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    hint = [x["train_hint_loss"] for x in lines]
    assert hint == sorted(hint, reverse=True) and hint[-1] < 0.8 * hint[0]
    saved = load_file(str(out / "runs" / run / "student.safetensors"))
    assert not any(k.startswith(("regressors", "student.")) for k in saved)
    info = json.loads((out / "runs" / run / "student.json").read_text())
    assert [h["column"] for h in info["hints"]] == list(columns)


def assert_same_student(a: Path, b: Path, run: str = "topk-T1-a1") -> None:
    """Runs `a` and `b` saved the same student, bit for bit."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "runs" / run / "student.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
