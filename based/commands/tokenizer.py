"""`based tokenizer train`: train a byte-level BPE on a corpus and save it as a Hugging Face folder."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizers: `based tokenizer train --help`")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    t = verbs.add_parser("train", help="train a byte-level BPE (loadable with transformers.AutoTokenizer)")
    t.add_argument("--data", help="text/JSONL/Parquet file or folder (default: the built-in corpus)")
    t.add_argument("--vocab-size", type=int, default=4096,
                   help="tokens in the vocabulary: the 256 bytes, <|endoftext|> and the merges learned")
    t.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    t.add_argument("--text-field", default="text", help="JSONL key / Parquet or datasets column with the text")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from based.data.corpus import DataError, iter_documents, resolve_corpus
    from based.data.tokenizer import train_tokenizer

    try:
        corpus = resolve_corpus(args.data)
        tok = train_tokenizer(iter_documents(corpus, args.text_field), args.vocab_size, args.out)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    sample = "Return the number of items in the container."
    print(f"trained a {len(tok)}-token byte-level BPE on {corpus} -> {args.out}")
    print(f"{sample!r} -> {len(tok(sample).input_ids)} tokens")
    return 0
