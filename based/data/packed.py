"""Tokenize a corpus once into one packed token file, split into train and validation, and cut batches.

Layout (nanoGPT's): every document's ids followed by the separator (eos) id, concatenated into a flat
uint16 array (uint32 when the vocabulary exceeds 65536) in $BASED_CACHE/tokenized/<key>/tokens.bin; the
last `val_fraction` of the tokens is the validation split. The key hashes the corpus fingerprint, the
tokenizer and the split, so a changed corpus or tokenizer is tokenized again and an unchanged one is
reused. Sequence length is not part of the key: one tokenization serves every --seq-len.

Batches: the split is cut into non-overlapping windows of T + 1 tokens (x = w[:-1], y = w[1:]); training
walks a fresh seeded permutation of the windows every epoch. Sample g of a run (g counts sequences
consumed over all ranks and micro-steps) is a pure function of (seed, g), so a run's data position is one
integer and a resumed or differently sharded run sees exactly the same sequences.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import DataError, cache_dir, corpus_fingerprint, iter_documents
from .tokenizer import encode_batch, separator_id, tokenizer_fingerprint, vocab_size

FORMAT_VERSION = 1
_ENCODE_BATCH = 256  # documents per call of the (parallel) batch encoder


@dataclass
class PackedCorpus:
    """A tokenized corpus: train and val are read-only memmaps of token ids."""

    path: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict


def _dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)


def pack_corpus(corpus: Path, tokenizer, text_field: str = "text", val_fraction: float = 0.01,
                root: Path | None = None, progress: bool = True) -> PackedCorpus:
    """Tokenize `corpus` into a packed memmap (or reuse the one already made for the same inputs)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_vocab, sep = vocab_size(tokenizer), separator_id(tokenizer)
    key_fields = {
        "format": FORMAT_VERSION, "corpus": corpus_fingerprint(corpus, text_field),
        "tokenizer": tokenizer_fingerprint(tokenizer), "val_fraction": val_fraction,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    out = (root or cache_dir() / "tokenized") / key
    if not (out / "meta.json").exists():
        _tokenize(corpus, tokenizer, text_field, val_fraction, out, n_vocab, sep, progress, key_fields)
    meta = json.loads((out / "meta.json").read_text())
    tokens = np.memmap(out / "tokens.bin", dtype=meta["dtype"], mode="r")
    split = meta["train_tokens"]
    return PackedCorpus(out, tokens[:split], tokens[split:], meta)


def _tokenize(corpus, tokenizer, text_field, val_fraction, out: Path, n_vocab, sep, progress, key_fields):
    from tqdm import tqdm

    dtype = _dtype(n_vocab)
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_tokens = n_docs = 0
    with open(tmp / "tokens.bin", "wb") as f, tqdm(desc=f"tokenizing {corpus.name}", unit="doc",
                                                 disable=not progress) as bar:
        batch: list[str] = []

        def flush():
            nonlocal n_tokens, n_docs
            ids = encode_batch(tokenizer, batch)
            if sep is not None:
                ids = [x + [sep] for x in ids]
            flat = np.fromiter((t for x in ids for t in x), dtype=np.int64)
            if flat.size and (flat.min() < 0 or flat.max() >= n_vocab):
                raise DataError(f"the tokenizer produced id {int(flat.max())} outside its vocabulary of {n_vocab}")
            flat.astype(dtype).tofile(f)
            n_tokens += flat.size
            n_docs += len(batch)
            bar.update(len(batch))
            batch.clear()

        for doc in iter_documents(corpus, text_field):
            batch.append(doc)
            if len(batch) == _ENCODE_BATCH:
                flush()
        if batch:
            flush()
    n_val = int(round(n_tokens * val_fraction))
    meta = {**key_fields, "dtype": dtype.name, "vocab_size": n_vocab, "separator_id": sep, "documents": n_docs,
            "tokens": n_tokens, "train_tokens": n_tokens - n_val, "val_tokens": n_val,
            "source": str(corpus)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():  # another process finished the same work first: keep theirs
        shutil.rmtree(tmp)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    """Non-overlapping windows of seq_len + 1 tokens (neighbours share one boundary token)."""
    return max(0, (len(tokens) - 1) // seq_len)


def check_splits(packed: PackedCorpus, seq_len: int) -> None:
    """Errors for a corpus too small for one training or validation sequence."""
    need = seq_len + 1
    if len(packed.train) + len(packed.val) < need:
        raise DataError(
            f"the corpus has {len(packed.train) + len(packed.val)} tokens, fewer than one sequence of "
            f"seq_len + 1 = {need}: use a larger corpus or a smaller --seq-len"
        )
    for name, split, fraction in (("training", packed.train, "smaller"), ("validation", packed.val, "larger")):
        if len(split) < need:
            raise DataError(
                f"the {name} split has {len(split)} tokens, fewer than one sequence of seq_len + 1 = {need}: "
                f"use a larger corpus, a smaller --seq-len or a {fraction} --val-fraction"
            )


class WindowSampler:
    """Training windows by global sample index: epoch e walks permutation(seed, e) of the windows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n = num_windows(tokens, seq_len)
        self._epoch, self._perm = -1, None

    def window(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[i])

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples start .. start + count - 1 as (x, y), each int64 [count, seq_len]."""
        return windows(self.tokens, [self.window(g) for g in range(start, start + count)], self.seq_len)


def windows(tokens: np.ndarray, ids: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows `ids` of the split as (x, y), y shifted by one token."""
    w = np.stack([tokens[j * seq_len : j * seq_len + seq_len + 1] for j in ids]).astype(np.int64)
    w = torch.from_numpy(w)
    return w[:, :-1], w[:, 1:]
