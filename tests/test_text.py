"""Text transfer sets: .txt / .jsonl / Parquet, text, chat and pre-tokenised ids; packing; masks; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdstore.errors import ConfigError, InputError
from kdstore.store.files import sha256_file
from kdstore.text import TokenizedCorpus, tokenize_corpus
from tests import lm_fixtures as lf

DOCS = lf.TEXT[:5]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And the team?"}, {"role": "assistant", "content": "They won the match."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hello, how can I help?"}],
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return lf.tokenizer()


def write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def jsonl(path: Path, objs: list[Any]) -> Path:
    return write_lines(path, [json.dumps(o) for o in objs])


def real(c: TokenizedCorpus, r: int, mask: np.ndarray | None = None) -> list[int]:
    m = c.attention_mask[r] if mask is None else mask[r]
    return c.input_ids[r][m == 1].tolist()


def test_txt_concat_packing(tmp_path: Path, tok: Any) -> None:
    p = write_lines(tmp_path / "docs.txt", [DOCS[0], "", "   ", *DOCS[1:]])
    c = tokenize_corpus(p, tok, seq_len=16, max_context=128)
    encoded = [tok(d).input_ids + [2] for d in DOCS]  # no BOS from this tokenizer; EOS (2) after each document
    stream = [t for d in encoded for t in d]
    assert c.rows == -(-len(stream) // 16) and c.input_ids.dtype == np.int32 and c.input_ids.shape == (c.rows, 16)
    assert c.input_ids.reshape(-1)[:len(stream)].tolist() == stream
    assert c.input_ids.reshape(-1)[len(stream):].tolist() == [2] * (c.rows * 16 - len(stream))  # pad = eos
    assert c.attention_mask.sum() == c.tokens == len(stream) and np.array_equal(c.loss_mask, c.attention_mask)
    assert np.array_equal(c.target_mask(), c.attention_mask)
    assert c.doc_starts.tolist() == np.cumsum([0] + [len(d) for d in encoded[:-1]]).tolist()
    d = c.describe()
    assert d["sha256"] == sha256_file(p) and (d["format"], d["source"], d["documents"], d["rows"]) == (
        "txt", "text", 5, c.rows)
    assert d["packing"] == {"policy": "concat", "prefix": [], "separator": 2, "pad_id": 2, "padding": "right"}
    json.dumps(d)


def test_long_documents_are_cut_silently(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from transformers import PreTrainedTokenizerFast

    short = PreTrainedTokenizerFast(tokenizer_object=lf.tokenizer().backend_tokenizer, eos_token="<|im_end|>",
                                    model_max_length=8)
    c = tokenize_corpus(write_lines(tmp_path / "d.txt", DOCS), short, seq_len=8)
    assert c.rows > len(DOCS) and capfd.readouterr().err == ""  # no "longer than model_max_length" log


def test_txt_document_packing(tmp_path: Path, tok: Any) -> None:
    p = write_lines(tmp_path / "docs.txt", DOCS)
    c = tokenize_corpus(p, tok, seq_len=32, packing="document")
    assert c.rows == 5 and c.doc_starts.tolist() == [0, 32, 64, 96, 128]
    for r, doc in enumerate(DOCS):
        assert real(c, r) == tok(doc).input_ids + [2]
    with pytest.raises(InputError, match=r"docs.txt line 1: \d+ tokens do not fit a row of seq_len 8; raise seq_len"):
        tokenize_corpus(p, tok, seq_len=8, packing="document")
    with pytest.raises(InputError, match=r"line 1: \d+ tokens, longer than the teacher's context \(8\)"):
        tokenize_corpus(p, tok, seq_len=8, packing="document", max_context=8)


def test_bos_added_by_the_tokenizer_starts_every_document(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(lf.tokenizer().backend_tokenizer.to_str())
    tk.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    llama_style = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>")
    c = tokenize_corpus(write_lines(tmp_path / "d.txt", DOCS[:2]), llama_style, seq_len=64)
    assert c.describe()["packing"]["prefix"] == [1]
    flat = c.input_ids.reshape(-1)
    assert flat[c.doc_starts].tolist() == [1, 1] and real(c, 0)[:c.tokens] == [
        t for d in DOCS[:2] for t in [1, *lf.tokenizer()(d).input_ids, 2]]


def test_latin1_text(tmp_path: Path, tok: Any) -> None:
    p = write_lines(tmp_path / "lee.cor", [DOCS[0], "It cost £5 million."], encoding="latin-1")
    with pytest.raises(InputError, match=r"lee.cor line 2: not valid utf-8 \(byte 0xa3 at byte 9 of the line\); "
                                         r"pass encoding latin-1"):
        tokenize_corpus(p, tok, seq_len=16)
    c = tokenize_corpus(p, tok, seq_len=16, encoding="latin-1")
    assert "£5" in tok.decode(c.input_ids.reshape(-1)[c.doc_starts[1]:c.tokens])
    assert c.describe()["encoding"] == "latin-1"
    with pytest.raises(ConfigError, match=r"encoding 'klingon': unknown text encoding"):
        tokenize_corpus(p, tok, seq_len=16, encoding="klingon")


def test_jsonl_text_fields(tmp_path: Path, tok: Any) -> None:
    p = jsonl(tmp_path / "t.jsonl", [{"text": d, "body": d.upper()} for d in DOCS])
    assert tokenize_corpus(p, tok, seq_len=16).input_ids.reshape(-1)[:5].tolist() == tok(DOCS[0]).input_ids[:5]
    c = tokenize_corpus(p, tok, seq_len=16, field="body")
    assert (c.field, c.source) == ("body", "text") and c.doc_starts.shape == (5,)
    with pytest.raises(InputError, match=r"field 'title': .*t.jsonl line 1 has no such field; its fields are"):
        tokenize_corpus(p, tok, seq_len=16, field="title")
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "a"}), "{oops"])
    with pytest.raises(InputError, match=r"bad.jsonl line 2: not valid JSON"):
        tokenize_corpus(bad, tok, seq_len=16)
    nums = jsonl(tmp_path / "n.jsonl", [{"text": 5}])
    with pytest.raises(InputError, match=r"n.jsonl line 1: the text is a int; expected a string"):
        tokenize_corpus(nums, tok, seq_len=16)


def test_chat_masks_cover_the_assistant_turns(tmp_path: Path, tok: Any) -> None:
    c = tokenize_corpus(jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS]), tok, seq_len=96)
    assert (c.source, c.packing, c.rows) == ("chat", "document", 2)
    for r, msgs in enumerate(CHATS):
        assert tok.decode(real(c, r)) == tok.apply_chat_template(msgs, tokenize=False)
        want = "".join(m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant")
        assert tok.decode(real(c, r, c.loss_mask)) == want
        # target positions predict exactly the assistant's tokens
        t = c.target_mask()[r]
        assert t[:-1].tolist() == c.loss_mask[r, 1:].tolist() and t[-1] == 0
    assert tok.decode(real(c, 0)).startswith("<|im_start|>system\nYou are a helpful assistant.")  # default system
    assert c.describe()["loss_tokens"] == int(c.loss_mask.sum()) < c.tokens


def test_chat_errors(tmp_path: Path, tok: Any) -> None:
    p = jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[1]}, {"messages": CHATS[1][:2]}])
    with pytest.raises(InputError, match=r"c.jsonl line 2: the conversation has no assistant turn"):
        tokenize_corpus(p, tok, seq_len=96)
    ok = jsonl(tmp_path / "ok.jsonl", [{"messages": m} for m in CHATS])
    with pytest.raises(ConfigError, match=r"packing 'concat': chat conversations are one per row"):
        tokenize_corpus(ok, tok, seq_len=96, packing="concat")
    with pytest.raises(InputError, match=r"ok.jsonl line 1: \d+ tokens do not fit a row of seq_len 16"):
        tokenize_corpus(ok, tok, seq_len=16)
    bad = jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(InputError, match=r"bad.jsonl line 1: messages must be a list of"):
        tokenize_corpus(bad, tok, seq_len=96)
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(InputError, match=r"ok.jsonl line 1: the teacher's tokenizer has no chat template"):
        tokenize_corpus(ok, plain, seq_len=96)


def test_parquet_text_ids_and_chat(tmp_path: Path, tok: Any) -> None:
    ids = [tok(d).input_ids for d in DOCS]
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"doc": DOCS, "n": list(range(5))}), p)
    c = tokenize_corpus(p, tok, seq_len=16)  # the only string column
    assert (c.format, c.source, c.field, c.encoding) == ("parquet", "text", "doc", None)
    q = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32()))}), q)
    c = tokenize_corpus(q, tok, seq_len=32)  # verbatim, one row each, nothing added
    assert (c.source, c.packing, c.rows) == ("input_ids", "document", 5)
    assert [real(c, r) for r in range(5)] == ids and c.describe()["packing"]["separator"] is None
    assert tokenize_corpus(q, tok, seq_len=8, packing="concat").input_ids.reshape(-1)[:c.tokens].tolist() == [
        t for d in ids for t in d]
    m = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": CHATS}), m)
    c = tokenize_corpus(m, tok, seq_len=96)
    assert c.source == "chat" and tok.decode(real(c, 1, c.loss_mask)) == "Hello, how can I help?<|im_end|>\n"


def test_parquet_errors(tmp_path: Path, tok: Any) -> None:
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": ["x"], "b": ["y"], "n": [1]}), p)
    with pytest.raises(InputError, match=r"t.parquet: no input_ids, messages or text column; columns are "
                                         r"\['a', 'b', 'n'\]; pass field"):
        tokenize_corpus(p, tok, seq_len=8)
    with pytest.raises(InputError, match=r"field 'z': .* has no such column"):
        tokenize_corpus(p, tok, seq_len=8, field="z")
    with pytest.raises(InputError, match=r"field 'n' in .* has type int64; expected text"):
        tokenize_corpus(p, tok, seq_len=8, field="n")
    q = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 700]]}), q)
    with pytest.raises(InputError, match=r"ids.parquet row 0: token ids in \[1, 700\]; the teacher's vocabulary is "
                                         r"0..499"):
        tokenize_corpus(q, tok, seq_len=8)
    assert tokenize_corpus(q, tok, seq_len=8, vocab_size=1024).tokens == 3
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"junk.parquet: cannot read it as Parquet"):
        tokenize_corpus(junk, tok, seq_len=8)


@pytest.mark.parametrize(
    ("name", "content", "kw", "err", "match"),
    [
        ("e.txt", "\n \n", {}, InputError, r"e.txt: the corpus is empty \(no non-empty text\)"),
        ("e.jsonl", "", {}, InputError, r"e.jsonl: the corpus is empty \(no JSON lines\)"),
        ("d.txt", "a\n", {"seq_len": 256, "max_context": 128}, ConfigError,
         r"seq_len 256: the teacher's context is 128 tokens; use a seq_len <= 128"),
        ("d.txt", "a\n", {"seq_len": 1}, ConfigError, r"seq_len 1: must be >= 2"),
        ("d.txt", "a\n", {"packing": "zip"}, ConfigError, r"packing 'zip': expected one of concat, document"),
        ("d.csv", "a\n", {}, InputError, r"d.csv: unknown text file type '.csv'"),
    ],
)
def test_bad_input(tmp_path: Path, tok: Any, name: str, content: str, kw: dict, err: type, match: str) -> None:
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(err, match=match):
        tokenize_corpus(p, tok, **{"seq_len": 8, **kw})


def test_missing_file(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(InputError, match=r"transfer .*nope.txt: file not found"):
        tokenize_corpus(tmp_path / "nope.txt", tok, seq_len=8)
