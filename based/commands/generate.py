"""`based generate`: continue a prompt with a preset (random weights) or a checkpoint, streaming the text.

Text becomes tokens with the checkpoint's own tokenizer when its directory has one (tokenizer.json,
loaded locally), else byte by byte (ids 0..255 = bytes; ids above 255 print as U+FFFD): for a checkpoint
only when its vocabulary is the 256 bytes, since bytes fed to a model trained on BPE ids print garbage.
Nothing is ever downloaded.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path


def register(sub) -> None:
    from based.commands import PRESETS

    p = sub.add_parser("generate", help="generate text from a preset (random weights) or a checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=PRESETS, metavar="PRESET",
                        help="random-weight model of this preset: %(choices)s")
    source.add_argument("--checkpoint", type=Path, help="directory written by save_pretrained")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated after the prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (and of a preset's random weights)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the likeliest tokens of this total "
                   "probability (1 = all)")
    p.add_argument("--batch-size", type=int, default=1, help="samples of the same prompt")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.set_defaults(func=run)


BYTE_VOCAB = 256


def checkpoint_tokenizer(path: Path, model_vocab: int):
    """The checkpoint folder's HFTokenizer; a ValueError naming the file when it is not a tokenizer (the
    loaders' own messages name no file) or has ids past the model's vocabulary."""
    from based.data.tokenizer import JSON_TOKENIZER_FILES, check_tokenizer_files
    from based.serve.text import HFTokenizer

    check_tokenizer_files(path)  # empty, garbage, truncated or not a JSON object: named
    try:
        tokenizer = HFTokenizer(path)
    except Exception as e:  # noqa: BLE001  (the Rust tokenizers library raises bare Exception)
        files = " with ".join(str(path / f) for f in JSON_TOKENIZER_FILES if (path / f).is_file())
        raise ValueError(f"{files} is not a usable tokenizer ({' '.join(str(e).split()) or type(e).__name__}): "
                         "copy the tokenizer files of the run that trained the model again") from None
    size = len(tokenizer.tok)
    if size > model_vocab:  # the prompt could encode to ids the embedding does not have
        raise ValueError(f"the tokenizer in {path} has {size} tokens but the model's vocabulary only {model_vocab} "
                         "(vocab_size in config.json): copy the tokenizer the model was trained with")
    return tokenizer


def load(args):
    import torch

    from based.serve.text import ByteTokenizer

    from based import BasedConfig, BasedForCausalLM

    if args.checkpoint is not None:
        from based.data.tokenizer import JSON_TOKENIZER_FILES
        from based.eval.checkpoint import load_model

        model = load_model(args.checkpoint, BasedForCausalLM)  # missing or unexpected tensors are errors
        # exists(), not is_file(): a folder named tokenizer.json is refused by name, not read as "no tokenizer"
        has_tokenizer = any((args.checkpoint / f).exists() for f in JSON_TOKENIZER_FILES)
        if not has_tokenizer and model.config.vocab_size != BYTE_VOCAB:
            raise ValueError(
                f"{args.checkpoint} has no tokenizer.json or tokenizer_config.json and its vocabulary of "
                f"{model.config.vocab_size} tokens is not bytes ({BYTE_VOCAB}): copy the tokenizer files of the "
                "run that trained it into that directory"
            )
        tokenizer = checkpoint_tokenizer(args.checkpoint, model.config.vocab_size) if has_tokenizer else ByteTokenizer()
        what = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(args.seed)
        model = BasedForCausalLM(BasedConfig.from_preset(args.preset))
        tokenizer, what = ByteTokenizer(), f"preset {args.preset} (random weights)"
    if isinstance(tokenizer, ByteTokenizer) and model.config.vocab_size < 256:
        raise ValueError(f"byte-level tokens need vocab_size >= 256, the model has {model.config.vocab_size}")
    return model, tokenizer, what


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, MemoryError, FileNotFoundError) as e:
        print(f"based generate: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from based.cli import check_seed, torch_device
    from based.generation import SamplingParams, check_lengths, stream

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)  # checks the values first
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise ValueError(
            f"--prompt is not valid UTF-8 text (an undecodable byte at character {e.start}): pass UTF-8 text"
        ) from None
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_seed(args.seed)
    device = torch_device(args.device)
    model, tokenizer, what = load(args)
    model = model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("the prompt is empty: pass some text with --prompt")
    check_lengths(model, len(prompt), args.max_new_tokens)
    ids = torch.tensor([prompt], device=device).expand(args.batch_size, -1)
    print(f"[{what}, {type(tokenizer).__name__}, {device}]", file=sys.stderr)

    torch.manual_seed(args.seed)
    live = not args.no_stream and args.batch_size == 1  # several samples are printed when done
    start = time.perf_counter()
    blocks = stream(model, ids, args.max_new_tokens, sampling=sampling, eos_token_id=tokenizer.eos_token_id,
                    chunk=1 if live else 32)
    first = next(blocks, None)  # allocates the state: a batch too large fails here, before any output
    decoders = [tokenizer.decoder() for _ in range(args.batch_size)]
    texts, count = [""] * args.batch_size, 0
    if live:
        print(args.prompt, end="", flush=True)
    for block in itertools.chain([] if first is None else [first], blocks):
        count += block.shape[1]
        for i, row in enumerate(block.tolist()):
            piece = decoders[i](row)
            texts[i] += piece
            if live:
                print(piece, end="", flush=True)
    elapsed = time.perf_counter() - start
    if live:
        print()
    else:
        for i, text in enumerate(texts):
            if args.batch_size > 1:
                print(f"--- sample {i} ---")
            print(args.prompt + text)
    rate = count * args.batch_size / elapsed if elapsed > 0 else float("inf")
    print(f"[{count} new tokens x {args.batch_size} in {elapsed:.2f} s, {rate:.1f} tokens/s]", file=sys.stderr)
    return 0
