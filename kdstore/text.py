"""Text transfer sets for language-model teachers: read documents or chat conversations, tokenise them with the
teacher's tokenizer and lay them out as fixed rows of `seq_len` tokens (see docs/lm.md, "Text transfer sets").

Files: ``.txt`` (also ``.text``, ``.cor``): one document per line, blank lines skipped. ``.jsonl``: one JSON object
per line with a text field, or chat ``messages`` ([{"role", "content"}, ...]). Parquet: a string column, a chat
``messages`` column (list of {role, content}), or a pre-tokenised ``input_ids`` list column (used verbatim).

Packing. ``concat`` (the default for text): each document is encoded the way the tokenizer encodes a text on its
own (``add_special_tokens=True``: a Llama-style BOS appears at every document start, a GPT-2/SmolLM-style tokenizer
adds nothing), followed by EOS; the documents are concatenated in file order and cut into rows of `seq_len`; only
the last row is padded. No position is wasted on padding and a row's content does not depend on batching.
``document`` (the only choice for chat, the default for pre-tokenised ids): one document or conversation per row,
padded on the right; a longer one is an error. A conversation is rendered with the chat template exactly as the
teacher would see it, so its targets are never conditioned on an unrelated conversation and its mask is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdstore.errors import ConfigError, InputError, arg
from kdstore.store.files import sha256_file
from kdstore.text_files import SUFFIXES, read_documents

PACKINGS = ("concat", "document")
_BATCH = 1024  # documents per tokenizer call


@dataclass(frozen=True)
class TokenizedCorpus:
    """A tokenised, packed text transfer set. Create with `tokenize_corpus`.

    Row r holds tokens ``input_ids[r, :]``; padding (``pad_id``) only at the right end of a row. ``loss_mask``
    marks the counted tokens: every real token of a text, the assistant's tokens of a chat (its content and end
    marker, as the template renders them). ``doc_starts`` holds each document's first token as a flat index
    ``row * seq_len + position``.
    """

    path: Path
    format: str  # txt | jsonl | parquet
    source: str  # text | chat | input_ids
    field: str | None
    encoding: str | None
    seq_len: int
    packing: str
    input_ids: np.ndarray  # int32 (rows, seq_len)
    attention_mask: np.ndarray  # uint8 (rows, seq_len)
    loss_mask: np.ndarray  # uint8 (rows, seq_len)
    doc_starts: np.ndarray  # int64 (documents,)
    skipped_empty: int
    prefix: tuple[int, ...]  # ids the tokenizer puts before each text document (e.g. BOS)
    separator: int | None  # id appended after each text document (EOS)
    pad_id: int
    sha256: str

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def documents(self) -> int:
        return int(self.doc_starts.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def target_mask(self) -> np.ndarray:
        """uint8 (rows, seq_len): positions whose teacher distribution (of the next token) is a target.

        Text: every real position. Chat: position t when token t + 1 of the row is an assistant token, i.e. the
        positions that predict the assistant's tokens.
        """
        if self.source != "chat":
            return self.attention_mask.copy()
        m = np.zeros_like(self.loss_mask)
        m[:, :-1] = self.loss_mask[:, 1:]
        return m

    def describe(self) -> dict[str, Any]:
        """The manifest's `transfer_set` entry."""
        return {
            "path": str(self.path.resolve()), "sha256": self.sha256, "format": self.format, "source": self.source,
            "field": self.field, "encoding": self.encoding, "documents": self.documents,
            "skipped_empty": self.skipped_empty, "tokens": self.tokens, "loss_tokens": int(self.loss_mask.sum()),
            "rows": self.rows, "seq_len": self.seq_len,
            "packing": {"policy": self.packing, "prefix": list(self.prefix), "separator": self.separator,
                        "pad_id": self.pad_id, "padding": "right"},
        }


