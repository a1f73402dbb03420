"""Read language models and tokenizers from disk with transformers: Hugging Face directories, GGUF files
(dequantised to float32, optionally cached as safetensors) and tokenizer files; fingerprint tokenizers.

transformers (and gguf/accelerate for GGUF) are imported inside the functions: ``pip install 'kdstore[lm]'``.
Nothing here prints: transformers' progress bars and logs are silenced while it reads. Every failure is one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdstore.errors import TeacherError, arg
from kdstore.store.files import sha256_file

INSTALL_HINT = "pip install 'kdstore[lm]'"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def require(spec: str, option: str, *modules: str) -> None:
    """Raise a TeacherError naming the missing packages (transformers and `modules`) and the extra to install."""
    missing = [m for m in ("transformers", *modules) if importlib.util.find_spec(m) is None]
    if missing:
        raise TeacherError(f"{arg(option)} {spec}: needs the package(s) {', '.join(missing)}; {INSTALL_HINT}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' progress bars and info logs, restoring them after.

    The GGUF dequantiser draws its own tqdm bar on stderr, which no switch turns off: stderr is swallowed too."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def hash_files(paths: list[Path]) -> tuple[dict[str, Any], ...]:
    """[{"name", "sha256", "bytes"}] for `paths`, in the order given."""
    return tuple({"name": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths)


def read_hf_dir(spec: str, path: Path, option: str) -> tuple[nn.Module, Any, tuple[dict[str, Any], ...]]:
    """(model, tokenizer, weights files) of a Hugging Face model directory, float32."""
    if not path.is_dir():
        raise TeacherError(f"{arg(option)} {spec}: no such directory (or .gguf file)")
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    missing = [what for what, ok in (
        ("config.json", (path / "config.json").is_file()),
        ("weights (*.safetensors or pytorch_model*.bin)", bool(weights)),
        ("tokenizer (tokenizer.json, tokenizer.model or vocab.json)",
         any((path / n).is_file() for n in _TOKENIZER_FILES))) if not ok]
    if missing:
        raise TeacherError(f"{arg(option)} {spec}: the directory has no {', no '.join(missing)}; save both with "
                           "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)")
    require(spec, option)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet():
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable directories; one line for people
        raise TeacherError(f"{arg(option)} {spec}: transformers cannot load it ({first_line(e)})") from None
    return model, tok, hash_files(weights)


def read_gguf(spec: str, path: Path, cache: bool,
              option: str) -> tuple[nn.Module, Any, tuple[dict[str, Any], ...], str]:
    """(model, tokenizer, [the file], cache status) of a GGUF file, dequantised to float32.

    With `cache`, the dequantised weights are kept as safetensors in ``cache_root()/lm-teachers/<sha256>-
    transformers-<version>`` (dequantising takes ~15-25 s for a 135M model, reading the cache ~0.3 s, with
    bit-identical weights); the status is "hit", "written" or "off"."""
    if not path.is_file():
        raise TeacherError(f"{arg(option)} {spec}: no such file")
    require(spec, option, "gguf", "accelerate")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = hash_files([path])
    cdir = _cache_dir(files[0]["sha256"], transformers.__version__)
    if cache and (cdir / "config.json").is_file():
        try:
            with quiet():
                tok = AutoTokenizer.from_pretrained(cdir)
                model = AutoModelForCausalLM.from_pretrained(cdir, dtype=torch.float32)
            return model, tok, files, "hit"
        except Exception:  # a damaged cache entry: drop it and dequantise again
            shutil.rmtree(cdir, ignore_errors=True)
    try:
        with quiet():
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # unsupported architecture / quantisation, or not a GGUF file at all
        raise TeacherError(
            f"{arg(option)} {spec}: the installed transformers {transformers.__version__} / gguf "
            f"{importlib.metadata.version('gguf')} cannot read it ({first_line(e)}); convert it to a Hugging Face "
            "directory (hf:DIR) or use a supported architecture and quantisation"
        ) from None
    # The model remembers it came from GGUF (refusing .float() and save_pretrained); its weights are float32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    written = cache and _write_cache(cdir, model, tok)
    return model, tok, files, "written" if written else "off"


def _cache_dir(sha256: str, transformers_version: str) -> Path:
    from kdstore.store.remote import cache_root

    return cache_root() / "lm-teachers" / f"{sha256}-transformers-{transformers_version}"


def _write_cache(cdir: Path, model: nn.Module, tok: Any) -> bool:
    """Save the dequantised model beside its final place, then rename (readers never see half a cache entry)."""
    tmp = cdir.with_name(f".{cdir.name}.{os.getpid()}.tmp")
    try:
        with quiet():
            model.save_pretrained(tmp)  # type: ignore[operator]
            tok.save_pretrained(tmp)
        os.replace(tmp, cdir)
        return True
    except OSError:  # full disk, read-only cache, or another process won the rename: the teacher is loaded anyway
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def load_tokenizer(spec: str, option: str = "tokenizer") -> Any:
    """A Hugging Face tokenizer from a directory, a ``tokenizer.json`` file or a ``.gguf`` file."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise TeacherError(f"{arg(option)} {spec}: no such file or directory")
    require(spec, option)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        with quiet():
            if path.is_dir():
                return AutoTokenizer.from_pretrained(path)
            if path.suffix.lower() == ".gguf":
                return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as e:
        raise TeacherError(f"{arg(option)} {spec}: cannot load a tokenizer from it ({first_line(e)})") from None


