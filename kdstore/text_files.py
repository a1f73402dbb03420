"""Read the documents of a text transfer set: .txt lines, .jsonl objects (a text field or chat messages) and
Parquet columns (text, chat messages, or pre-tokenised ids). Each document comes with where it is ("line 7",
"row 7") for error messages; decoding errors name the file, line and byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdstore.errors import ConfigError, InputError, arg

SUFFIXES = {".txt": "txt", ".text": "txt", ".cor": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def read_documents(p: Path, fmt: str, field: str | None, encoding: str,
                   option: str) -> tuple[str, str | None, list[tuple[str, Any]]]:
    """(source, field used, [(where, document)]) with source text | chat | input_ids."""
    if fmt == "txt":
        return "text", None, _read_txt(p, encoding, option)
    if fmt == "jsonl":
        return _read_jsonl(p, encoding, field, option)
    return _read_parquet(p, field, option)


def _decode(raw: bytes, encoding: str, p: Path, line: int, option: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise InputError(f"{arg(option)} {p} line {line}: not valid {encoding} (byte 0x{raw[e.start]:02x} at byte "
                         f"{e.start + 1} of the line); pass {arg('encoding')} latin-1 (or the file's encoding)"
                         ) from None
    except LookupError:
        raise ConfigError(f"{arg('encoding')} {encoding!r}: unknown text encoding") from None


def _lines(p: Path, encoding: str, option: str) -> list[tuple[int, str]]:
    raw = p.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf") and encoding.lower().replace("-", "") in ("utf8", "utf8sig"):
        raw = raw[3:]
    return [(i, _decode(b, encoding, p, i, option).rstrip("\r")) for i, b in enumerate(raw.split(b"\n"), 1)]


def _read_txt(p: Path, encoding: str, option: str) -> list[tuple[str, Any]]:
    return [(f"line {i}", s.strip()) for i, s in _lines(p, encoding, option) if s.strip()]


def _read_jsonl(p: Path, encoding: str, field: str | None, option: str) -> tuple[str, str, list[tuple[str, Any]]]:
    objs = []
    for i, s in _lines(p, encoding, option):
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise InputError(f"{arg(option)} {p} line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{arg(option)} {p} line {i}: a JSON {type(obj).__name__}; expected an object")
        objs.append((i, obj))
    if not objs:
        raise InputError(f"{arg(option)} {p}: the corpus is empty (no JSON lines); it needs at least one")
    if field is None:
        field = "messages" if "messages" in objs[0][1] else "text"
    items = []
    for i, obj in objs:
        if field not in obj:
            raise InputError(f"{arg('field')} {field!r}: {p} line {i} has no such field; its fields are {list(obj)}")
        items.append((f"line {i}", obj[field]))
    source = "chat" if field == "messages" else "text"
    _check_values(items, source, p, option)
    return source, field, items


def _read_parquet(p: Path, field: str | None, option: str) -> tuple[str, str, list[tuple[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(p)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{arg(option)} {p}: cannot read it as Parquet: {e}") from None
    names = schema.names
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if field is None:
        field = next((c for c in ("input_ids", "messages", "text") if c in names), None)
        field = field or (strings[0] if len(strings) == 1 else None)
        if field is None:
            raise InputError(f"{arg(option)} {p}: no input_ids, messages or text column; columns are {names}; pass "
                             f"{arg('field')}")
    elif field not in names:
        raise InputError(f"{arg('field')} {field!r}: {p} has no such column; columns are {names}")
    t = schema.field(field).type
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
    if field in strings:
        source = "text"
    elif is_list and pa.types.is_integer(t.value_type):
        source = "input_ids"
    elif is_list and pa.types.is_struct(t.value_type):
        source = "chat"
    else:
        raise InputError(f"{arg('field')} {field!r} in {p} has type {t}; expected text, a list of token ids, or "
                         "chat messages (a list of {role, content})")
    values = pq.read_table(p, columns=[field]).column(field).to_pylist()
    items = [(f"row {i}", v if v is not None else ("" if source == "text" else [])) for i, v in enumerate(values)]
    _check_values(items, source, p, option)
    return source, field, items


def _check_values(items: list[tuple[str, Any]], source: str, p: Path, option: str) -> None:
    for where, v in items:
        if source == "text" and not isinstance(v, str):
            raise InputError(f"{arg(option)} {p} {where}: the text is a {type(v).__name__}; expected a string")
        if source == "chat" and not (isinstance(v, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in v)):
            raise InputError(f"{arg(option)} {p} {where}: messages must be a list of {{\"role\": str, \"content\": "
                             "str}} objects")
        if source == "chat" and v and not any(m["role"] == "assistant" for m in v):
            raise InputError(f"{arg(option)} {p} {where}: the conversation has no assistant turn; chat transfer sets "
                             "distil the assistant's tokens (give text instead to distil every token)")