def tokenize_corpus(path: str | Path, tokenizer: Any, *, seq_len: int, field: str | None = None,
                    packing: str | None = None, encoding: str = "utf-8", max_context: int | None = None,
                    vocab_size: int | None = None, option: str = "transfer") -> TokenizedCorpus:
    """Read a text transfer set, tokenise it with `tokenizer` and pack it into rows of `seq_len` tokens.

    Args:
        path: a .txt/.text/.cor, .jsonl or .parquet file.
        tokenizer: the teacher's Hugging Face tokenizer.
        seq_len: tokens per row.
        field: the text field/column, ``messages`` for chat, or ``input_ids`` (Parquet, pre-tokenised); default:
            ``messages`` if present, else ``text`` (.jsonl); ``input_ids``, ``messages``, ``text``, or the only
            string column (Parquet).
        packing: ``concat`` or ``document`` (see the module docstring); default by source.
        encoding: of .txt and .jsonl files (e.g. ``latin-1``).
        max_context: the teacher's context length; `seq_len` may not exceed it.
        vocab_size: pre-tokenised ids must lie in [0, vocab_size); default len(tokenizer).
        option: the argument named in error messages.

    Raises:
        ConfigError: bad seq_len or packing. InputError: unreadable, undecodable or empty file, missing field,
            a chat without assistant turns, a document longer than a row (``document`` packing).
    """
    p = Path(path)
    fmt = _check_request(p, seq_len, packing, max_context, option)
    source, used, items = read_documents(p, fmt, field, encoding, option)
    packing = packing or ("concat" if source == "text" else "document")
    if source == "chat" and packing != "document":
        raise ConfigError(f"{arg('packing')} {packing!r}: chat conversations are one per row, never split or packed "
                          "together; use document")
    nonempty = [(w, x) for w, x in items if len(x)]
    if not nonempty:
        raise InputError(f"{arg(option)} {p}: the corpus is empty (no non-empty {source}); it needs at least one")
    pad = _pad_id(tokenizer)
    docs, masks, prefix, sep = _encode_documents(tokenizer, source, nonempty, p, vocab_size, option)
    wheres = [w for w, _ in nonempty]
    if packing == "concat":
        ids, att, lm, starts = _pack_concat(docs, masks, seq_len, pad)
    else:
        ids, att, lm, starts = _pack_document(docs, masks, wheres, seq_len, pad, max_context, f"{p}", option)
    return TokenizedCorpus(p, fmt, source, used, encoding if fmt != "parquet" else None, seq_len, packing, ids, att,
                           lm, starts, len(items) - len(nonempty), prefix, sep, pad, sha256_file(p))


def _check_request(p: Path, seq_len: int, packing: str | None, max_context: int | None, option: str) -> str:
    """The corpus file's format (from its suffix), after checking the request: a known suffix, 2 <= seq_len <=
    max_context, a known packing, an existing file."""
    fmt = SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise InputError(f"{arg(option)} {p}: unknown text file type {p.suffix!r}; expected one of "
                         f"{', '.join(sorted(SUFFIXES))}")
    if seq_len < 2:
        raise ConfigError(f"{arg('seq_len')} {seq_len}: must be >= 2")
    if max_context is not None and seq_len > max_context:
        raise ConfigError(f"{arg('seq_len')} {seq_len}: the teacher's context is {max_context} tokens; use a "
                          f"{arg('seq_len')} <= {max_context}")
    if packing is not None and packing not in PACKINGS:
        raise ConfigError(f"{arg('packing')} {packing!r}: expected one of {', '.join(PACKINGS)}")
    if not p.is_file():
        raise InputError(f"{arg(option)} {p}: file not found; check the path")
    return fmt


def _encode_documents(tokenizer: Any, source: str, nonempty: list[tuple[str, Any]], p: Path, vocab_size: int | None,
                      option: str) -> tuple[list[np.ndarray], list[np.ndarray], tuple[int, ...], int | None]:
    """(token ids, loss masks, the tokenizer's added prefix, the separator) per document: text encoded with the
    teacher's tokenizer, chats by turns (assistant tokens only in the mask), pre-tokenised ids checked against the
    vocabulary."""
    prefix: tuple[int, ...] = ()
    sep: int | None = None
    if source == "text":
        prefix, sep = _added_prefix(tokenizer), getattr(tokenizer, "eos_token_id", None)
        with _quiet():  # "sequence longer than model_max_length" is logged per long document; rows are cut below
            docs = _encode_texts(tokenizer, [x for _, x in nonempty], sep)
        masks = [np.ones(len(d), np.uint8) for d in docs]
    elif source == "chat":
        docs, masks = [], []
        with _quiet():
            for where, messages in nonempty:
                d, m = _encode_chat(tokenizer, messages, f"{p} {where}")
                docs.append(d)
                masks.append(m)
    else:
        limit = vocab_size if vocab_size is not None else len(tokenizer)
        docs = []
        for where, ids in nonempty:
            a = np.asarray(ids, dtype=np.int64)
            if a.min() < 0 or a.max() >= limit:
                raise InputError(f"{arg(option)} {p} {where}: token ids in [{a.min()}, {a.max()}]; the teacher's "
                                 f"vocabulary is 0..{limit - 1}; tokenise with the teacher's tokenizer")
            docs.append(a.astype(np.int32))
        masks = [np.ones(len(d), np.uint8) for d in docs]
    return docs, masks, prefix, sep