def tokenizer_fingerprint(tok: Any, model_vocab_size: int | None = None) -> dict[str, Any]:
    """Identity of a tokenizer, JSON-serialisable.

    ``size`` = len(tokenizer), the ids it can produce (base vocabulary plus added tokens); ``base_vocab_size`` =
    tokenizer.vocab_size (without added tokens); ``model_vocab_size`` = the logits' width, which may exceed
    ``size`` (padding rows no text maps to); ``sha256`` of the tokenizer's serialisation (tokenizer.json:
    vocabulary, merges, added tokens, normaliser, pre-tokeniser, post-processor, decoder; the run-time
    ``truncation``/``padding`` settings left out), or of the vocabulary for tokenizers without one
    (``serialization`` says which); ``vocab_sha256`` of what the ids mean: the tokens in id order and the BPE
    merges (equal for two loads of one vocabulary whose serialisations differ in form, e.g. one read from GGUF);
    ``special_tokens`` bos/eos/pad/unk as {"id", "token"} or None; ``chat_template`` {"present", "sha256", "text"}.
    """
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    backend = getattr(tok, "backend_tokenizer", None)
    merges: list[str] = []
    if backend is not None:
        doc = json.loads(backend.to_str())
        merges = [" ".join(m) if isinstance(m, list) else str(m) for m in doc.get("model", {}).get("merges", [])]
        doc.pop("truncation", None)
        doc.pop("padding", None)
        serial, kind = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")), "tokenizer.json"
    else:
        serial, kind = json.dumps(by_id, ensure_ascii=False, separators=(",", ":")), "vocabulary"
    vocab_serial = json.dumps({"tokens": by_id, "merges": merges}, ensure_ascii=False, separators=(",", ":"))
    special = {}
    for name in ("bos", "eos", "pad", "unk"):
        token, tid = getattr(tok, f"{name}_token", None), getattr(tok, f"{name}_token_id", None)
        special[name] = {"id": int(tid), "token": str(token)} if tid is not None else None
    template = getattr(tok, "chat_template", None)
    template = template if isinstance(template, str) and template else None
    return {
        "class": type(tok).__name__, "size": len(tok), "base_vocab_size": int(tok.vocab_size),
        "model_vocab_size": model_vocab_size, "serialization": kind,
        "sha256": hashlib.sha256(serial.encode()).hexdigest(),
        "vocab_sha256": hashlib.sha256(vocab_serial.encode()).hexdigest(), "special_tokens": special,
        "chat_template": {"present": template is not None,
                          "sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
                          "text": template},
    }
