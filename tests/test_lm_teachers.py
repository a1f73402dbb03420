"""Language-model teachers: hf:DIR, hf:FILE.gguf and factories; fingerprints; chunked logits; one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdstore.errors import ConfigError, TeacherError
from kdstore.lm_files import tokenizer_fingerprint
from kdstore.lm_teachers import LMTeacher, load_lm_teacher
from kdstore.store.files import sha256_file
from kdstore.teachers import state_dict_sha256
from tests import lm_fixtures as lf

SENTENCE = "The government said on Tuesday that the talks had been useful."


@pytest.fixture(scope="module")
def hf_teacher() -> LMTeacher:
    return load_lm_teacher(f"hf:{lf.hf_dir()}")


@pytest.fixture(scope="module")
def gguf_teacher() -> LMTeacher:
    return load_lm_teacher(f"hf:{lf.gguf_file()}")


def ids_of(text: str = SENTENCE, rows: int = 2) -> torch.Tensor:
    return torch.tensor([lf.tokenizer()(text).input_ids] * rows)


def chunked(t: LMTeacher, x: torch.Tensor, chunk: int) -> torch.Tensor:
    parts = list(t.iter_logits(x, positions_per_chunk=chunk))
    assert [s for s, _ in parts] == list(range(0, x.shape[1], chunk))
    assert all(z.dtype == torch.float32 and z.shape[1] <= chunk for _, z in parts)
    return torch.cat([z for _, z in parts], 1)


def test_hf_dir_teacher_and_fingerprint(hf_teacher: LMTeacher) -> None:
    t = hf_teacher
    assert (t.kind, t.vocab_size, len(t.tokenizer), t.max_context, t.chunked_head) == ("hf", 512, 500, 128, True)
    assert not t.module.training and all(p.dtype == torch.float32 for p in t.module.parameters())
    assert t.sha256 == sha256_file(lf.hf_dir() / "model.safetensors")
    fp = t.tokenizer_fingerprint()
    assert (fp["size"], fp["base_vocab_size"], fp["model_vocab_size"]) == (500, 500, 512)  # 12 padding rows
    assert fp["special_tokens"] == {"bos": {"id": 1, "token": "<|im_start|>"}, "eos": {"id": 2, "token": "<|im_end|>"},
                                    "pad": {"id": 2, "token": "<|im_end|>"}, "unk": {"id": 0, "token": "<|endoftext|>"}}
    assert fp["chat_template"]["present"] and fp["chat_template"]["text"] == lf.CHAT_TEMPLATE
    assert fp == tokenizer_fingerprint(lf.tokenizer(), 512)  # the same tokenizer saved and reloaded
    d = t.describe("t0")
    json.dumps(d)  # JSON-serialisable
    assert (d["id"], d["kind"], d["architecture"], d["vocab_size"], d["max_context"]) == ("t0", "hf", "llama", 512, 128)
    assert d["files"] == [{"name": "model.safetensors", "sha256": t.sha256,
                           "bytes": (lf.hf_dir() / "model.safetensors").stat().st_size}]
    assert d["libraries"]["transformers"] and d["tokenizer"] == fp


def test_fingerprint_changes_with_the_vocabulary(hf_teacher: LMTeacher) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=lf.tokenizer().backend_tokenizer, eos_token="<|im_end|>")
    tok.add_tokens(["<extra>"])
    a, b = hf_teacher.tokenizer_fingerprint(), tokenizer_fingerprint(tok)
    assert a["sha256"] != b["sha256"] and a["vocab_sha256"] != b["vocab_sha256"] and b["size"] == 501
    assert b["chat_template"] == {"present": False, "sha256": None, "text": None} and b["special_tokens"]["bos"] is None


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_iter_logits_equals_the_full_forward(hf_teacher: LMTeacher, chunk: int) -> None:
    x = ids_of()
    with torch.inference_mode():
        full = hf_teacher.module(x).logits
    z = chunked(hf_teacher, x, chunk)
    assert z.shape == (2, x.shape[1], 512)
    torch.testing.assert_close(z, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_iter_logits_into_a_buffer_gives_the_same_bits(hf_teacher: LMTeacher, chunk: int) -> None:
    x = ids_of(rows=3)
    n = x.shape[1]
    fresh = [(s, z.clone()) for s, z in hf_teacher.iter_logits(x, positions_per_chunk=chunk)]
    buf = torch.full((3 * min(n, chunk) * 512 + 7,), float("nan"))  # larger than needed, and dirty
    into = []
    for s, z in hf_teacher.iter_logits(x, positions_per_chunk=chunk, out=buf):
        assert z.data_ptr() == buf.data_ptr() and z.is_contiguous()  # written in place, every chunk
        into.append((s, z.clone()))
    assert [s for s, _ in into] == [s for s, _ in fresh]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(into, fresh, strict=True))  # the last chunk is shorter


def test_linear_into_equals_the_module() -> None:
    from kdstore.lm_teachers import _linear_into

    torch.manual_seed(0)
    h = torch.randn(3, 7, 24)
    for head in (torch.nn.Linear(24, 1000, bias=False), torch.nn.Linear(24, 1000)):
        out = torch.empty(3 * 7 * 1000 + 5)
        with torch.inference_mode():
            assert torch.equal(_linear_into(head, h, out), head(h))


def test_right_padding_leaves_real_positions_unchanged(hf_teacher: LMTeacher) -> None:
    x = ids_of(rows=1)
    padded = torch.cat([x, torch.full((1, 5), 2)], 1)
    mask = torch.cat([torch.ones_like(x), torch.zeros(1, 5, dtype=torch.long)], 1)
    alone = chunked(hf_teacher, x, 4)
    n = x.shape[1]
    torch.testing.assert_close(chunked(hf_teacher, padded, 4)[:, :n], alone, rtol=1e-5, atol=1e-5)
    zs = torch.cat([z for _, z in hf_teacher.iter_logits(padded, mask, positions_per_chunk=4)], 1)
    torch.testing.assert_close(zs[:, :n], alone, rtol=1e-5, atol=1e-5)


def test_gguf_teacher_matches_its_source(gguf_teacher: LMTeacher) -> None:
    t = gguf_teacher
    assert (t.kind, t.vocab_size, t.max_context, t.cache) == ("gguf", 500, 128, "off")
    assert t.sha256 == sha256_file(lf.gguf_file()) and t.files[0]["name"] == lf.GGUF_NAME
    assert t.tokenizer(SENTENCE).input_ids == lf.tokenizer()(SENTENCE).input_ids
    x = ids_of()
    with torch.inference_mode():
        ref = lf.gguf_source()(x).logits
    torch.testing.assert_close(chunked(t, x, 5), ref, rtol=1e-5, atol=1e-5)
    fp, src = t.tokenizer_fingerprint(), tokenizer_fingerprint(lf.tokenizer(), 500)
    # Same vocabulary, merges, specials and template; the GGUF reader writes the BPE model's options differently.
    for k in ("size", "vocab_sha256", "special_tokens", "chat_template"):
        assert fp[k] == src[k], k


def test_gguf_cache_of_the_dequantised_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               gguf_teacher: LMTeacher) -> None:
    monkeypatch.setenv("KDSTORE_CACHE", str(tmp_path))
    first = load_lm_teacher(f"hf:{lf.gguf_file()}", cache=True)
    second = load_lm_teacher(f"hf:{lf.gguf_file()}", cache=True)
    assert (first.cache, second.cache) == ("written", "hit")
    assert len(list((tmp_path / "lm-teachers").iterdir())) == 1
    assert second.sha256 == gguf_teacher.sha256 and second.kind == "gguf"
    assert second.tokenizer_fingerprint() == first.tokenizer_fingerprint()
    x = ids_of()
    assert torch.equal(chunked(second, x, 8), chunked(gguf_teacher, x, 8))


def test_200k_vocabulary_is_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    t = load_lm_teacher("tests.lm_fixtures:llama_200k")
    assert (t.kind, t.vocab_size, len(t.tokenizer), t.chunked_head) == ("factory", 200_000, 500, True)
    widths: list[tuple[int, ...]] = []
    hook = t.module.get_output_embeddings().register_forward_hook(lambda m, i, o: widths.append(tuple(o.shape)))
    x = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    z = chunked(t, x, 4)
    hook.remove()
    assert widths == [(2, 4, 200_000)] * 4  # never (2, 16, 200000) at once
    with torch.inference_mode():
        torch.testing.assert_close(z, t.module(x).logits, rtol=1e-5, atol=1e-5)
    assert t.tokenizer_fingerprint()["model_vocab_size"] == 200_000


def test_factory_teachers() -> None:
    t = load_lm_teacher("tests.lm_fixtures:bigram_teacher")
    assert (t.kind, t.vocab_size, t.max_context, t.chunked_head) == ("factory", 500, 64, False)
    assert t.sha256 == state_dict_sha256(t.module) and t.describe("t1")["architecture"] == "Bigram"
    x = ids_of()
    with torch.inference_mode():
        assert torch.equal(chunked(t, x, 3), t.module(x))
    only = load_lm_teacher("tests.lm_fixtures:bigram_only", tokenizer=str(lf.hf_dir()))
    assert only.tokenizer_fingerprint()["sha256"] == t.tokenizer_fingerprint()["sha256"]
    assert load_lm_teacher("tests.lm_fixtures:bigram_only", tokenizer=str(lf.gguf_file())).vocab_size == 500


def test_a_model_that_changes_logits_after_its_head_runs_whole() -> None:
    t = load_lm_teacher("tests.lm_fixtures:soft_capped")
    assert not t.chunked_head and t.max_context == 128
    x = ids_of()
    with torch.inference_mode():
        assert torch.equal(chunked(t, x, 4), t.module(x))


def _without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst)
    for n in names:
        (dst / n).unlink()
    return dst


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("hf:/no/such/dir", r"teacher hf:/no/such/dir: no such directory"),
        ("hf:/no/such/model.gguf", r"teacher hf:/no/such/model.gguf: no such file"),
        ("teacher.pt", r"not a language-model teacher; expected hf:DIR"),
        ("tests.no_such_module:f", r"cannot import 'f' from 'tests.no_such_module'"),
        ("tests.lm_fixtures:failing", r"calling failing\(\) failed \(RuntimeError: boom\)"),
        ("tests.lm_fixtures:not_a_module", r"not_a_module\(\) returned str; expected an nn.Module"),
        ("tests.lm_fixtures:bigram_only", r"no tokenizer; return \(model, tokenizer\) .* or pass tokenizer"),
        ("tests.lm_fixtures:too_small_vocab", r"the tokenizer has 500 ids but the model gives 16 logits"),
    ],
)
def test_load_errors(spec: str, match: str) -> None:
    with pytest.raises(TeacherError, match=match):
        load_lm_teacher(spec)


def test_hf_dir_without_tokenizer_or_config(tmp_path: Path) -> None:
    d = _without(lf.hf_dir(), tmp_path / "a", "tokenizer.json")
    with pytest.raises(TeacherError, match=r"the directory has no tokenizer \(tokenizer.json, .*save_pretrained"):
        load_lm_teacher(f"hf:{d}")
    d = _without(lf.hf_dir(), tmp_path / "b", "config.json", "model.safetensors")
    with pytest.raises(TeacherError, match=r"has no config.json, no weights \(\*.safetensors"):
        load_lm_teacher(f"hf:{d}")
    d = _without(lf.hf_dir(), tmp_path / "c")
    (d / "config.json").write_text("{not json")
    with pytest.raises(TeacherError, match=r"transformers cannot load it \("):
        load_lm_teacher(f"hf:{d}")


def test_gguf_the_installed_libraries_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match=r"the installed transformers .* gguf .* cannot read it .*madeuparch"):
        load_lm_teacher(f"hf:{lf.unsupported_gguf_file()}")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(TeacherError, match=r"junk.gguf: the installed transformers .* cannot read it"):
        load_lm_teacher(f"hf:{junk}")


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_gguf_needs_its_packages(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    with pytest.raises(TeacherError, match=rf"needs the package\(s\) {package}; pip install 'kdstore\[lm\]'"):
        load_lm_teacher(f"hf:{lf.gguf_file()}")


@pytest.mark.parametrize(
    ("x", "kw", "match"),
    [
        (torch.zeros(5, dtype=torch.long), {}, r"input_ids of shape \(5,\): expected \(batch, positions\)"),
        (torch.zeros(1, 5, dtype=torch.long), {"positions_per_chunk": 0}, r"positions_per_chunk 0: must be >= 1"),
        (torch.full((1, 5), 512), {}, r"token ids in \[512, 512\]: the teacher's vocabulary is 0..511"),
        (torch.zeros(1, 129, dtype=torch.long), {}, r"129 positions per row: the teacher's context is 128"),
        (torch.zeros(1, 5, dtype=torch.long), {"attention_mask": torch.ones(1, 4)}, r"attention_mask of shape"),
        (torch.zeros(2, 5, dtype=torch.long), {"out": torch.empty(2 * 5 * 512 - 1)}, r"the chunks need 5120 contig"),
        (torch.zeros(1, 5, dtype=torch.long), {"out": torch.empty(5 * 512, dtype=torch.float64)}, r"float64"),
        (torch.zeros(1, 5, dtype=torch.long), {"out": torch.empty(2, 5 * 512)[:, ::2]}, r"contiguous float32"),
    ],
)
def test_iter_logits_errors(hf_teacher: LMTeacher, x: torch.Tensor, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        next(hf_teacher.iter_logits(x, **kw))


def test_kdstore_does_not_import_transformers() -> None:
    code = ("import sys\nfrom click.testing import CliRunner\nimport kdstore, kdstore.lm_teachers, kdstore.text, "
            "kdstore.sampling, kdstore.labeling, kdstore.training\nfrom kdstore.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('transformers', 'gguf', 'accelerate', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