# ---------------------------------------------------------------------------------------------- tokenising
def _quiet() -> Any:
    """transformers' logs silenced (the library never prints), if transformers is what tokenises."""
    import contextlib
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return contextlib.nullcontext()
    from kdstore.lm_files import quiet

    return quiet()


def _pad_id(tok: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    return 0


def _added_prefix(tok: Any) -> tuple[int, ...]:
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    n = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
    return tuple(int(x) for x in full[:n])


def _encode_texts(tok: Any, texts: list[str], sep: int | None) -> list[np.ndarray]:
    out = []
    for s in range(0, len(texts), _BATCH):
        for ids in tok(texts[s:s + _BATCH], add_special_tokens=True)["input_ids"]:
            if sep is not None and (not ids or ids[-1] != sep):
                ids = [*ids, sep]
            out.append(np.asarray(ids, dtype=np.int32))
    return out


def _render(tok: Any, messages: list[dict[str, str]], where: str, gen: bool = False) -> str:
    try:
        return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))
    except Exception as e:  # jinja errors in the template (e.g. it demands alternating roles)
        raise InputError(f"{where}: the chat template fails on this conversation ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]})") from None


def _encode_chat(tok: Any, messages: list[dict[str, str]], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation and the mask of the assistant's tokens, by rendering prefixes.

    return_assistant_tokens_mask needs a {% generation %} block that most templates (SmolLM2's) lack, and then
    silently returns zeros. Instead assistant turn i covers the tokens between render(messages[:i], generation
    prompt) and render(messages[:i+1]); both must be prefixes of the whole rendering, as text and as tokens."""
    if not getattr(tok, "chat_template", None):
        raise InputError(f"{where}: the teacher's tokenizer has no chat template; chat transfer sets need one")
    text = _render(tok, messages, where)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    mask = np.zeros(len(ids), np.uint8)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = _render(tok, messages[:i], where, gen=True), _render(tok, messages[:i + 1], where)
        a_ids = tok(before, add_special_tokens=False)["input_ids"]
        b_ids = tok(upto, add_special_tokens=False)["input_ids"]
        if not (text.startswith(upto) and upto.startswith(before) and ids[:len(b_ids)] == b_ids
                and b_ids[:len(a_ids)] == a_ids):
            raise InputError(f"{where}: the chat template does not render this conversation prefix by prefix "
                             f"(assistant turn {i}), so the assistant's tokens cannot be located")
        mask[len(a_ids):len(b_ids)] = 1
    return np.asarray(ids, dtype=np.int32), mask


# ---------------------------------------------------------------------------------------------- packing
def _pack_concat(docs: list[np.ndarray], masks: list[np.ndarray], seq_len: int,
                 pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    flat, lm = np.concatenate(docs), np.concatenate(masks)
    n = len(flat)
    rows = -(-n // seq_len)
    ids = np.full(rows * seq_len, pad, np.int32)
    att = np.zeros(rows * seq_len, np.uint8)
    loss = np.zeros(rows * seq_len, np.uint8)
    ids[:n], att[:n], loss[:n] = flat, 1, lm
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]]).astype(np.int64)
    return ids.reshape(rows, seq_len), att.reshape(rows, seq_len), loss.reshape(rows, seq_len), starts


def _pack_document(docs: list[np.ndarray], masks: list[np.ndarray], wheres: list[str], seq_len: int, pad: int,
                   max_context: int | None, p: str,
                   option: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    for d, w in zip(docs, wheres, strict=True):
        if max_context is not None and len(d) > max_context:
            raise InputError(f"{arg(option)} {p} {w}: {len(d)} tokens, longer than the teacher's context "
                             f"({max_context}); shorten it, or pack text with {arg('packing')} concat")
        if len(d) > seq_len:
            raise InputError(f"{arg(option)} {p} {w}: {len(d)} tokens do not fit a row of {arg('seq_len')} {seq_len}; "
                             f"raise {arg('seq_len')}, or pack text with {arg('packing')} concat")
    rows = len(docs)
    ids = np.full((rows, seq_len), pad, np.int32)
    att = np.zeros((rows, seq_len), np.uint8)
    loss = np.zeros((rows, seq_len), np.uint8)
    for r, (d, m) in enumerate(zip(docs, masks, strict=True)):
        ids[r, :len(d)], att[r, :len(d)], loss[r, :len(d)] = d, 1, m
    return ids, att, loss, np.arange(rows, dtype=np.int64) * seq_len
