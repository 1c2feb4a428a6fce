"""Tokenizers: train a byte-level BPE (GPT-2 style) on a corpus, or load any local Hugging Face one.

A trained tokenizer is saved as a Hugging Face folder (tokenizer.json + tokenizer_config.json), so
`transformers.AutoTokenizer.from_pretrained(DIR)` loads it with no network. "<|endoftext|>" is its only
special token: it separates documents in the packed token stream and is the eos (and bos, pad and unk)
token; padding with it lets `pipeline("text-generation")` batch prompts with no set-up.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .corpus import DataError, cache_dir, corpus_fingerprint, iter_documents, resolve_corpus

EOS = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>
# 4x the largest vocabularies in use (Gemma's 262,144). The BPE trainer sizes its tables from vocab_size
# up front: 10^9 made it abort (exit 134) trying to allocate 70 GB.
MAX_VOCAB = 2**20
DEFAULT_VOCAB = 4096
# Files one of which every Hugging Face tokenizer folder holds (fast, GPT-2 style, SentencePiece, BERT).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
# Those of them that are JSON objects and that `based generate` reads (check_tokenizer_files).
JSON_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def train_tokenizer(documents: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE on `documents` and save it to out_dir (written to a temporary folder, then
    renamed). Returns the loaded transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise DataError(f"vocab size must be an int >= {MIN_VOCAB} (256 bytes + {EOS}), got {vocab_size!r}")
    if vocab_size > MAX_VOCAB:
        raise DataError(f"vocab size {vocab_size:,} is over the bound of {MAX_VOCAB:,} tokens (the largest "
                        f"vocabularies in use have about 262,000): pass a smaller --vocab-size")
    out = Path(out_dir)
    check_tokenizer_out(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    # Left padding: a batch of prompts then ends together, as generation needs (based.train.checkpoint.write_model).
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, padding_side="left")
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        fast.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except OSError as e:  # a full disk, or a folder changed while training
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write the tokenizer to --out {out}: {e}") from None
    return load_tokenizer(out)


def check_tokenizer_out(out: Path) -> None:
    """DataError unless `out` can be (re)written as a tokenizer folder: it is replaced as a whole, so it must
    not be a file or a folder holding anything but a tokenizer's files."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is an existing file, not a folder: choose another --out")
    # Checked before training (minutes on a large corpus), not when the result is written.
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise DataError(f"--out {out} is under {parent}, which is a file, not a folder: choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: no permission to write in {parent}: choose another --out")
    if out.is_dir():
        if any(out.iterdir()) and not (out / "tokenizer.json").exists():
            raise DataError(f"--out {out} is a folder holding other files, which training a tokenizer there would "
                            f"delete: choose an empty or new folder")


def load_tokenizer(path: str | os.PathLike):
    """A local Hugging Face tokenizer folder (never the Hub: nothing is downloaded at run time)."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if path.is_file():
        raise DataError(f"tokenizer {path} is a file: pass the folder that holds it (with tokenizer_config.json)")
    if not path.is_dir():
        raise DataError(f"tokenizer folder {path} does not exist (train one with `based tokenizer train`)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"{path} is not a Hugging Face tokenizer folder: it holds none of "
                        f"{', '.join(TOKENIZER_FILES)} (pass a folder a tokenizer's save_pretrained wrote, or train "
                        f"one with `based tokenizer train`)")
    check_tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001  (the Rust tokenizers library raises bare Exception)
        raise DataError(f"{path} is not a Hugging Face tokenizer folder: {_reason(e)}") from None


def _reason(error: Exception) -> str:
    """An exception as one line: transformers' messages run over several lines, KeyError's is a bare key."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if isinstance(error, KeyError) or not text else text


def check_tokenizer_files(path: Path) -> None:
    """DataError naming the file when a folder's tokenizer.json or tokenizer_config.json is not a JSON
    object (empty, truncated, garbage, a folder): transformers and tokenizers say what failed without
    saying in which file."""
    for name in JSON_TOKENIZER_FILES:
        file = path / name
        if not file.exists():
            continue
        fix = f"copy {name} again from the folder the tokenizer was saved to"
        if not file.is_file():
            raise DataError(f"{file} is a folder, not a tokenizer file: {fix}")
        try:
            raw = file.read_bytes()
        except OSError as e:
            raise DataError(f"{file} cannot be read ({e.strerror}): {fix}") from None
        try:
            data = json.loads(raw)
        except ValueError as e:  # invalid JSON, or not UTF-8
            problem = "it is empty" if not raw.strip() else f"it is not valid JSON ({_reason(e)})"
            raise DataError(f"{file} is not a tokenizer file: {problem}: {fix}") from None
        if not isinstance(data, dict):
            problem = f"it holds a JSON {type(data).__name__}, not an object"
        elif name == "tokenizer.json" and not isinstance(data.get("model"), dict):
            problem = 'it has no "model" object (the vocabulary)'
        else:
            continue
        raise DataError(f"{file} is not a tokenizer file: {problem}: {fix}")


def vocab_size(tokenizer) -> int:
    """Token ids the tokenizer can produce (added tokens included)."""
    return len(tokenizer)


def separator_id(tokenizer) -> int | None:
    """Id placed between documents: eos, else sep (BERT-like tokenizers), else none."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the ids: the serialized fast tokenizer, else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}\0{separator_id(tokenizer)}".encode()).hexdigest()


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text, no special tokens; the Rust batch encoder when there is one (parallel, and free
    of transformers' max-length warnings for long documents)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def resolve_tokenizer(tokenizer: str | os.PathLike | None, data: str | os.PathLike | None,
                      text_field: str = "text", train_vocab: int = DEFAULT_VOCAB):
    """--tokenizer DIR when given; otherwise a BPE of train_vocab tokens trained on the corpus once and
    cached under $BASED_CACHE/tokenizers (keyed by the corpus fingerprint)."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    corpus = resolve_corpus(data)
    key = hashlib.sha256(f"{corpus_fingerprint(corpus, text_field)}\0{train_vocab}".encode()).hexdigest()[:16]
    out = cache_dir() / "tokenizers" / f"bpe{train_vocab}-{key}"
    if (out / "tokenizer.json").exists():
        return load_tokenizer(out)
    print(f"training a {train_vocab}-token byte-level BPE on {corpus} -> {out}", flush=True)
    return train_tokenizer(iter_documents(corpus, text_field), train_vocab, out)
